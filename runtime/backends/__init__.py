"""The backends (ONNX Runtime, TensorRT) behind one contract (base.py); `load_backend` picks one."""
from __future__ import annotations

from ..bundle import Bundle
from ..run_options import RunOptions


def load_backend(bundle: Bundle, options: RunOptions, sampler_range: tuple[int, int] | None = None):
    """The backend `options` name, made for `bundle` (imported only when chosen: TensorRT's is heavy).
    sampler_range: the visual id range [lo, hi) of an image sampler appended to the step graph, where
    the backend can run one (ONNX Runtime's graph; see device_sampler.py)."""
    if options.backend == "trt":
        from .trt import TrtBackend
        return TrtBackend(bundle, gpu=options.gpu, cuda_graph=options.cuda_graph)
    from .ort import OrtBackend
    return OrtBackend(bundle, options, sampler_range=sampler_range)
