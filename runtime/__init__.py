"""ardeploy runtime: runs exported bundles over ONNX Runtime or TensorRT. Imports no torch."""
from .bundle import Bundle, BundleError
from .generator import ChatSession, GenerationResult, Generator
from .sampling import SamplingConfig

__all__ = ["Bundle", "BundleError", "ChatSession", "GenerationResult", "Generator", "SamplingConfig"]
