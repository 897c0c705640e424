"""The GPU through cuda-python: which NVIDIA GPU is visible, and the few CUDA runtime calls we need.

One module for both sides: `ardeploy build`/`inspect`/`compare` ask `query_gpu()` what they build
for or can load on, and the TensorRT backend allocates device memory and copies through `Cuda`.
cuda-python (`cuda.bindings`) is imported lazily, so importing this module needs no GPU.
"""
from __future__ import annotations

from .bundle import BundleError


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart          # cuda-python < 12.6
        except ImportError:
            raise BundleError("the TensorRT backend needs cuda-python: pip install cuda-python") from None
    return cudart


def _nvidia_smi() -> tuple[str, str] | None:
    """(name, compute capability) from nvidia-smi: what a machine without cuda-python can still tell."""
    import shutil
    import subprocess
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or "," not in out[0]:
        return None
    name, cc = (s.strip() for s in out[0].rsplit(",", 1))
    return name, cc


def query_gpu(device: int = 0) -> tuple[str, str] | None:
    """(name, 'major.minor') of a visible NVIDIA GPU, or None when there is none (no driver, no device)."""
    try:
        cudart = _cudart()
    except BundleError:
        return _nvidia_smi()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count <= device:
        return None
    err, props = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        return None
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


class Cuda:
    """The few CUDA runtime calls the backend needs: memory, copies, one stream."""

    H2D, D2H, D2D = "cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost", "cudaMemcpyDeviceToDevice"

    def __init__(self, device: int = 0):
        self.rt = _cudart()
        if query_gpu(device) is None:
            raise BundleError("the TensorRT backend needs an NVIDIA GPU and driver; none is visible here")
        self.check(self.rt.cudaSetDevice(device))
        self.stream = self.check(self.rt.cudaStreamCreate())
        self.owned: list[int] = []

    def check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = self.rt.cudaGetErrorString(err)[1]
            raise RuntimeError(f"CUDA error {int(err)}: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def malloc(self, nbytes: int) -> int:
        ptr = int(self.check(self.rt.cudaMalloc(max(1, int(nbytes)))))
        self.owned.append(ptr)
        return ptr

    def zero(self, ptr: int, nbytes: int) -> None:
        self.check(self.rt.cudaMemset(ptr, 0, int(nbytes)))

    def copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        if nbytes:
            self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, getattr(self.rt.cudaMemcpyKind, kind), self.stream))

    def sync(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream))

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def close(self) -> None:
        for ptr in self.owned:
            self.rt.cudaFree(ptr)
        self.owned.clear()


class DeviceArray:
    """What KVArena keeps per buffer: the address (and nothing to free: Cuda owns it)."""

    def __init__(self, ptr: int, nbytes: int):
        self.ptr, self.nbytes = ptr, nbytes
