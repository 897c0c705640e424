"""Speculative decoding (runtime/speculative.py): exact for greedy, the same distribution for sampling.

Greedy: with n-gram drafts and with a draft model, every tiny configuration on both graph flavors (and
SmolLM2 on ten prompts) gives exactly the tokens of plain greedy decoding, while drafts are really made
and accepted (the statistics prove the verify path ran). Sampling: the acceptance rule is checked
against exact distributions by chi-square tests, in isolation and end to end on a tiny model.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from ardeploy.cli import main
from ardeploy.runtime import ChatSession, Generator, SamplingConfig
from ardeploy.runtime.errors import UserError
from ardeploy.runtime.sampling import softmax
from ardeploy.runtime.speculative import (AdaptiveK, Draft, NgramDrafter, Speculation, accept_greedy,
                                          accept_sampled)
from conftest import one_line_error, rng_ids, threads

TINY = ["gqa_tied_llama3_bias", "mha_untied_theta", "gqa8x2_untied_linear", "qwen3_qknorm"]
GREEDY = SamplingConfig(greedy=True, max_new_tokens=40, ignore_eos=True)
# chi-square 0.9999 quantiles (a false alarm once in 10,000 runs), by degrees of freedom
TEMPERATURE = 0.05
CHI2_9999 = {3: 21.11, 5: 25.74, 7: 29.88, 15: 44.26}


def copying_prompt(seed: int) -> list[int]:
    """A prompt that repeats a span, so that prompt lookup finds something to draft."""
    span = rng_ids(7, seed=seed)
    return rng_ids(5, seed=seed + 100) + span + rng_ids(3, seed=seed + 200) + span[:4]


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# -- the pieces ------------------------------------------------------------------------------------------
def test_ngram_drafter_proposes_what_followed_an_earlier_match():
    drafter = NgramDrafter(ngram=3)
    history = [9, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3]
    assert drafter.propose(history, 4).tokens == [4, 5, 6, 7]
    assert drafter.propose([9, 8, 7, 6], 4).tokens == []                     # nothing repeats
    assert NgramDrafter(ngram=1).propose([5, 1, 2, 5], 2).tokens == [1, 2]   # one-token match
    # a repeating stretch: the most recent match is followed by one token only; one followed by k is taken
    assert drafter.propose([4, 4, 4, 4, 4, 4, 4, 4], 3).tokens == [4, 4, 4]


def test_greedy_acceptance_keeps_the_agreeing_prefix_and_the_models_token():
    assert accept_greedy(np.array([5, 6, 9, 1]), [5, 6, 7]) == (2, 9)
    assert accept_greedy(np.array([5, 6, 7, 1]), [5, 6, 7]) == (3, 1)
    assert accept_greedy(np.array([4, 6, 7, 1]), [5, 6, 7]) == (0, 4)


def test_adaptive_k_weighs_acceptance_against_the_measured_cost_of_wider_steps():
    gpu_like = AdaptiveK(8)
    assert gpu_like.budget() == 0                        # nothing measured: a plain step first, the baseline
    gpu_like.plain_step(1.0)
    assert gpu_like.budget() == AdaptiveK.PROBE          # one width measured: a small draft, to measure a wider step
    gpu_like.update(2, 2, 1.0)
    assert gpu_like.budget() == 8                        # it cost what a plain step does: draft the most
    for _ in range(20):
        gpu_like.plain_step(1.0)
        gpu_like.update(8, 6, 1.05)                      # wide steps cost about what one does
    assert gpu_like.budget() == 8
    cpu_like = AdaptiveK(8)
    for _ in range(20):
        cpu_like.plain_step(1.0)
        cpu_like.update(8, 6, 4.0)                       # 9 tokens cost 4 steps: with alpha 0.85, drafting less pays
        cpu_like.update(2, 2, 1.3)
    assert 1 <= cpu_like.budget() < 8
    draft_like = AdaptiveK(6)                            # a draft model: a round of 6 costs 6 plain steps
    draft_like.plain_step(1.0)
    for _ in range(10):
        draft_like.update(6, 3, 6.0)
    assert draft_like.budget() == 0                      # plain steps pay more: stop drafting
    failing = AdaptiveK(8)
    for _ in range(10):
        failing.plain_step(1.0)
        failing.update(4, 0, 1.6)                        # drafts never kept: plain steps pay more
    assert failing.budget() == 0
    for _ in range(AdaptiveK.PROBE_AFTER):
        failing.plain_step(1.0)
    assert failing.budget() == AdaptiveK.PROBE           # ... but a small draft is tried again later
    failing.update(2, 0, 1.3)                            # a cheap probe that did not pay: the usual wait
    for _ in range(AdaptiveK.PROBE_AFTER):
        failing.plain_step(1.0)
    assert failing.budget() == AdaptiveK.PROBE
    failing.update(2, 0, 3.0)                            # a costly probe (a draft model's) that did not pay ...
    for _ in range(AdaptiveK.PROBE_AFTER):
        failing.plain_step(1.0)
    assert failing.budget() == 0                         # ... waits twice as long for the next
    for _ in range(AdaptiveK.PROBE_AFTER):
        failing.plain_step(1.0)
    assert failing.budget() == AdaptiveK.PROBE
    failing.update(2, 2, 1.1)                            # one that paid: back to the short wait
    for _ in range(AdaptiveK.PROBE_AFTER):
        failing.plain_step(1.0)
    assert failing.probe_after == AdaptiveK.PROBE_AFTER
    fixed = AdaptiveK(5, adaptive=False)
    fixed.update(5, 0, 9.0)
    assert fixed.budget() == 5
    untimed = AdaptiveK(8, timed=False)                  # from acceptance alone
    untimed.update(8, 2, 9.0)
    assert untimed.budget() == 3
    untimed.update(3, 3, 0.1)
    assert untimed.budget() == 4


@pytest.mark.parametrize("with_q", [False, True])
def test_sampled_acceptance_gives_the_models_distribution(with_q):
    """Two drafted tokens, drawn from q (or certain, as n-gram drafts are): the first two output tokens
    are distributed as p0 x p1 (chi-square over the 16 pairs, 40,000 trials)."""
    rng = np.random.default_rng(0)
    vocab, trials = 4, 40_000
    p = rng.dirichlet(np.ones(vocab), size=3)
    q = rng.dirichlet(np.ones(vocab) * 0.5, size=2)
    counts = np.zeros((vocab, vocab))
    for _ in range(trials):
        drafted = [int(rng.choice(vocab, p=q[i])) for i in range(2)] if with_q else [2, 1]
        kept, token = accept_sampled(p, Draft(drafted, q if with_q else None), rng)
        out = drafted[:kept] + [token]
        if len(out) < 2:                             # rejected at 0: the second token comes from p1 (fresh step)
            out.append(int(rng.choice(vocab, p=p[1])))
        counts[out[0], out[1]] += 1
    assert chi_square(counts.ravel(), np.outer(p[0], p[1]).ravel()) < CHI2_9999[15]


# -- through the runtime -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_hf, export_once):
    return {name: export_once(tiny_hf(name)[0], max_seq=128, max_batch=2) for name in TINY}


@pytest.fixture(scope="module")
def draft_of(tiny_hf, export_once, tmp_path_factory):
    """name -> a draft Generator: another model of the same configuration and vocabulary (another seed,
    so it disagrees often and the rollback is exercised), on the portable graph."""
    from conftest import make_hf_model
    made = {}

    def get(name: str):
        if name not in made:
            folder = tmp_path_factory.mktemp(f"draft_{name}")
            make_hf_model(name, seed=7).save_pretrained(folder)
            made[name] = Generator.load(export_once(folder, max_seq=128, max_batch=1), threads=threads(),
                                        flavor="portable")
        return made[name]
    return get


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("flavor", ["ort", "portable"])
def test_greedy_tokens_are_plain_decodings_with_ngram_drafts(tiny, name, flavor):
    gen = Generator.load(tiny[name], threads=threads(), flavor=flavor)
    spec = Speculation("ngram", draft_tokens=6)
    accepted = 0
    for seed in range(3):
        prompt = copying_prompt(seed)
        result = gen.generate(prompt, GREEDY, speculation=spec)
        assert result.token_ids == gen.generate(prompt, GREEDY).token_ids
        stats = result.timings["speculation"]
        assert stats["verify_steps"] > 0 and stats["drafted"] > 0
        accepted += stats["accepted"]
    assert accepted > 0


@pytest.mark.parametrize("name", TINY)
def test_greedy_tokens_are_plain_decodings_with_a_draft_model(tiny, draft_of, name):
    """The target on the ONNX Runtime graph, the draft (draft_of) on the portable one."""
    draft = draft_of(name)
    gen = Generator.load(tiny[name], threads=threads())
    for seed in range(2):
        prompt = rng_ids(9, seed=seed)
        result = gen.generate(prompt, GREEDY, speculation=Speculation("draft", draft_tokens=4, draft=draft))
        assert result.token_ids == gen.generate(prompt, GREEDY).token_ids
        assert result.timings["speculation"]["drafted"] > 0


SHARED_POOL_CHECK = """
import json, sys
from ardeploy.cli.options import run_options
from ardeploy.runtime import Generator, SamplingConfig
from ardeploy.runtime.sessions import session_options, uses_shared_pool
from ardeploy.runtime.speculative import Speculation
bundle, out = sys.argv[1], {}
args = type("Args", (), {"device": "cpu", "threads": 2, "draft": "D"})()
out["cli_draft"] = run_options(args).shared_threads
args.draft = None
out["cli_plain"] = run_options(args).shared_threads
out["own_pool_before"] = session_options(2).use_per_session_threads
greedy, prompt = SamplingConfig(greedy=True, max_new_tokens=12), list(range(3, 8))
plain = Generator.load(bundle, threads=2)                   # threads of its own, made before the shared pool
out["plain_own_threads"] = plain.backend.own_threads
expected = plain.generate(prompt, greedy).token_ids
gen = Generator.load(bundle, threads=2, shared_threads=True)
draft = Generator.load(bundle, threads=2)                   # made after: on the shared pool too
out["shared"] = [uses_shared_pool(), gen.backend.own_threads, draft.backend.own_threads,
                 session_options(2).use_per_session_threads]
