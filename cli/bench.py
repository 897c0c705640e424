"""`ardeploy bench`: time to first token, decode and prefill speed, per-step split into graph time and
runtime overhead, memory, and KV bytes copied per decode step — medians and spread over repeats.

KV bytes copied per step = what the graph copies inside (runtime/kv_traffic.py: Concat/Transpose of
the cache, counted from the graph and sized at the step's context) + what the backend had to copy
outside (audited: present outputs not written at their bound arena address).

It times the real runtime path (`Generator.events`: sampling, binding, detokenization included) from
the backend's own step records (runtime/backends/base.py `StepRecord`): a step's wall time minus the
time inside the backend's run call is runtime overhead. The same command works for any backend; memory
is host PSS/RSS for CPU backends and device memory where the backend reports it (`device_memory_bytes()`).
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np

from ..runtime.kv_traffic import bytes_per_step, cache_copy_nodes
from .errors import UserError
from .options import (add_backend_threads, add_device, add_flavor, add_json, add_speculation, add_verbosity, comma_ints,
                      run_options, speculation)


def host_memory_mib() -> dict:
    """Current and peak RSS and current PSS (pages shared with other processes counted pro rata)
    of this process (Linux), MiB."""
    out = {}
    try:
        for line in open("/proc/self/status"):
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"rss_mib": out.get("VmRSS"), "peak_rss_mib": out.get("VmHWM"), "pss_mib": out.get("Pss")}


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    # Ordinary ids from the middle of the vocabulary: no special tokens, deterministic per seed.
    rng = np.random.default_rng(seed)
    return rng.integers(min(1000, vocab // 4), vocab - 1, n).tolist()


def run_once(gen, batch: int, prompt_len: int, new_tokens: int, seed: int, copy_nodes: int = 0,
             speculation=None) -> dict:
    from ardeploy.runtime import SamplingConfig
    prompts = [prompt_ids(gen.bundle.vocab_size, prompt_len, seed + r) for r in range(batch)]
    cfg = SamplingConfig(greedy=True, max_new_tokens=new_tokens, ignore_eos=True)
    backend = gen.backend
    backend.records = records = []
    copied_before = backend.kv_bytes_copied
    started = time.perf_counter()
    from ardeploy.runtime.generator import Run
    step_ends, n_prefill = [], 0
    for n_events, _ in enumerate(Run(gen.events(prompts, cfg, speculation=speculation)), start=1):
        if n_events % batch == 0:
            step_ends.append(time.perf_counter())
        n_prefill = n_prefill or len(records)      # the prompt may take several calls (pieces)
    finished = time.perf_counter()
    backend.records = None
    prefill_wall = sum(r.wall_s for r in records[:n_prefill])
    ttft = step_ends[0] - started
    # step i of decoding: from one sampled token to the next (run call, sampling, binding, detokenizing)
    step_walls = np.diff(step_ends)
    graph = np.array([r.graph_s for r in records[n_prefill:]])
    n_dec = len(step_walls)
    decode_s = finished - step_ends[0]
    in_graph = [bytes_per_step(copy_nodes, r.past + r.new, gen.arena.row_bytes) for r in records[n_prefill:]]
    outside = (backend.kv_bytes_copied - copied_before) / max(1, len(records) - n_prefill)
    return {
        "ttft_s": ttft,
        "prefill_tokens_per_s": batch * prompt_len / prefill_wall,
        "decode_tokens_per_s": batch * n_dec / decode_s if n_dec else 0.0,
        "step_s": float(np.median(step_walls)) if n_dec else 0.0,
        "step_graph_s": float(np.median(graph)) if n_dec else 0.0,
        "overhead_fraction": float(1 - graph.sum() / step_walls.sum()) if n_dec else 0.0,
        "kv_bytes_copied_per_step": float(np.median(in_graph)) + outside if in_graph else outside,
        "step_by_context": [(int(r.past), float(r.wall_s)) for r in records[n_prefill:]],
    }


def summarize(runs: list[dict]) -> dict:
    keys = ["ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "step_s", "step_graph_s", "overhead_fraction",
            "kv_bytes_copied_per_step"]
    out = {}
    for k in keys:
        vals = [r[k] for r in runs]
        out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def check_counts(prompt_lens, new_tokens: int, batches, repeat: int) -> None:
    """Refuse counts below one (before the bundle is even read)."""
    for option, values in (("--prompt-len", prompt_lens), ("--new-tokens", [new_tokens]), ("--batch", batches),
                           ("--repeat", [repeat])):
        bad = [v for v in values if v < 1]
        if bad or not values:
            raise UserError(f"{option} must be at least 1 (got {bad[0] if bad else 'nothing'})")


def _check_fits(bundle, max_batch: int, prompt_lens, new_tokens: int) -> None:
    """Refuse configurations the bundle's KV arena cannot hold."""
    if max_batch > bundle.max_batch:
        raise UserError(f"--batch {max_batch} exceeds the bundle's max_batch {bundle.max_batch} (re-export with --max-batch)")
    too_long = [p for p in prompt_lens if p + new_tokens > bundle.max_seq]
    if too_long:
        raise UserError(f"--prompt-len {too_long[0]} + --new-tokens {new_tokens} exceeds the bundle's max_seq {bundle.max_seq}")


