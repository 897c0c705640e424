"""A bundle's memory before anything is loaded: weights, KV cache, activations, for the CPU and the GPU.

    plan = plan_memory(Bundle.load(B), max_seq=4096, batch=1, device="cuda")
    print(render(plan))                         # or plan.to_json()
    max_seq = fit_kv(bundle, parse_bytes("512MiB"), batch=1)     # the arena a KV budget allows

What is counted (the runtime's own choices, read from the manifest and the graph file the backend runs):
  weights     every tensor the graph reads, once (a table two operators share counts once), as ONNX
              Runtime holds it: on the CPU, fp16/bf16 matrices that a MatMul/Gemm multiplies are held as
              fp32 (the CPU provider has no fp16 GEMM on x86, it casts them once at load); quantized
              matrices (MatMulNBits) and everything else at their size. On the GPU: their size, on the device.
  kv cache    2 x layers x max_seq x batch x kv_heads x head_dim x the cache dtype (runtime/kv_arena.py: the
              arena is allocated whole, for max_seq positions).
  activations the largest step's intermediates: hidden states, q|k|v, gate|up and attention scores of a
              prefill piece (256 tokens on the CPU, the runtime's prefill_chunk; on the GPU a prompt goes in
              one piece, up to max_seq, and attention is fused: no score matrix), and the logits buffer.
              ONNX Runtime's arena keeps its high-water mark.
  runtime     what a process holds before any bundle: Python, numpy, ONNX Runtime, tokenizers (CPU); the
              CUDA context and libraries (GPU). Measured constants, below.

The totals are estimates, checked against measured RSS in tests/test_memory_plan.py (SmolLM2, CPU).
Importable without torch (and without onnxruntime).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bundle import Bundle, numpy_dtype
from .errors import UserError

PREFILL_CHUNK = 256                     # runtime/backends/ort.py: prompts longer than this go in pieces on the CPU
RUNTIME_CPU = 176 * 2**20               # RSS of Python + numpy + ONNX Runtime + tokenizers with a session (SmolLM2, measured)
RUNTIME_GPU_HOST = 1536 * 2**20         # host RSS the CUDA provider adds (CUDA, cuBLAS, cuDNN libraries): not measured
RUNTIME_GPU_DEVICE = 512 * 2**20        # device memory of the CUDA context and cuBLAS workspaces: not measured
MATMUL_OPS = ("MatMul", "Gemm", "Transpose")
HALF_ON_CPU = 6                         # activations of fp16 graphs on the CPU (see activation_bytes)
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


@dataclass
class MemoryPlan:
    bundle: str
    device: str
    graph: str                       # the graph file the runtime runs
    dtype: str                       # the bundle's dtype, or its quantization scheme
    max_seq: int
    batch: int
    weights_file_bytes: int          # the tensors the graph reads, as stored
    weights_bytes: int               # as ONNX Runtime holds them on `device`
    kv_bytes: int
    kv_bytes_per_position: int       # one more position of max_seq, for the whole batch
    activation_bytes: int
    runtime_host_bytes: int
    runtime_device_bytes: int
    host_bytes: int = 0              # totals
    device_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def parse_bytes(text: str, what: str = "--kv-budget") -> int:
    """'512MiB', '2GiB', '1.5G', '800MB', '4096' -> bytes (K/M/G/T: powers of 1000; KiB/MiB/GiB/TiB: of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in UNITS:
        raise UserError(f"{what} {text!r}: give a size such as 512MiB, 2GiB or 800MB")
    n = int(float(m.group(1)) * UNITS[unit])
    if n <= 0:
        raise UserError(f"{what} {text!r}: must be more than 0 bytes")
    return n


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def kv_bytes_per_position(bundle: Bundle, batch: int = 1) -> int:
    n_kv, head_dim = bundle.kv_shape
    return 2 * bundle.n_layers * batch * n_kv * head_dim * bundle.kv_dtype.itemsize


def fit_kv(bundle: Bundle, budget_bytes: int, batch: int = 1, min_seq: int = 1) -> int:
    """The longest cache (max_seq) whose arena fits `budget_bytes` at `batch`, at most the bundle's
    max_seq; a budget below `min_seq` positions is refused in one line."""
    if batch < 1 or batch > bundle.max_batch:
        raise UserError(f"batch {batch}: the bundle allows 1 to {bundle.max_batch} (export --max-batch)")
    per = kv_bytes_per_position(bundle, batch)
    fits = int(budget_bytes // per)
    if fits < min_seq:
        raise UserError(f"KV budget {_size(budget_bytes)} holds {fits} positions at batch {batch} "
                        f"({_size(per)} per position); at least {min_seq} needed: "
                        f"give at least {_size(per * min_seq)}")
    return min(fits, bundle.max_seq)


def runtime_graph(bundle: Bundle, device: str = "cpu", flavor: str = "auto") -> str:
    """The graph kind the ONNX Runtime backend runs (its flavor choice: the ONNX Runtime graph when the
    bundle has one, except fp32 bundles on the GPU, which take the portable decode graph)."""
    if flavor not in ("auto", "ort", "portable"):
        raise UserError(f"unknown flavor {flavor!r} (auto, ort or portable)")
    ort = bundle.ort_graph
    if flavor == "portable" or ort is None:
        return "decode"
    if flavor == "auto" and device == "cuda" and bundle.manifest.get("dtype") == "fp32":
        return "decode"
    return ort


def graph_weights(path: Path, device: str) -> tuple[int, int, list[str]]:
    """(bytes as stored, bytes as held on `device`, notes) of the tensors graph `path` reads."""
    import onnx
    from onnx import TensorProto
    model = onnx.load(str(path), load_external_data=False)
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    stored = held = cast = 0
    seen = set()
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        key = (info.get("location"), info.get("offset")) if info else ("inline", t.name)
        if key in seen:
            continue
        seen.add(key)
        n = int(info["length"]) if info else len(t.raw_data) or t.ByteSize()
        stored += n
        half = t.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16) and len(t.dims) == 2
        ops = users.get(t.name, set())
        if device == "cpu" and half and ops & set(MATMUL_OPS):
            # an fp32 copy; the fp16 original stays mapped too when a Gather reads it (a tied embedding)
            held, cast = held + (3 if ops - set(MATMUL_OPS) else 2) * n, cast + n
        else:
            held += n
    notes = [f"{_size(cast)} of fp16 matrices also held as fp32 by the CPU provider"] if cast else []
    return stored, held, notes


def activation_bytes(bundle: Bundle, max_seq: int, batch: int, device: str) -> int:
    """The largest step's intermediates (see the module's docstring), in the activations' dtype."""
    spec = bundle.spec
    s = min(PREFILL_CHUNK, max_seq) if device == "cpu" else max_seq
    d, ff, hd = spec["hidden_size"], spec["intermediate_size"], spec["head_dim"]
    heads, kv = spec["n_heads"], spec["n_kv_heads"]
    half = numpy_dtype(bundle.manifest.get("kv_dtype", "float32")).itemsize == 2
    itemsize = 2 if half and device == "cuda" else 4
    per_token = 4 * d + (heads + 2 * kv) * hd + 3 * ff            # residual, norm, attention out; q|k|v; gate|up, act
    scores = batch * heads * s * max_seq * 4 if device == "cpu" else 0   # CPU softmax in fp32; CUDA: fused (flash)
    logits = batch * spec["vocab_size"] * 4 * 2                       # the graph's output and the runtime's buffer
    # fp16 graphs on the CPU: the provider casts around every fp16 operator it has no kernel for; the arena's
    # high-water mark was 5.5-6x the fp32 estimate (SmolLM2 and Llama-3.2-1B shapes, measured)
    factor = HALF_ON_CPU if half and device == "cpu" else 1
    return factor * (batch * s * per_token * itemsize + scores) + logits


def plan_memory(bundle: Bundle, max_seq: int | None = None, batch: int | None = None, device: str = "cpu",
                flavor: str = "auto", kv_budget: int | None = None) -> MemoryPlan:
    """Memory of running `bundle` with a cache of max_seq positions (default: the bundle's, or what
    `kv_budget` bytes allow) for `batch` rows (default 1), on `device` (cpu or cuda)."""
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r} (cpu or cuda)")
    batch = batch or 1
    if kv_budget is not None:
        max_seq = fit_kv(bundle, kv_budget, batch) if max_seq is None else max_seq
    max_seq = max_seq or bundle.max_seq
    if not 1 <= max_seq <= bundle.max_seq:
        raise UserError(f"--max-seq {max_seq}: the bundle allows 1 to {bundle.max_seq} (export --max-seq)")
    fit_kv(bundle, kv_bytes_per_position(bundle, batch), batch)          # checks batch
    kind = runtime_graph(bundle, device, flavor)
    stored, held, notes = graph_weights(bundle.graph_path(kind), device)
    per = kv_bytes_per_position(bundle, batch)
    q = bundle.manifest.get("quantization") or {}
    plan = MemoryPlan(bundle=str(bundle.path), device=device, graph=bundle.graph_path(kind).name,
                      dtype=q.get("scheme") or bundle.manifest.get("dtype", "?"), max_seq=max_seq, batch=batch,
                      weights_file_bytes=stored, weights_bytes=held, kv_bytes=per * max_seq,
                      kv_bytes_per_position=per, activation_bytes=activation_bytes(bundle, max_seq, batch, device),
                      runtime_host_bytes=RUNTIME_CPU + (RUNTIME_GPU_HOST if device == "cuda" else 0),
                      runtime_device_bytes=RUNTIME_GPU_DEVICE if device == "cuda" else 0, notes=notes)
    on_device = plan.weights_bytes + plan.kv_bytes + plan.activation_bytes
    if device == "cpu":
        plan.host_bytes = on_device + plan.runtime_host_bytes
    else:
        plan.host_bytes, plan.device_bytes = plan.runtime_host_bytes, on_device + plan.runtime_device_bytes
    if kv_budget is not None and plan.kv_bytes > kv_budget:
        raise UserError(f"--max-seq {max_seq} at batch {batch} needs {_size(plan.kv_bytes)} of KV cache, "
                        f"over --kv-budget {_size(kv_budget)} (it fits {kv_budget // per} positions)")
    return plan


def render(plan: MemoryPlan) -> str:
    where = "GPU" if plan.device == "cuda" else "CPU"
    rows = [("weights", plan.weights_bytes, f"{_size(plan.weights_file_bytes)} in {plan.graph}"),
            ("KV cache", plan.kv_bytes, f"{plan.max_seq} positions x batch {plan.batch}, "
                                        f"{_size(plan.kv_bytes_per_position)} per position"),
            ("activations", plan.activation_bytes, "largest step, estimated"),
            ("runtime", plan.runtime_host_bytes + plan.runtime_device_bytes, "libraries, contexts")]
    lines = [f"{plan.bundle} ({plan.dtype}) on the {where}, max_seq {plan.max_seq}, batch {plan.batch}:"]
    lines += [f"  {name:<12}{_size(n):>12}   {what}" for name, n, what in rows]
    lines.append(f"  {'total':<12}{_size(plan.host_bytes):>12}   host memory")
    if plan.device == "cuda":
        lines.append(f"  {'':<12}{_size(plan.device_bytes):>12}   GPU memory")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
