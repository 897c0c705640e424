"""ardeploy on an NVIDIA GPU through ONNX Runtime's CUDA provider (`--device cuda`).

The GPU tests need onnxruntime-gpu and a GPU and skip without them (CI has neither); they were run
on an H200 (docs/BENCHMARKS.md). The CPU machine still checks the one-line error a user without
onnxruntime-gpu gets, and tests/test_runtime.py runs the replayed-step path on the CPU as a stand-in.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ardeploy.cli import main
from ardeploy.runtime import Generator, SamplingConfig
from conftest import one_line_error, rng_ids, threads


def has_cuda() -> bool:
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


needs_gpu = pytest.mark.skipif(not has_cuda(), reason="needs an NVIDIA GPU with onnxruntime-gpu "
                                                      "(ONNX Runtime's CUDAExecutionProvider)")


@pytest.mark.skipif(has_cuda(), reason="checks the error shown where onnxruntime-gpu is missing")
def test_device_cuda_without_onnxruntime_gpu_is_one_line(tiny_hf, export_once, capsys):
    bundle = export_once(tiny_hf("gqa_tied_llama3_bias")[0], max_seq=64)
    code = main(["generate", str(bundle), "--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--device", "cuda"])
    one_line_error(code, capsys, "--device cuda", "onnxruntime-gpu")


@needs_gpu
@pytest.mark.parametrize("name", ["gqa_tied_llama3_bias", "mha_untied_theta", "gqa8x2_untied_linear", "qwen3_qknorm"])
@pytest.mark.parametrize("flavor", ["ort", "portable"])
def test_tiny_configs_give_the_same_tokens_on_gpu_and_cpu(tiny_hf, export_once, name, flavor):
    """fp32 bundles, greedy, batch 1 and a left-padded batch of 2: the GPU picks the CPU's tokens.
    (GroupQueryAttention has no fp32 CUDA kernel: the fp32 ONNX Runtime graph runs it on the CPU.)"""
    bundle = export_once(tiny_hf(name)[0], max_seq=128, max_batch=2)
    cfg = SamplingConfig(greedy=True, max_new_tokens=32, ignore_eos=True)
    prompts = [rng_ids(12, seed=31), rng_ids(5, seed=32)]
    cpu = Generator.load(bundle, threads=threads(), flavor=flavor)
    gpu = Generator.load(bundle, device="cuda", flavor=flavor)
    for batch in ([prompts[0]], prompts):
        assert [r.token_ids for r in gpu.generate(batch, cfg)] == [r.token_ids for r in cpu.generate(batch, cfg)]


@needs_gpu
@pytest.mark.parametrize("name", ["gqa_tied_llama3_bias", "qwen3_qknorm"])
def test_replayed_cuda_graph_equals_plain_runs(tiny_hf, export_once, name):
    """fp16 ONNX Runtime graph on the GPU: the decode step replayed as a CUDA graph (device-resident
    inputs, total_seq_len fixed at max_seq) gives the tokens and logits of plain runs of the same
    session, batch 1 and 2; greedy reads the graph's own argmax."""
    bundle = export_once(tiny_hf(name)[0], max_seq=128, max_batch=2, dtype="fp16")
    cfg = SamplingConfig(greedy=True, max_new_tokens=32, ignore_eos=True)
    prompts = [rng_ids(12, seed=33), rng_ids(5, seed=34)]
    replay = Generator.load(bundle, device="cuda")
    plain = Generator.load(bundle, device="cuda", cuda_graph=False)
    assert replay.backend.cuda_graph and not plain.backend.cuda_graph
    for batch in ([prompts[0]], prompts):
        assert [r.token_ids for r in replay.generate(batch, cfg)] == [r.token_ids for r in plain.generate(batch, cfg)]
    assert sorted(b for _, b in replay.backend._captured) == [1, 2]
    seq = np.array([prompts[0] + [9]])
    out = []
    for gen in (plain, replay):
        gen.arena.reset(1)
        gen.backend.step(seq[:, :-1], np.ones((1, 12), np.int64), gen.arena)
        out.append(gen.backend.step(seq[:, -1:], np.ones((1, 13), np.int64), gen.arena))
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(out[0]), atol=1e-3)
    assert out[1].argmax_rows().tolist() == np.argmax(np.asarray(out[1]), axis=-1).tolist()


@needs_gpu
@pytest.mark.slow
def test_smollm2_fp16_on_gpu_matches_transformers_fp16(smollm2_gguf, export_once):
    """Real weights exported --dtype fp16: 32 greedy tokens of a chat prompt on the GPU are the
    tokens transformers picks in fp16 on the same GPU."""
    from transformers import AutoModelForCausalLM
    bundle = export_once(smollm2_gguf, max_seq=512, max_batch=1, dtype="fp16")
    gen = Generator.load(bundle, device="cuda")
    prompt = gen.encode("What is the capital of France? Answer in one sentence.", chat=True)
    ours = gen.generate(prompt, SamplingConfig(greedy=True, max_new_tokens=32, ignore_eos=True)).token_ids
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float16).to("cuda").eval()
    model.generation_config.eos_token_id = None        # as ignore_eos: an EOS is a token like any other
    with torch.no_grad():
        ids = torch.tensor([prompt], device="cuda")
        ref = model.generate(ids, max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    print("ours", ours, "\ntransformers", ref)
    assert ours == ref