def bench(bundle_path, options=None, prompt_lens=(16, 512), new_tokens: int = 128, batches=(1,),
          repeat: int = 3, warmup: bool = True, progress=print, speculation=None, **changes) -> dict:
    """options: RunOptions (runtime/run_options.py; keywords override single fields); K/V copies are
    always audited here. speculation (batch 1): runtime/speculative.py; the prompts are random ids, so
    only a draft model finds much to propose."""
    from ardeploy.runtime import Generator
    from ardeploy.runtime.bundle import Bundle
    from ardeploy.runtime.run_options import RunOptions
    check_counts(list(prompt_lens), new_tokens, list(batches), repeat)
    if speculation is not None and max(batches) > 1:
        raise UserError("speculative decoding runs one prompt at a time: --batch 1")
    options = (options or RunOptions()).replace(**changes)
    if options.backend == "ort":
        options = options.replace(audit=True)
    bundle = Bundle.load(bundle_path)
    max_batch = max(batches)
    _check_fits(bundle, max_batch, prompt_lens, new_tokens)
    started = time.perf_counter()
    gen = Generator.load(bundle_path, options, max_batch=max_batch, warmup=False)
    load_s = time.perf_counter() - started
    graph = gen.backend.graph
    copy_nodes = cache_copy_nodes(bundle.graph_path(graph))
    if warmup:
        run_once(gen, 1, min(prompt_lens), 4, seed=999)
    weights = bundle.manifest["weights"]["bytes"]
    device = gen.backend.device
    result = {"bundle": str(bundle_path), "backend": options.backend, "graph": graph,
              "kv_copy_nodes_per_step": copy_nodes, "dtype": bundle.manifest["dtype"], "threads": options.threads,
              "device": device,
              "new_tokens": new_tokens, "repeat": repeat, "load_s": load_s, "weights_mib": weights / 2**20,
              "kv_arena_mib": gen.arena.nbytes / 2**20, "configs": []}
    for b in batches:
        for p in prompt_lens:
            if warmup and device == "cuda":
                # A shape's first run on the GPU pays one-time costs (kernel choice, memory pool growth,
                # recording the step's CUDA graph): kept out of the timed runs.
                run_once(gen, b, p, 4, seed=998)
            runs = [run_once(gen, b, p, new_tokens, seed=r, copy_nodes=copy_nodes, speculation=speculation)
                    for r in range(repeat)]
            row = {"batch": b, "prompt_len": p, **summarize(runs), "step_by_context": runs[-1]["step_by_context"]}
            result["configs"].append(row)
            if progress:
                progress(format_row(row))
    result["memory"] = host_memory_mib()
    device_bytes = gen.backend.device_memory_bytes()
    if device_bytes is not None:
        result["device_memory_mib"] = device_bytes / 2**20
    gen.close()
    return result


def format_row(r: dict) -> str:
    m = lambda k: r[k]["median"]
    spread = lambda k: f"{r[k]['min']:.1f}-{r[k]['max']:.1f}"
    return (f"batch {r['batch']:>2} prompt {r['prompt_len']:>5}: first token {m('ttft_s') * 1000:7.1f} ms | "
            f"decode {m('decode_tokens_per_s'):6.1f} tok/s ({spread('decode_tokens_per_s')}) | "
            f"prefill {m('prefill_tokens_per_s'):7.1f} tok/s | step {m('step_s') * 1000:6.2f} ms, "
            f"overhead {100 * m('overhead_fraction'):4.1f} % | KV copied/step {m('kv_bytes_copied_per_step'):.0f} B")


def cmd_bench(args) -> int:
    if args.quiet:
        progress = None
    else:        # the rows go to stderr when stdout carries the JSON document
        from ardeploy.runtime.log import log
        progress = log.info if args.json else (lambda line: print(line, flush=True))
    prompt_lens = comma_ints(args.prompt_len, skip_empty=True, option="--prompt-len")
    batches = comma_ints(args.batch, skip_empty=True, option="--batch")
    options = run_options(args)
    res = bench(args.bundle, options, prompt_lens=prompt_lens, new_tokens=args.new_tokens, batches=batches,
                repeat=args.repeat, progress=progress, speculation=speculation(args, options))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    mem = res["memory"]
    print(f"graph {res['graph']}: {res['kv_copy_nodes_per_step']} whole-context KV copies inside the graph per step")
    print(f"weights {res['weights_mib']:.0f} MiB, KV arena {res['kv_arena_mib']:.0f} MiB; "
          f"peak RSS {mem['peak_rss_mib']:.0f} MiB, PSS {mem['pss_mib']:.0f} MiB "
          f"(one ONNX Runtime session runs prefill and decode: the weights are held once)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="time to first token, decode/prefill speed, overhead, memory",
                       description="Benchmark a bundle through the real runtime loop (greedy, EOS ignored). "
                                   "Reports medians and min-max over --repeat runs per configuration.")
    p.add_argument("bundle")
    p.add_argument("--prompt-len", default="16,512", help="comma-separated prompt lengths")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--repeat", type=int, default=3)
    add_backend_threads(p)
    add_flavor(p)
    add_device(p)
    add_speculation(p)
    add_json(p, "all numbers (with per-step times by context length)")
    add_verbosity(p)
    p.set_defaults(func=cmd_bench)
