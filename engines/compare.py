"""`ardeploy compare`: the decode graph in ONNX Runtime vs the engine in TensorRT, through polygraphy.

Each case is one engine run with the inputs the runtime would give it: a prefill (P = 0, prefill
profile) and decode steps (P cached positions, one new token, decode profile). Past K/V are random
rather than a real cache: both sides get the same bytes, which is all a comparison needs.
Polygraphy picks TensorRT or TensorRT-RTX when it is first imported (POLYGRAPHY_USE_TENSORRT_RTX),
so that variable is set here, before the import, from the flavour recorded in engines.json.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from ..runtime import engine_record
from ..runtime import trt_compat as compat
from ..runtime.bundle import Bundle, numpy_dtype
from ..runtime.cuda import query_gpu
from ..runtime.engine_record import DECODE, PREFILL
from ..runtime.errors import EngineError

DEFAULT_ATOL = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1, "int8": 0.25, "int4": 0.25}   # int4: the same graph both sides


def compare_feeds(manifest: dict, prompt_len: int, decode_steps: int, seed: int = 0,
                  max_seq: int | None = None) -> list[tuple[str, str, dict]]:
    """[(case name, profile name, feed dict)] for the decode graph: one prefill, then decode steps."""
    spec, graph = manifest["spec"], manifest["graphs"][engine_record.GRAPH]
    max_seq = max_seq or manifest["max_seq"]
    if not 1 <= prompt_len < max_seq:
        raise EngineError(f"--prompt-len must be between 1 and {max_seq - 1} (got {prompt_len})")
    rng = np.random.default_rng(seed)
    kv_dtype = numpy_dtype(manifest["kv_dtype"])
    n_kv, hd = spec["n_kv_heads"], spec["head_dim"]
    pasts = [x["name"] for x in graph["inputs"] if x["name"].startswith("past.")]

    def feed(P: int, S: int) -> dict:
        f = {"input_ids": rng.integers(0, spec["vocab_size"], (1, S), dtype=np.int64),
             "attention_mask": np.ones((1, P + S), np.int64)}
        for name in pasts:
            f[name] = (rng.standard_normal((P, 1, n_kv, hd)) * 0.5).astype(kv_dtype)
        return f
    cases = [(f"prefill S={prompt_len}", PREFILL, feed(0, prompt_len))]
    for k in range(decode_steps):
        P = min(prompt_len + k, max_seq - 1)
        cases.append((f"decode P={P}", DECODE, feed(P, 1)))
    return cases


def _import_polygraphy(tensorrt: compat.TensorRT):
    if "polygraphy.backend.trt" in sys.modules:
        import polygraphy.config as pc
        if bool(pc.USE_TENSORRT_RTX) != tensorrt.is_rtx:
            raise EngineError("polygraphy was already imported for the other TensorRT flavour in this process")
    else:
        os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if tensorrt.is_rtx else "0"
        import polygraphy.config as pc
        pc.USE_TENSORRT_RTX = tensorrt.is_rtx
    compat.alias_for_polygraphy(tensorrt)
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER
    G_LOGGER.severity = G_LOGGER.WARNING          # our own report says what matters
    return OnnxrtRunner, SessionFromOnnx, EngineFromBytes, TrtRunner, Comparator, SimpleCompareFunc


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32)))) if a.size else 0.0


def _checked_engine(bundle: Bundle) -> tuple[dict, compat.TensorRT, tuple[str, str]]:
    """(engines.json, TensorRT, GPU) once the engine is known to be runnable here, as the backend checks it."""
    rec = engine_record.load(bundle)
    engine_record.check_graphs(rec, bundle)
    tensorrt = compat.load(rec["tensorrt"]["flavour"])
    engine_record.check_tensorrt(rec, tensorrt.flavour, tensorrt.version)
    gpu = query_gpu()
    if gpu is None:
        raise EngineError("compare runs the engine, and engines run only on an NVIDIA GPU; none is visible here "
                          "(building needs none with TensorRT-RTX, running does)")
    engine_record.check_gpu(rec, *gpu)
    return rec, tensorrt, gpu


def compare_bundle(path, prompt_len: int = 16, decode_steps: int = 4, atol: float | None = None,
                   rtol: float | None = None, seed: int = 0) -> dict:
    bundle = Bundle.load(path)
    rec, tensorrt, gpu = _checked_engine(bundle)
    atol = DEFAULT_ATOL[rec["precision"]] if atol is None else atol
    rtol = 0.0 if rtol is None else rtol
    OnnxrtRunner, SessionFromOnnx, EngineFromBytes, TrtRunner, Comparator, SimpleCompareFunc = \
        _import_polygraphy(tensorrt)
    plan = (engine_record.engines_dir(bundle) / rec["engines"][0]["file"]).read_bytes()
    profile_names = [p["name"] for p in rec["engines"][0]["profiles"]]
    onnx_path = str(bundle.graph_path(engine_record.GRAPH))
    ort_runner = OnnxrtRunner(SessionFromOnnx(onnx_path, providers=["cpu"]), name="onnxrt")
    report = {"bundle": str(bundle.path), "tensorrt": rec["tensorrt"]["label"], "gpu": gpu[0],
              "atol": atol, "rtol": rtol, "cases": []}
    for name, profile, feed in compare_feeds(bundle.manifest, prompt_len, decode_steps, seed, rec["max_seq"]):
        trt_runner = TrtRunner(EngineFromBytes(plan), optimization_profile=profile_names.index(profile),
                               name="tensorrt")
        results = Comparator.run([ort_runner, trt_runner], data_loader=[feed])
        passed = bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol)))
        ref, got = results["onnxrt"][0], results["tensorrt"][0]
        kv = [max_abs(ref[n], got[n]) for n in ref.keys() if n.startswith("present.")]
        report["cases"].append({"name": name, "profile": profile, "passed": passed,
                                "max_abs_logits": max_abs(ref["logits"], got["logits"]),
                                "max_abs_kv": max(kv) if kv else 0.0})
    report["passed"] = all(c["passed"] for c in report["cases"])
    return report
