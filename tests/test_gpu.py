"""ardeploy on an NVIDIA GPU through ONNX Runtime's CUDA provider (`--device cuda`).

The GPU tests need onnxruntime-gpu and a GPU and skip without them (CI has neither); docs/BENCHMARKS.md
says where they were run. They are written to run in ONE process, in any order: several generators of
different bundles, dtypes and batch sizes loaded, used and dropped one after another, as a server or a
notebook would. The CPU machine still checks the one-line error a user without onnxruntime-gpu gets, and
tests/test_runtime.py runs the replayed-step path and its check on the CPU as a stand-in.
"""
from __future__ import annotations

import gc
import json
import subprocess
import sys

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
GREEDY = SamplingConfig(greedy=True, max_new_tokens=24, ignore_eos=True)


@pytest.mark.skipif(has_cuda(), reason="checks the error shown where onnxruntime-gpu is missing")
def test_device_cuda_without_onnxruntime_gpu_is_one_line(tiny_hf, export_once, capsys):
    bundle = export_once(tiny_hf("gqa_tied_llama3_bias")[0], max_seq=64)
    code = main(["generate", str(bundle), "--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--device", "cuda"])
    one_line_error(code, capsys, "--device cuda", "onnxruntime-gpu")


def tokens(gen, prompts, cfg=GREEDY):
    return [r.token_ids for r in gen.generate(prompts, cfg)]


