"""Continuous batching throughput: N concurrent streams against one, through the batching scheduler.

    python scripts/bench_batching.py --bundle bundles/smollm2 --concurrency 1,4,8,16 --threads 2
    python scripts/bench_batching.py --bundle bundles/smollm2-fp16-b8 --device cuda --concurrency 1,8,16

For each concurrency C: C client threads each send --requests-per-client greedy requests one after
another (random prompts of --prompt-len tokens, --new-tokens tokens each, end of sequence ignored) to one
runtime/batching.BatchingScheduler; reported: generated tokens per second over the wall time, its ratio
to C = 1, and time to first token (p50 / p99, queueing included). The bundle's max_batch bounds the
rows that run together; more clients wait in the queue.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np


def run(scheduler, concurrency: int, per_client: int, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.scheduling import Request
    cfg = SamplingConfig(greedy=True, max_new_tokens=new_tokens, ignore_eos=True)
    ttfts, tokens = [], []

    def client(index: int) -> None:
        rng = np.random.default_rng(index)
        for _ in range(per_client):
            started = time.perf_counter()
            handle = scheduler.submit(Request(rng.integers(min(1000, vocab // 4), vocab - 1, prompt_len).tolist(), cfg))
            first = None
            count = 0
            for _ in handle.events(timeout=600):
                first = first or time.perf_counter()
                count += 1
            ttfts.append(first - started)
            tokens.append(count)
    started = time.perf_counter()
    clients = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": len(tokens), "tokens": int(sum(tokens)),
            "tokens_per_s": round(sum(tokens) / wall, 1), "ttft_p50_ms": round(1000 * float(np.percentile(ttfts, 50)), 2),
            "ttft_p99_ms": round(1000 * float(np.percentile(ttfts, 99)), 2), "wall_s": round(wall, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    from ardeploy.runtime import Generator
    from ardeploy.runtime.batching import BatchingScheduler
    from ardeploy.runtime.run_options import RunOptions
    gen = Generator.load(args.bundle, RunOptions(device=args.device, threads=args.threads))
    scheduler = BatchingScheduler(gen, max_queue=1024)
    run(scheduler, 1, 1, args.prompt_len, 8, gen.bundle.vocab_size)                 # warm-up
    rows = []
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        row = run(scheduler, concurrency, args.requests_per_client, args.prompt_len, args.new_tokens,
                  gen.bundle.vocab_size)
        row["vs_one_stream"] = round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 2) if rows else 1.0
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    scheduler.close()
    result = {"bundle": args.bundle, "device": args.device, "max_batch": gen.arena.max_batch,
              "threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": rows}
    if args.json:
        open(args.json, "w").write(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
