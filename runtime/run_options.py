"""How a bundle is run, decided once: backend, device, graph flavor, threads, CUDA graphs.

    options = RunOptions(device="cuda")                  # the CLI builds it from its flags (cli/options.py)
    backend = load_backend(bundle, options)              # runtime/backends/__init__.py

Generator.load, ImageGenerator.load and `ardeploy bench` all take one RunOptions and pass it along;
an option the chosen backend cannot honour is refused in one line instead of being dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import UserError

BACKENDS = ("ort", "trt")
DEVICES = ("cpu", "cuda")
FLAVORS = ("auto", "ort", "portable")


@dataclass(frozen=True)
class RunOptions:
    backend: str = "ort"              # "ort" (ONNX Runtime) or "trt" (TensorRT engines, always on the GPU)
    device: str | None = None         # "cpu" or "cuda"; None: cpu for ort, cuda for trt
    flavor: str = "auto"              # ort: which graph runs (auto: the ONNX Runtime graph when usable)
    threads: int | None = None        # ort on the CPU: intra-op threads (None: all cores)
    cuda_graph: bool = True           # on the GPU: replay the one-token step as a captured CUDA graph
    prepack: bool = True              # ort: pre-pack MatMul weights (faster; a private copy of them)
    # ort on the CPU: run on the process's one shared thread pool (its size: the first such session's
    # threads; from then on every session of the process runs on it: ONNX Runtime allows no other kind)
    # instead of threads of the session's own. Models that take turns (a draft model and its target)
    # share it: with a pool each, one's idle threads, spinning, take the cores the other needs (SmolLM2
    # with its w8a16 draft, 2 threads, open prompts: 72-74 tok/s with a pool each and spinning off, 94-97
    # sharing one pool that spins)
    shared_threads: bool = False
    audit: bool = False               # count K/V bytes a backend copies outside the graph (benchmarks, tests)
    prefill_chunk: int | None = 256   # ort on the CPU: feed longer prompts in pieces of this many tokens
    check_replay_every: int = 256     # check a captured step's first replay and every Nth (0: never)
    gpu: int = 0                      # which GPU

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UserError(f"unknown backend {self.backend!r} (choose {' or '.join(BACKENDS)})")
        if self.device is not None and self.device not in DEVICES:
            raise UserError(f"unknown device {self.device!r} (cpu or cuda)")
        if self.flavor not in FLAVORS:
            raise UserError(f"unknown graph flavor {self.flavor!r} (auto, ort or portable)")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise UserError(f"--threads must be a whole number of at least 1 (got {self.threads!r})")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise UserError(f"prefill_chunk must be at least 1 or None (got {self.prefill_chunk})")
        if self.check_replay_every < 0:
            raise UserError(f"check_replay_every must be >= 0 (got {self.check_replay_every})")
        if self.backend == "trt":
            self._refuse_for_tensorrt()

    def _refuse_for_tensorrt(self) -> None:
        """TensorRT engines always run on a GPU, as built, without ONNX Runtime's options."""
        for given, flag in ((self.device == "cpu", "--device cpu"), (self.flavor != "auto", "--flavor"),
                            (self.threads is not None, "--threads"), (not self.prepack, "prepack=False")):
            if given:
                raise UserError(f"{flag} applies to ONNX Runtime (--backend ort); TensorRT engines run on the "
                                f"GPU as built")

    @property
    def where(self) -> str:
        """The device the steps run on."""
        return self.device or ("cuda" if self.backend == "trt" else "cpu")

    def replace(self, **changes) -> "RunOptions":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown run option(s): {', '.join(unknown)}")
        return RunOptions(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})
