"""The runtime: generation through `Generator`, the zero-copy KV arena, chat cache reuse, stop strings,
UTF-8-safe streaming, and one-line errors for bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ardeploy.cli import main
from ardeploy.runtime import ChatSession, Generator, SamplingConfig
from ardeploy.runtime.backends.ort import OrtBackend
from ardeploy.runtime.bundle import Bundle, BundleError
from ardeploy.runtime.errors import UserError
from conftest import rng_ids, threads


@pytest.fixture(scope="module")
def tiny_bundle(tiny_hf, export_once):
    folder, model = tiny_hf("gqa_tied_llama3_bias")
    return export_once(folder, max_seq=128, max_batch=2), model


def test_generator_greedy_equals_transformers(tiny_bundle):
    bundle, model = tiny_bundle
    prompt = rng_ids(6, seed=9)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    gen = Generator.load(bundle, threads=threads())
    assert gen.generate(prompt, SamplingConfig(greedy=True, max_new_tokens=32, ignore_eos=True)).token_ids == ref


def test_arena_is_written_in_place_and_matches_a_fresh_prefill(tiny_bundle):
    """Decode steps write K/V into the arena at the bound addresses (0 bytes copied at every context
    length), and the arena then holds exactly what one prefill of the whole sequence produces."""
    bundle_path, _ = tiny_bundle
    bundle = Bundle.load(bundle_path)
    backend = OrtBackend(bundle, threads=threads(), audit=True)
    arena = backend.new_arena(1)
    arena.reset(1)
    seq = rng_ids(40, seed=5)
    backend.step(np.array([seq[:8]]), np.ones((1, 8), np.int64), arena)
    copied = []
    for t in range(8, 40):
        backend.step(np.array([[seq[t]]]), np.ones((1, t + 1), np.int64), arena)
        copied.append(backend.kv_bytes_copied)
    assert copied == [0] * len(copied)
    ref = OrtBackend(bundle, threads=threads())
    arena2 = ref.new_arena(1)
    arena2.reset(1)
    ref.step(np.array([seq]), np.ones((1, 40), np.int64), arena2)
    for layer in range(bundle.n_layers):
        for kv in (0, 1):
            np.testing.assert_allclose(arena.view(layer, kv), arena2.view(layer, kv), atol=1e-5)


def test_public_binding_path_gives_the_same_step(tiny_bundle):
    """The backend binds through ONNX Runtime's inner binding object when it can (one device object
    for all binds); the public IOBinding path it falls back to must compute the same thing."""
    bundle = Bundle.load(tiny_bundle[0])
    seq = np.array([rng_ids(12, seed=2)])
    outs = []
    for fast in (True, False):
        backend = OrtBackend(bundle, threads=threads(), audit=True)
        if not fast:
            backend._c_device = False
        arena = backend.new_arena(1)
        arena.reset(1)
        backend.step(seq[:, :11], np.ones((1, 11), np.int64), arena)
        outs.append(backend.step(seq[:, 11:], np.ones((1, 12), np.int64), arena).copy())
        assert backend.kv_bytes_copied == 0
    np.testing.assert_array_equal(outs[0], outs[1])


def test_replayed_step_path_matches_the_regular_one(tiny_bundle):
    """The GPU's decode step (inputs and logits in buffers bound once per arena and batch, total_seq_len
    fixed at max_seq, replayed as a CUDA graph) run on the CPU with host buffers as the stand-in:
    the same logits and tokens as the regular path, for batches of 1 and 2 (left-padded) and back,
    with one binding per batch size and no KV byte copied."""
    bundle = Bundle.load(tiny_bundle[0])
    cfg = SamplingConfig(greedy=True, max_new_tokens=20, ignore_eos=True)
    prompts = [rng_ids(11, seed=21), rng_ids(5, seed=22)]
    plain = Generator.load(tiny_bundle[0], threads=threads(), flavor="ort")
    replay = Generator.load(tiny_bundle[0], threads=threads(), flavor="ort", audit=True)
    replay.backend.cuda_graph = True
    for batch in ([prompts[0]], prompts, [prompts[1]]):
        assert [r.token_ids for r in replay.generate(batch, cfg)] == [r.token_ids for r in plain.generate(batch, cfg)]
    assert sorted(batch for _, batch, _, _ in replay.backend._captured) == [1, 2]
    assert replay.backend.kv_bytes_copied == 0
    x = np.array([prompts[0] + [7]])
    for gen in (plain, replay):
        gen.arena.reset(1)
        gen.backend.step(x[:, :-1], np.ones((1, 11), np.int64), gen.arena)
    got = replay.backend.step(x[:, -1:], np.ones((1, 12), np.int64), replay.arena)
    want = plain.backend.step(x[:, -1:], np.ones((1, 12), np.int64), plain.arena)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.argmax_rows().tolist() == np.argmax(want, axis=-1).tolist()     # the graph's own argmax


def _replaying_on_cpu(bundle, **kw):
    """A generator whose one-token steps take the GPU's captured-step path, on the CPU (the stand-in)."""
    gen = Generator.load(bundle, threads=threads(), flavor="ort", **kw)
    gen.backend.cuda_graph = True
    return gen