spec = Speculation("draft", draft_tokens=2, draft=draft)
out["same_tokens"] = [gen.generate(prompt, greedy, speculation=spec).token_ids == expected for _ in range(2)]
out["plain_again"] = plain.generate(prompt, greedy).token_ids == expected
print(json.dumps(out))
"""


def test_a_model_and_its_draft_take_turns_on_one_shared_thread_pool(tiny, capsys):
    """With a thread pool each, one session's idle spinning threads take the cores the other needs (SmolLM2
    with its w4a16 draft on 2 threads: 0.75x plain): the CLI puts both on the process's one shared pool when
    --draft is given. Once that pool exists ONNX Runtime refuses sessions with threads of their own, so every
    later session uses it (a process of its own here, so that this one's sessions keep their pools); the
    tokens are plain greedy decoding's. The API says once when a model or its draft has threads of its own."""
    import json
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", SHARED_POOL_CHECK, str(tiny[TINY[0]])], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"cli_draft": True, "cli_plain": False, "own_pool_before": True, "plain_own_threads": True,
                   "shared": [True, False, False, False], "same_tokens": [True, True], "plain_again": True}
    gen = Generator.load(tiny[TINY[0]], threads=threads())
    draft = Generator.load(tiny[TINY[0]], threads=threads())
    capsys.readouterr()
    for _ in range(2):
        gen.generate(rng_ids(5), GREEDY, speculation=Speculation("draft", draft_tokens=2, draft=draft))
    assert capsys.readouterr().err.count("shared_threads=True") == 1


