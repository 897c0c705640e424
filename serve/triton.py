"""`ardeploy triton`: a Triton Inference Server model repository that runs a bundle with the ardeploy runtime.

    REPO/NAME/config.pbtxt     backend "python", decoupled (one response per token), the bundle's limits
    REPO/NAME/1/model.py       a two-line shim: the model is ardeploy.serve.triton_model.TritonPythonModel
    REPO/NAME/1/bundle/        the bundle (hard links where the file system allows, else a copy), unless
                               --bundle-path names where the server finds it

Requests and responses (KServe v2 tensors; every input but one prompt is optional):

    text_input   BYTES [1]     the prompt text          input_ids    INT64 [-1]  or its token ids
    chat         BOOL [1]      wrap the text in the bundle's chat template
    max_tokens   INT32 [1]     temperature  FP32 [1] (0 = greedy)   top_p  FP32 [1]   seed  INT64 [1]
    stop         BYTES [-1]    stop strings
  ->
    text_output  BYTES [1]     the text of this response (a piece while streaming, all of it otherwise)
    output_ids   INT64 [-1]    its token ids
    finish_reason BYTES [1]    "" until the last response: stop | length | cancelled

Each model instance loads the bundle and runs its own scheduler (`ardeploy.serve.engine.build_engine`),
so Triton's own batching is off (max_batch_size 0) and the rows a scheduler runs at once are the
`max_batch` parameter.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ardeploy.runtime.atomic import folder_written_whole
from ardeploy.runtime.bundle import Bundle
from ardeploy.runtime.errors import UserError

MARK = "ardeploy_model"                 # a parameter that says the model folder is ours (for --force)
SHIM = '''"""Triton Python-backend model written by `ardeploy triton`: the ardeploy runtime serves the bundle."""
from ardeploy.serve.triton_model import TritonPythonModel  # noqa: F401
'''
INPUTS = [("text_input", "TYPE_STRING", [1]), ("input_ids", "TYPE_INT64", [-1]), ("chat", "TYPE_BOOL", [1]),
          ("max_tokens", "TYPE_INT32", [1]), ("temperature", "TYPE_FP32", [1]), ("top_p", "TYPE_FP32", [1]),
          ("seed", "TYPE_INT64", [1]), ("stop", "TYPE_STRING", [-1])]
OUTPUTS = [("text_output", "TYPE_STRING", [1]), ("output_ids", "TYPE_INT64", [-1]),
           ("finish_reason", "TYPE_STRING", [1])]


def config_text(name: str, parameters: dict, instances: int, gpu: bool, decoupled: bool) -> str:
    """config.pbtxt (protobuf text format, written by hand: it is small and flat)."""
    def tensors(kind, specs, optional):
        rows = [f'  {{ name: "{n}" data_type: {t} dims: [ {", ".join(map(str, d))} ]'
                + (" optional: true" if optional else "") + " }" for n, t, d in specs]
        return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"
    params = "\n".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in parameters.items())
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            f"model_transaction_policy {{ decoupled: {'true' if decoupled else 'false'} }}\n"
            + tensors("input", INPUTS, True) + tensors("output", OUTPUTS, False)
            + f"instance_group [ {{ count: {instances} kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]\n"
            + params + "\n")


def check_model_name(name: str) -> None:
    if not name or name.startswith(".") or any(c in name for c in '/\\"\n') or name.isdigit():
        raise UserError(f"--name {name!r}: a Triton model name is a folder name (no '/', quotes, or digits only)")


def write_repository(bundle, out, name: str | None = None, instances: int = 1, max_batch: int | None = None,
                     device: str = "cpu", threads: int | None = None, decoupled: bool = True,
                     bundle_path: str | None = None, max_queue: int = 64, force: bool = False) -> Path:
    """Write REPO/NAME (replacing it only with force, and only if ardeploy wrote it); returns the model folder."""
    source = Bundle.load(bundle)
    name = name or Path(bundle).resolve().name
    check_model_name(name)
    limit = source.max_batch
    if max_batch is not None and not 1 <= max_batch <= limit:
        raise UserError(f"--max-batch {max_batch} is outside [1, {limit}] (the bundle's --max-batch)")
    for option, value, low in (("--instances", instances, 1), ("--max-queue", max_queue, 1)):
        if value < low:
            raise UserError(f"{option} must be at least {low} (got {value})")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1 (got {threads})")
    repo = Path(out)
    if repo.exists() and not repo.is_dir():
        raise UserError(f"{repo}: exists and is not a folder")
    model_dir = repo / name
    _check_replace(model_dir, force)
    parameters = {MARK: "1", "bundle_path": bundle_path or "bundle", "device": device,
                  "threads": threads or "", "max_batch": max_batch or limit, "max_queue": max_queue}
    with folder_written_whole(model_dir, error=UserError) as tmp:
        (tmp / "config.pbtxt").write_text(config_text(name, parameters, instances, device == "cuda", decoupled))
        version = tmp / "1"
        version.mkdir()
        (version / "model.py").write_text(SHIM)
        if bundle_path is None:
            _link_or_copy(source.path, version / "bundle")
    return model_dir.resolve()


def _check_replace(model_dir: Path, force: bool) -> None:
    if not model_dir.exists():
        return
    if not force:
        raise UserError(f"{model_dir}: already exists (use --force to replace it)")
    config = model_dir / "config.pbtxt"
    if not (config.is_file() and f'key: "{MARK}"' in config.read_text(errors="replace")):
        raise UserError(f"{model_dir}: not a model `ardeploy triton` wrote: --force replaces only those, "
                        f"so it was left as it is")


def _link_or_copy(source: Path, target: Path) -> None:
    """The bundle's files into target: hard links (no bytes copied) on the same file system, else copies."""
    target.mkdir()
    for item in sorted(source.iterdir()):
        if item.is_dir():
            shutil.copytree(item, target / item.name)
            continue
        try:
            os.link(item, target / item.name)
        except OSError:
            shutil.copy2(item, target / item.name)


# -- the wheel's tritonserver on this machine (nvidia-pytriton) ---------------------------------------
def wheel_server() -> Path:
    """The tritonserver folder that the nvidia-pytriton wheel ships (bin/, backends/python, stubs)."""
    import importlib.util
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("nvidia-pytriton is not installed (pip install 'ardeploy[triton]')")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (root / "bin" / "tritonserver").exists():
        raise UserError(f"{root}: no bin/tritonserver in the nvidia-pytriton wheel")
    return root


def backend_folder(workdir, python_version: str) -> Path:
    """A --backend-directory for the wheel's server: its Python backend with the stub for `python_version`
    ("3.11"); the wheel keeps one stub per Python version apart from the backend, so links put them together."""
    root = wheel_server()
    stub = root / "python_backend_stubs" / python_version / "triton_python_backend_stub"
    if not stub.exists():
        raise UserError(f"the nvidia-pytriton wheel has no Python backend stub for Python {python_version}")
    folder = Path(workdir) / "backends" / "python"
    folder.mkdir(parents=True, exist_ok=True)
    for item in [*(root / "backends" / "python").iterdir(), stub]:
        if item.name != "__pycache__" and not (folder / item.name).exists():
            os.symlink(item, folder / item.name)
    return folder.parent


def read_parameters(model_config: dict) -> dict:
    """config.pbtxt's parameters as plain strings (Triton hands them to the model as JSON)."""
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}