@pytest.mark.parametrize("broken_from", [1, 3])
def test_a_wrong_replay_is_caught_not_returned(tiny_bundle, monkeypatch, broken_from):
    """The replay check runs a captured step's first replay (and every Nth) again as a regular step and
    compares: a replay that stops updating its device inputs (here: the per-row lengths, from replay
    `broken_from` on) raises ReplayMismatch at the next check instead of sampling wrong tokens."""
    from ardeploy.runtime.backends import cuda_graph
    from ardeploy.runtime.backends.ort import ReplayMismatch
    run = cuda_graph.CapturedStep.run
    replays = []

    def stale_lengths(self, input_ids, seqlens_k, sample=None):
        replays.append(1)
        if len(replays) >= broken_from:
            self.input_ids.update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
            self.session.run_with_iobinding(self.io, self.options)
            return cuda_graph.DeviceLogits(self.logits, self.next_token)
        return run(self, input_ids, seqlens_k, sample)
    cfg = SamplingConfig(greedy=True, max_new_tokens=12, ignore_eos=True)
    gen = _replaying_on_cpu(tiny_bundle[0], check_replay_every=2)
    monkeypatch.setattr(cuda_graph.CapturedStep, "run", stale_lengths)
    with pytest.raises(ReplayMismatch, match="disagrees with a regular run"):
        gen.generate(rng_ids(9, seed=5), cfg)
    checks_at = [1, 2, 4]                       # replays checked with check_replay_every=2: the first, then every 2nd
    assert len(replays) == next(n for n in checks_at if n >= broken_from)     # caught at the first check after
    monkeypatch.setattr(cuda_graph.CapturedStep, "run", run)
    plain = Generator.load(tiny_bundle[0], threads=threads(), flavor="ort")
    fresh = _replaying_on_cpu(tiny_bundle[0], check_replay_every=2)
    assert fresh.generate(rng_ids(9, seed=5), cfg).token_ids == plain.generate(rng_ids(9, seed=5), cfg).token_ids


def test_close_frees_the_backend_and_the_context_manager_closes(tiny_bundle):
    with _replaying_on_cpu(tiny_bundle[0]) as gen:
        gen.generate(rng_ids(5, seed=1), SamplingConfig(greedy=True, max_new_tokens=4, ignore_eos=True))
        backend = gen.backend
        assert backend.sessions and backend._captured
    assert gen.backend is None and gen.arena is None
    assert not backend.sessions and not backend._captured and backend._reusable is None
    gen.close()                                            # idempotent
    with pytest.raises(ValueError, match="closed"):
        gen.generate([5, 6], SamplingConfig(max_new_tokens=2))