def test_a_rejected_draft_leaves_the_cache_as_plain_decoding_would(tiny):
    """After speculating, the arena holds exactly the K/V of the tokens it names (`cached`): a
    continuation that reuses it gives the logits of a fresh run of the whole sequence."""
    gen = Generator.load(tiny["gqa8x2_untied_linear"], threads=threads())
    prompt = copying_prompt(3)
    result = gen.generate(prompt, SamplingConfig(temperature=1.5, seed=4, max_new_tokens=30, ignore_eos=True),
                          speculation=Speculation("ngram", draft_tokens=6))
    assert result.timings["speculation"]["accepted"] < result.timings["speculation"]["drafted"]   # rollbacks
    seq = prompt + result.token_ids
    assert gen.cached == seq[:len(gen.cached)] and gen.arena.length == len(gen.cached)
    reused = np.asarray(gen.batch.resume(seq, gen.cached), np.float32)
    fresh = Generator.load(tiny["gqa8x2_untied_linear"], threads=threads())
    np.testing.assert_allclose(reused, np.asarray(fresh.batch.start([seq], 0), np.float32), atol=1e-5)


def test_sampling_with_drafts_has_plain_samplings_distribution(tiny, draft_of):
    """The token after the first (the first one the acceptance rule decides: a draft model proposes three
    tokens with its own probabilities) at a low temperature (the tiny model is near uniform) over 1,200 seeds, against the model's exact
    distribution after the most frequent first token (tokens below 2 % pooled)."""
    name = "gqa_tied_llama3_bias"
    gen = Generator.load(tiny[name], threads=threads())
    prompt = rng_ids(8, seed=11)
    cfg = dict(temperature=TEMPERATURE, max_new_tokens=4, ignore_eos=True)
    spec = Speculation("draft", draft_tokens=3, adaptive=False, draft=draft_of(name))
    pairs = [gen.generate(prompt, SamplingConfig(seed=seed, **cfg), speculation=spec).token_ids
             for seed in range(1200)]
    first = max({t[0] for t in pairs}, key=lambda t: sum(p[0] == t for p in pairs))
    seconds = np.array([p[1] for p in pairs if p[0] == first])
    logits = np.asarray(gen.batch.start([prompt + [first]], 0), np.float32)[0] / TEMPERATURE
    exact = softmax(logits.astype(np.float64))
    top = np.nonzero(exact >= 0.02)[0]
    probs = np.append(exact[top], 1 - exact[top].sum())
    counts = np.array([np.sum(seconds == t) for t in top] + [np.sum(~np.isin(seconds, top))])
    df = len(probs) - 1
    bound = CHI2_9999[min((d for d in CHI2_9999 if d >= df), default=15)]
    assert len(seconds) > 200 and chi_square(counts, probs) < bound, (counts, probs * counts.sum())
    # and drafts really were verified: the second token came from the acceptance rule
    stats = gen.generate(prompt, SamplingConfig(seed=1, **cfg), speculation=spec).timings["speculation"]
    assert stats["verify_steps"] >= 1 and stats["drafted"] >= 3