def fresh_process_tokens(bundle, prompts, **load) -> list[list[int]]:
    """The same generation in a new process: what a generator gives with nothing before it."""
    code = (f"import torch, json; from ardeploy.runtime import Generator, SamplingConfig; "
            f"g = Generator.load({str(bundle)!r}, device='cuda', **{load!r}); "
            f"print(json.dumps([r.token_ids for r in g.generate({prompts!r}, SamplingConfig(greedy=True, "
            f"max_new_tokens={GREEDY.max_new_tokens}, ignore_eos=True))]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_gpu
@pytest.mark.parametrize("name", ["gqa_tied_llama3_bias", "mha_untied_theta", "gqa8x2_untied_linear", "qwen3_qknorm"])
@pytest.mark.parametrize("flavor", ["auto", "portable"])
def test_fp32_bundles_give_the_cpu_tokens_on_the_gpu(tiny_hf, export_once, name, flavor):
    """fp32 bundles, greedy, batch 1 and a left-padded batch of 2: the GPU picks the CPU's tokens (auto
    takes the portable graph on CUDA: GroupQueryAttention has no fp32 CUDA kernel)."""
    bundle = export_once(tiny_hf(name)[0], max_seq=128, max_batch=2)
    prompts = [rng_ids(12, seed=31), rng_ids(5, seed=32)]
    cpu = Generator.load(bundle, threads=threads(), flavor=flavor)
    with Generator.load(bundle, device="cuda", flavor=flavor) as gpu:
        assert gpu.backend.flavor == "portable"
        for batch in ([prompts[0]], prompts):
            assert tokens(gpu, batch) == tokens(cpu, batch)


@needs_gpu
def test_fp32_onnx_runtime_graph_on_cuda_is_refused_in_one_line(tiny_hf, export_once, capsys):
    bundle = export_once(tiny_hf("mha_untied_theta")[0], max_seq=128, max_batch=2)
    code = main(["generate", str(bundle), "--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--device", "cuda",
                 "--flavor", "ort"])
    one_line_error(code, capsys, "fp32", "--flavor portable")


@needs_gpu
@pytest.mark.parametrize("name", ["gqa_tied_llama3_bias", "qwen3_qknorm"])
def test_replayed_cuda_graph_equals_plain_runs(tiny_hf, export_once, name):
    """fp16 ONNX Runtime graph on the GPU: the decode step replayed as a CUDA graph (device-resident
    inputs, total_seq_len fixed at max_seq) gives the tokens and logits of plain runs of the same
    session, at batch sizes 1, 2 and 4 interleaved; greedy reads the graph's own argmax."""
    bundle = export_once(tiny_hf(name)[0], max_seq=128, max_batch=4, dtype="fp16")
    prompts = [rng_ids(12, seed=33), rng_ids(5, seed=34), rng_ids(9, seed=35), rng_ids(3, seed=36)]
    with Generator.load(bundle, device="cuda") as replay, Generator.load(bundle, device="cuda", cuda_graph=False) as plain:
        assert replay.backend.cuda_graph and not plain.backend.cuda_graph
        for n in (1, 2, 4, 1, 4, 2):
            assert tokens(replay, prompts[:n]) == tokens(plain, prompts[:n])
        assert sorted(b for _, b, _, _ in replay.backend._captured) == [1, 2, 4]
        seq = np.array([prompts[0] + [9]])
        out = []
        for gen in (plain, replay):
            gen.arena.reset(1)
            gen.backend.step(seq[:, :-1], np.ones((1, 12), np.int64), gen.arena)
            out.append(gen.backend.step(seq[:, -1:], np.ones((1, 13), np.int64), gen.arena))
        np.testing.assert_allclose(np.asarray(out[1]), np.asarray(out[0]), atol=1e-3)
        assert out[1].argmax_rows().tolist() == np.argmax(np.asarray(out[1]), axis=-1).tolist()


@needs_gpu
def test_generators_of_different_bundles_alternate_in_one_process(tiny_hf, export_once):
    """fp16 with CUDA graph, fp32 (portable), fp16 again, then a CUDA-graph generator right after a plain
    one of the same bundle: each gives the tokens it gives alone in a fresh process. (A new device cache
    used to start with a dropped generator's bytes: NaN logits, token 0 every step.)"""
    fp16 = export_once(tiny_hf("qwen3_qknorm")[0], max_seq=128, max_batch=4, dtype="fp16")
    fp32 = export_once(tiny_hf("mha_untied_theta")[0], max_seq=128, max_batch=2)
    prompts = [rng_ids(10, seed=41), rng_ids(4, seed=42)]
    alone = {fp16: fresh_process_tokens(fp16, prompts), fp32: fresh_process_tokens(fp32, prompts)}
    for bundle, load in ((fp16, {}), (fp32, {}), (fp16, {}), (fp16, {"cuda_graph": False}), (fp16, {})):
        gen = Generator.load(bundle, device="cuda", **load)
        assert tokens(gen, prompts) == alone[bundle], (bundle, load)
        del gen                              # dropped without close(): its memory goes back to the pools
        gc.collect()


@needs_gpu
def test_a_new_device_cache_starts_zeroed(tiny_hf, export_once):
    """The cause of the garbage above, checked directly: fill one generator's device cache with NaN, drop
    it, and the next generator's cache (the same freed blocks, most likely) reads all zeros."""
    import onnxruntime as ort
    bundle = export_once(tiny_hf("qwen3_qknorm")[0], max_seq=128, max_batch=4, dtype="fp16")
    gen = Generator.load(bundle, device="cuda", warmup=False)
    for layer in gen.arena.buffers:
        for value, _ in layer:
            value.update_inplace(np.full(value.shape(), np.nan, np.float16))
    gen.close()
    again = Generator.load(bundle, device="cuda", warmup=False)
    for layer in again.arena.buffers:
        for value, _ in layer:
            assert not value.numpy().any()
    assert isinstance(again.arena.buffers[0][0][0], ort.OrtValue)


@needs_gpu
@pytest.mark.slow
def test_a_wrong_replay_on_the_gpu_is_caught(smollm2_gguf, export_once, monkeypatch):
    """A captured step whose per-row lengths stop being updated (a deliberately broken replay) raises
    ReplayMismatch at the first check instead of returning tokens. (Real weights: the fp16 bound allows
    rounding of 0.05 + 0.5 % of the logits, more than a tiny random model's logits move with context.)"""
    from ardeploy.runtime.backends import cuda_graph
    from ardeploy.runtime.backends.ort import ReplayMismatch
    bundle = export_once(smollm2_gguf, max_seq=512, max_batch=1, dtype="fp16")

    def stale_lengths(self, input_ids, seqlens_k, sample=None):
        self.input_ids.update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
        self.session.run_with_iobinding(self.io, self.options)
        return cuda_graph.DeviceLogits(self.logits, self.next_token)
    monkeypatch.setattr(cuda_graph.CapturedStep, "run", stale_lengths)
    with Generator.load(bundle, device="cuda", warmup=False) as gen:
        with pytest.raises(ReplayMismatch):
            gen.generate(rng_ids(20, seed=5), GREEDY)


@needs_gpu
def test_speculative_greedy_on_the_gpu_is_plain_greedy(tiny_hf, export_once):
    """n-gram speculation on the GPU: verify steps of several widths replayed as captured CUDA graphs
    (checked against regular runs), the tokens those of plain greedy decoding."""
    from ardeploy.runtime.speculative import Speculation
    bundle = export_once(tiny_hf("qwen3_qknorm")[0], max_seq=128, max_batch=4, dtype="fp16")
    with Generator.load(bundle, device="cuda", check_replay_every=1) as gen:
        for seed in range(3):
            span = rng_ids(7, seed=seed)
            prompt = rng_ids(5, seed=seed + 50) + span + rng_ids(3, seed=seed + 60) + span[:4]
            result = gen.generate(prompt, GREEDY, speculation=Speculation("ngram", draft_tokens=6))
            assert result.token_ids == gen.generate(prompt, GREEDY).token_ids
        assert any(width > 1 for _, _, width, _ in gen.backend._captured)


@needs_gpu
def test_continuous_batching_on_the_gpu_gives_each_request_its_tokens_alone(tiny_hf, export_once):
    from ardeploy.runtime.batching import BatchingScheduler
    from ardeploy.runtime.scheduling import Request
    bundle = export_once(tiny_hf("qwen3_qknorm")[0], max_seq=128, max_batch=4, dtype="fp16")
    requests = [Request(rng_ids(3 + 3 * i, seed=i), SamplingConfig(greedy=True, max_new_tokens=8 + 4 * (i % 3),
                                                                   ignore_eos=True)) for i in range(9)]
    with Generator.load(bundle, device="cuda", max_batch=1) as one:
        alone = [one.generate(r.prompt_ids, r.sampling).token_ids for r in requests]
    scheduler = BatchingScheduler(Generator.load(bundle, device="cuda"), max_queue=16)
    handles = [scheduler.submit(r) for r in requests]
    got = [[e.token for e in h.events(timeout=120)] for h in handles]
    scheduler.close()
    assert got == alone


@needs_gpu
@pytest.mark.slow
def test_five_reload_cycles_leave_gpu_memory_flat(smollm2_gguf, export_once):
    """load -> generate -> close, five times: device memory in use after the fifth cycle within 1 % of
    after the first (cudaMemGetInfo, the whole device: sessions, weights, cache and captured graphs)."""
    bundle = export_once(smollm2_gguf, max_seq=2048, max_batch=2, dtype="fp16")
    used = []
    first = None
    for _ in range(5):
        with Generator.load(bundle, device="cuda") as gen:
            got = tokens(gen, [[1, 9690, 314, 260, 3575]])
        first = first or got
        assert got == first
        gc.collect()
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        used.append(total - free)
    print("device memory in use after each cycle (MiB):", [round(u / 2**20) for u in used])
    assert abs(used[-1] - used[0]) <= 0.01 * used[0], used


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