def test_warmup_records_the_step_and_leaves_the_arena_empty(tiny_bundle):
    """warmup() records the one-token step for each batch size asked, and the next generation gives the
    same tokens as a generator that was never warmed up (the arena and the chat cache left empty)."""
    cfg = SamplingConfig(greedy=True, max_new_tokens=10, ignore_eos=True)
    cold = Generator.load(tiny_bundle[0], threads=threads(), flavor="ort")
    warm = _replaying_on_cpu(tiny_bundle[0])
    warm.warmup((1, 2), verify_widths=range(2, 5))
    assert sorted(batch for _, batch, width, _ in warm.backend._captured if width == 1) == [1, 2]
    assert sorted(width for _, _, width, _ in warm.backend._captured if width > 1) == [2, 3, 4]  # speculation's
    assert warm.warmup_s > 0
    assert warm.arena.length == 0 and warm.cached == []
    assert warm.generate(rng_ids(7, seed=2), cfg).token_ids == cold.generate(rng_ids(7, seed=2), cfg).token_ids


@pytest.mark.parametrize("flavor", ["ort", "portable"])
def test_long_prompts_in_chunks_match_one_piece(tiny_bundle, flavor):
    """A prompt fed in pieces (prefill_chunk) gives the same logits and tokens as in one piece,
    for a single prompt and for a left-padded batch (on the portable graph its first piece is mostly
    padding; the ONNX Runtime graph takes a padded batch in one piece)."""
    bundle, _ = tiny_bundle
    cfg = SamplingConfig(greedy=True, max_new_tokens=12, ignore_eos=True)
    prompts = [rng_ids(37, seed=3), rng_ids(9, seed=4)]
    whole = Generator.load(bundle, threads=threads(), prefill_chunk=None, flavor=flavor)
    chunked = Generator.load(bundle, threads=threads(), prefill_chunk=8, flavor=flavor)
    assert chunked.generate(prompts[0], cfg).token_ids == whole.generate(prompts[0], cfg).token_ids
    assert [r.token_ids for r in chunked.generate(prompts, cfg)] == [r.token_ids for r in whole.generate(prompts, cfg)]
    x, mask = np.array([prompts[0]]), np.ones((1, 37), np.int64)
    a, b = whole.arena, chunked.arena
    a.reset(1), b.reset(1)
    want = whole.backend.step(x, mask, a).copy()
    got = chunked.batch.prompt(x, mask)
    assert b.length == 37
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_max_seq_is_a_clean_stop(tiny_hf, export_once):
    folder, _ = tiny_hf("gqa_tied_llama3_bias")
    bundle = export_once(folder, max_seq=24, max_batch=2)
    gen = Generator.load(bundle, threads=threads())
    r = gen.generate(rng_ids(20), SamplingConfig(greedy=True, max_new_tokens=100, ignore_eos=True))
    assert r.stop_reason == "max_seq"
    assert len(r.token_ids) == 24 - 20 + 1      # the last token is sampled but needs no cache slot