def test_seeded_sampling_with_ngram_drafts_gives_plain_samplings_tokens(tiny):
    """Certain (n-gram) drafts are checked against the token plain sampling draws with the same random
    number, so a seed gives exactly plain sampling's tokens, however much was drafted."""
    gen = Generator.load(tiny["qwen3_qknorm"], threads=threads())
    for seed in range(3):
        cfg = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.05, seed=21 + seed,
                             max_new_tokens=30, ignore_eos=True)
        result = gen.generate(copying_prompt(2), cfg, speculation=Speculation("ngram", adaptive=False))
        assert result.token_ids == gen.generate(copying_prompt(2), cfg).token_ids
        assert result.timings["speculation"]["verify_steps"] > 0


def test_seeded_sampling_with_a_draft_model_is_reproducible(tiny, draft_of):
    gen = Generator.load(tiny["qwen3_qknorm"], threads=threads())
    cfg = SamplingConfig(temperature=0.9, top_k=50, seed=21, max_new_tokens=30, ignore_eos=True)
    spec = Speculation("draft", draft_tokens=4, draft=draft_of("qwen3_qknorm"))
    runs = [gen.generate(copying_prompt(2), cfg, speculation=spec).token_ids for _ in range(2)]
    assert runs[0] == runs[1]


def test_bad_speculation_settings_are_one_line(tiny, capsys):
    bundle = str(tiny["gqa_tied_llama3_bias"])
    for flags, needle in ((["--draft-tokens", "0"], "--draft-tokens"), (["--ngram", "40"], "--ngram"),
                          (["--speculate", "ngram", "--draft", bundle], "not both")):
        code = main(["generate", bundle, "--prompt-ids", "5,6,7", "--max-new-tokens", "2", *flags])
        one_line_error(code, capsys, needle)
    with pytest.raises(UserError, match="one prompt at a time"):
        Generator.load(bundle, threads=threads()).generate([[5, 6], [7, 8]], GREEDY, speculation=Speculation())


# -- SmolLM2: real text, real drafts ----------------------------------------------------------------------
TEN_PROMPTS = ["Repeat this sentence exactly: the quick brown fox jumps over the lazy dog.",
               "Name three rivers in Europe.", "Write a Python function that adds two numbers.",
               "What is the capital of France?", "List the days of the week.",
               "Translate 'good morning' into French and Spanish.", "Count from one to ten in words.",
               "Fix the typo: 'The cat sat on the mat and and slept.'", "What is 12 times 12?",
               "Give me a haiku about the sea."]


@pytest.mark.slow
def test_smollm2_greedy_is_unchanged_by_speculation(smollm2_bundle):
    """Ten chat prompts, 24 greedy tokens: plain, n-gram and draft-model speculation give the same tokens
    (the draft: the same weights on the portable graph, loaded as a second bundle)."""
    gen = Generator.load(smollm2_bundle, threads=threads())
    draft = Generator.load(smollm2_bundle, threads=threads(), flavor="portable", max_batch=1)
    cfg = SamplingConfig(greedy=True, max_new_tokens=24)
    stats = {"ngram": 0, "draft": 0}
    for text in TEN_PROMPTS:
        ids = gen.encode(text, chat=True)
        plain = gen.generate(ids, cfg).token_ids
        for spec in (Speculation("ngram"), Speculation("draft", draft_tokens=4, draft=draft)):
            result = gen.generate(ids, cfg, speculation=spec)
            assert result.token_ids == plain, (text, spec.method)
            stats[spec.method] += result.timings["speculation"]["accepted"]
    assert stats["ngram"] > 0 and stats["draft"] > 0


@pytest.mark.slow
def test_smollm2_chat_and_cli_with_speculation(smollm2_bundle, smollm2_gguf, tmp_path, capsys):
    """A two-turn chat with n-gram drafts says what it says without them (the second turn reuses the
    cache the first left after its rollbacks); generate --prompt-file --json reports the statistics; a
    draft bundle of another vocabulary is refused in one line."""
    gen = Generator.load(smollm2_bundle, threads=threads())
    cfg = SamplingConfig(greedy=True, max_new_tokens=20)
    said = {}
    for speculate in (False, True):
        session = ChatSession(gen)
        said[speculate] = ["".join(session.turn(text, cfg, speculation=Speculation() if speculate else None))
                           for text in ("Repeat: red, green, blue.", "Now repeat it backwards.")]
    assert said[True] == said[False]
    prompt = tmp_path / "p.txt"
    prompt.write_text("Copy this list: alpha, beta, gamma, delta, epsilon, zeta.", encoding="utf-8")
    code = main(["generate", str(smollm2_bundle), "--prompt-file", str(prompt), "--chat", "--greedy",
                 "--max-new-tokens", "16", "--speculate", "ngram", "--json", "--threads", str(threads())])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["speculation"]["verify_steps"] > 0 and 0 <= out["speculation"]["acceptance_rate"] <= 1
    assert out["decode_tokens_per_s"] > 0