def test_prompt_longer_than_max_seq(tiny_hf, export_once, capsys):
    folder, _ = tiny_hf("gqa_tied_llama3_bias")
    bundle = export_once(folder, max_seq=24, max_batch=2)
    ids = ",".join(str(i) for i in rng_ids(30))
    assert main(["generate", str(bundle), "--prompt-ids", ids]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ardeploy: error:") and "30 tokens" in err and "max_seq 24" in err and "\n" not in err


def _continued_vs_fresh(gen, bundle, prompt, cfg):
    """Run `prompt` continuing the generator's cache; (its tokens, a fresh generator's tokens, the
    number of cached positions the continued run started from)."""
    from ardeploy.runtime.generator import Run
    starts = []
    real_step = gen.backend.step
    gen.backend.step = lambda ids, mask, arena, **kw: (starts.append(arena.length),
                                                       real_step(ids, mask, arena, **kw))[1]
    run = Run(gen.events([prompt], cfg, continue_cache=True))
    for _ in run:
        pass
    gen.backend.step = real_step
    fresh = Generator.load(bundle, threads=threads()).generate(prompt, cfg)
    return run.results[0].token_ids, fresh.token_ids, starts[0]


def _interrupt(gen, prompt, cfg, how: str, k: int) -> list[int]:
    """Start a continued turn and stop it after its k-th token: the caller stops reading the stream,
    or a logits processor raises at the next sampling step. Returns the tokens it gave."""
    def raising(logits, history):
        if len(history[0]) >= len(prompt) + k:
            raise RuntimeError("processor failed")
        return logits
    taken = []
    events = gen.events([prompt], cfg, continue_cache=True, processors=[raising] if how == "raised" else None)
    try:
        for event in events:
            taken.append(event.token)
            if how == "abandoned" and len(taken) == k:
                break
    except RuntimeError:
        assert how == "raised"
    events.close()
    assert len(taken) == k
    return taken


@pytest.mark.parametrize("how", ["abandoned", "raised"])
def test_chat_cache_after_an_interrupted_turn(tiny_bundle, how):
    """A turn stopped half way (the caller stops reading the stream, or a logits processor raises)
    leaves the cache naming only the tokens whose K/V the arena holds: the next turn reuses exactly
    those and equals a fresh run."""
    bundle, _ = tiny_bundle
    cfg = SamplingConfig(greedy=True, max_new_tokens=10, ignore_eos=True)
    gen = Generator.load(bundle, threads=threads())
    first, second, k = rng_ids(9, seed=11), rng_ids(7, seed=12), 4
    done = gen.generate(first, cfg).token_ids                 # a finished turn: cache = first + its reply
    _interrupt(gen, second, cfg, how, k)                       # another conversation, interrupted
    # continuing the first conversation must not reuse its K/V: the arena now holds the second one
    tokens, fresh, start = _continued_vs_fresh(gen, bundle, first + done + rng_ids(3, seed=13), cfg)
    assert tokens == fresh and start == 0
    # continuing the interrupted one reuses what ran: its prompt and the tokens fed back before it stopped
    gen = Generator.load(bundle, threads=threads())
    taken = _interrupt(gen, second, cfg, how, k)
    tokens, fresh, start = _continued_vs_fresh(gen, bundle, second + taken + rng_ids(3, seed=14), cfg)
    assert tokens == fresh
    # abandoned: the k-th token was sampled but never run; raised: it ran before the next sampling failed
    assert start == len(second) + k - (1 if how == "abandoned" else 0)


def test_bundle_from_a_newer_format_is_refused(tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle[0], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code = main(["generate", str(bundle), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "format version 99" in err and "reads versions 1, 2" in err and "Traceback" not in err


def test_default_model_is_checked_against_its_pinned_sha256(tmp_path, monkeypatch):
    """A cached default-model file whose bytes are not the pinned ones is refused and removed."""
    from ardeploy.export.errors import CheckpointError
    from ardeploy.export.named_models import resolve
    monkeypatch.setenv("ARDEPLOY_CACHE", str(tmp_path))
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="pinned"):
        resolve("smollm2")
    assert not fake.exists()


def test_gqa_inputs_realign_padded_rows():
    """The ONNX Runtime graph's inputs from the runtime's left-padded contract: a padded row's tokens
    move to the front, lengths and last-token indices come from the mask, and steps the fused
    attention cannot take are refused."""
    from ardeploy.runtime.backends.ort import gqa_inputs
    ids = np.array([[0, 0, 7, 8], [1, 2, 3, 4]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    first = gqa_inputs(ids, mask, past=0)
    assert first["input_ids"][0, :2].tolist() == [7, 8] and first["input_ids"][1].tolist() == [1, 2, 3, 4]
    assert first["seqlens_k"].tolist() == [1, 3] and int(first["total_seq_len"]) == 4
    assert first["last_token"].tolist() == [1, 7]                  # row 0: index 1; row 1: 4 + 3
    step = gqa_inputs(np.array([[5], [6]]), np.concatenate([mask, [[1], [1]]], axis=1), past=4)
    assert step["seqlens_k"].tolist() == [2, 4] and step["last_token"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="one piece"):
        gqa_inputs(np.array([[5, 6], [7, 8]]), np.concatenate([mask, [[0, 1], [1, 1]]], axis=1), past=4)
    with pytest.raises(ValueError, match="without padding"):
        gqa_inputs(ids, np.array([[0, 0, 1, 1], [0, 1, 1, 1]]), past=0)


def test_chat_reuses_cache_and_matches_fresh_run(smollm2_bundle):
    gen = Generator.load(smollm2_bundle, threads=threads())
    calls = []
    real_step = gen.backend.step

    def spy(ids, mask, arena, **kw):
        calls.append((arena.length, ids.shape[1]))
        return real_step(ids, mask, arena, **kw)
    gen.backend.step = spy
    cfg = SamplingConfig(greedy=True, max_new_tokens=24)
    chat = ChatSession(gen)
    "".join(chat.turn("What is the capital of France?", cfg))
    calls.clear()
    second = "".join(chat.turn("And of Italy?", cfg))
    past, new = calls[0]
    assert past > 0 and new > 1, calls[0]                 # decode graph, several new tokens, with the past
    assert all(s == 1 for _, s in calls[1:])
    full_ids = gen.encode_messages(chat.messages[:-1])     # the whole conversation up to the second question
    assert past + new == len(full_ids)
    fresh = Generator.load(smollm2_bundle, threads=threads()).generate(full_ids, cfg)
    assert chat.last.token_ids == fresh.token_ids
    assert second == fresh.text


def test_stop_string_across_tokens(smollm2_bundle):
    gen = Generator.load(smollm2_bundle, threads=threads())
    prompt = gen.encode_messages([{"role": "user", "content": "Describe a river in two sentences."}])
    cfg = SamplingConfig(greedy=True, max_new_tokens=40, ignore_eos=True)
    free = gen.generate(prompt, cfg)
    token_texts = [gen.decode([t]) for t in free.token_ids]
    # a stop string from the middle of the reply that no single token contains
    start = len(free.text) // 2
    stop = next(free.text[start:start + n] for n in range(3, 20)
                if not any(free.text[start:start + n] in t for t in token_texts))
    cut = free.text.index(stop)
    cfg_stop = SamplingConfig(greedy=True, max_new_tokens=40, ignore_eos=True, stop=[stop])
    pieces = list(gen.stream(prompt, cfg_stop))
    assert "".join(pieces) == free.text[:cut]
    r = gen.generate(prompt, cfg_stop)
    assert r.stop_reason == "stop_string" and r.text == free.text[:cut] and stop not in r.text


def test_streaming_never_splits_utf8(smollm2_bundle):
    from ardeploy.runtime.text import Detokenizer
    tok = Bundle.load(smollm2_bundle).tokenizer()
    text = "长江是中国最长的河流，全长约6300公里。Ünïcödé ✓ 🌊 rivers."
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text) / 2            # byte-level BPE: many characters take several tokens
    d = Detokenizer(tok)
    pieces = [d.add(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)


def test_batch_of_real_prompts_equals_alone(smollm2_bundle):
    gen = Generator.load(smollm2_bundle, threads=threads())
    cfg = SamplingConfig(greedy=True, max_new_tokens=16, ignore_eos=True)
    prompts = ["Hi", "Write one sentence about the longest river in Africa and its delta."]
    batch = gen.generate(prompts, cfg)
    assert [r.token_ids for r in batch] == [gen.generate(p, cfg).token_ids for p in prompts]


def test_generate_json_output(smollm2_bundle, capsys):
    code = main(["generate", str(smollm2_bundle), "--prompt", "Hello", "--chat", "--greedy", "--max-new-tokens", "8",
                 "--json", "--threads", str(threads())])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"prompt_ids", "token_ids", "text", "stop_reason", "ttft_s", "decode_tokens_per_s"}
    assert out["stop_reason"] in ("eos", "max_new_tokens") and len(out["token_ids"]) <= 8


@pytest.mark.parametrize("flag,value,name", [("--top-p", "0", "top_p"), ("--temperature", "-1", "temperature"),
                                             ("--top-k", "-1", "top_k"), ("--top-p", "1.5", "top_p")])
def test_invalid_sampling_values(tiny_bundle, capsys, flag, value, name):
    bundle, _ = tiny_bundle
    assert main(["generate", str(bundle), "--prompt-ids", "1,2", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ardeploy: error:") and name in err and "\n" not in err


def test_unknown_backend(tiny_bundle, capsys):
    bundle, _ = tiny_bundle
    with pytest.raises(SystemExit) as e:
        main(["generate", str(bundle), "--prompt-ids", "1", "--backend", "tpu"])
    assert e.value.code == 2
    from ardeploy.runtime.run_options import RunOptions
    with pytest.raises(UserError, match="unknown backend 'tpu'"):
        RunOptions(backend="tpu")


def test_missing_bundle_files(tiny_bundle, tmp_path, capsys):
    bundle, _ = tiny_bundle
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "weights.bin").unlink()
    assert main(["generate", str(copy), "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "missing file(s)" in err and "weights.bin" in err
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt-ids", "1"]) == 2
    assert "no such bundle" in capsys.readouterr().err


def test_runtime_works_without_torch(tiny_bundle):
    """The runtime never imports torch: run a generation with torch made unimportable."""
    bundle, _ = tiny_bundle
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from ardeploy.runtime import Generator, SamplingConfig\n"
        f"g = Generator.load({str(bundle)!r}, threads=1)\n"
        "r = g.generate([1, 2, 3], SamplingConfig(greedy=True, max_new_tokens=4, ignore_eos=True))\n"
        "assert len(r.token_ids) == 4\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_kv_budget_sizes_the_cache(tiny_bundle, capsys):
    """--kv-budget: the arena gets the longest max_seq that fits (not the bundle's), a prompt longer than
    that is refused naming the budget, and a budget too small for 16 positions is one line."""
    bundle = Bundle.load(tiny_bundle[0])
    per_position = 2 * bundle.n_layers * bundle.max_batch * bundle.kv_shape[0] * bundle.kv_shape[1] * 4
    gen = Generator.load(tiny_bundle[0], threads=threads(), kv_budget=40 * per_position)
    assert gen.arena.max_seq == 40 < bundle.max_seq and gen.arena.nbytes == 40 * per_position
    r = gen.generate(rng_ids(30), SamplingConfig(greedy=True, max_new_tokens=50, ignore_eos=True))
    assert r.stop_reason == "max_seq" and len(r.token_ids) == 40 - 30 + 1
    with pytest.raises(UserError, match="--kv-budget"):
        gen.generate(rng_ids(45), SamplingConfig(max_new_tokens=2))
    code = main(["generate", str(tiny_bundle[0]), "--prompt-ids", "5,6", "--kv-budget", "1KiB"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "KV budget" in err and "\n" not in err
    assert main(["generate", str(tiny_bundle[0]), "--prompt-ids", "5,6", "--max-new-tokens", "2",
                 "--kv-budget", "1MiB", "--threads", str(threads())]) == 0


def test_a_chat_template_is_compiled_once_and_its_errors_stay_errors():
    """A server renders the template once per request: compiling it (about 1 ms for SmolLM2's) happens once.
    A template that fails keeps failing, with the same one-line error, every time."""
    from ardeploy.runtime.text import ChatTemplateError, _compiled, render_chat
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{{ 'go' if add_generation_prompt }}"
    before = _compiled.cache_info().misses
    texts = [render_chat(template, [{"role": "user", "content": word}]) for word in ("hi", "there", "hi")]
    assert texts == ["<user>higo", "<user>therego", "<user>higo"]
    assert _compiled.cache_info().misses == before + 1
    for _ in range(2):
        with pytest.raises(ChatTemplateError, match="not a valid template"):
            render_chat("{% for %}", [{"role": "user", "content": "x"}])
