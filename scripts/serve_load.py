"""Load an `ardeploy serve` server on this machine and report time to first token and throughput.

    ardeploy serve bundles/smollm2 --port 8000 &
    python scripts/serve_load.py --url http://127.0.0.1:8000 --model smollm2 --clients 1,4,8,16 --requests 32
    python scripts/serve_load.py ... --clients 16 --requests 2000 --disconnect 0.2 --pid $(pgrep -n ardeploy)

For each number of concurrent clients: `requests` streamed greedy chat requests (max_tokens each), p50/p99
time to first piece, p50 per-stream tokens/s and the total tokens/s over the run. --disconnect P: each request
hangs up after its first few pieces with probability P; the script then reports how many requests the server
counted completed and cancelled (its /metrics; "lost" should be 0) and, with --pid, that the server's resident
memory after the run is within 2 % of its memory after a warm-up run. Each client thread keeps one HTTP
client (keep-alive), as an application keeps one `openai` client. Loopback only: the URL must name
127.0.0.1, localhost or ::1.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

try:
    import httpx2 as httpx
except ImportError:
    import httpx

PROMPTS = ["Name three rivers in Europe.", "Write a haiku about autumn.", "What is the capital of Japan?",
           "Explain photosynthesis in one sentence.", "List four prime numbers.", "Describe a cat."]


def one_request(client, url: str, model: str, k: int, max_tokens: int, hang_up: bool) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started, first, pieces, tokens = time.perf_counter(), None, 0, 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return {"status": response.status_code}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                pieces += 1
                if hang_up and pieces >= 3:
                    return {"status": "hung_up"}
    done = time.perf_counter()
    rate = (tokens - 1) / (done - first) if first and tokens > 1 and done > first else 0.0
    return {"status": 200, "ttft": (first or done) - started, "tokens": tokens, "rate": rate}


def run_level(url, model, clients: int, requests: int, max_tokens: int, disconnect: float, seed: int) -> dict:
    rng = random.Random(seed)
    plan = [(k, rng.random() < disconnect) for k in range(requests)]
    local, made = threading.local(), []

    def client():
        # one keep-alive client per client thread, as an application holds one openai client: making an
        # httpx client costs ~17 ms (its TLS context, even for http://), which each request paid before
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=600)
            made.append(local.client)
        return local.client
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda item: one_request(client(), url, model, item[0], max_tokens, item[1]),
                                    plan))
    finally:
        for each in made:
            each.close()
    wall = time.perf_counter() - started
    ok = [r for r in results if r["status"] == 200]
    ttft = sorted(r["ttft"] for r in ok)
    return {"clients": clients, "requests": requests, "completed": len(ok),
            "hung_up": sum(r["status"] == "hung_up" for r in results),
            "other": sorted({str(r["status"]) for r in results} - {"200", "hung_up"}),
            "ttft_p50_s": round(statistics.median(ttft), 4) if ttft else None,
            "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 4) if ttft else None,
            "stream_tok_s_p50": round(statistics.median(r["rate"] for r in ok), 1) if ok else None,
            "total_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1), "wall_s": round(wall, 2)}


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--clients", default="1,4,8,16", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--disconnect", type=float, default=0.0, help="probability that a client hangs up early")
    p.add_argument("--pid", type=int, default=None, help="the server's process id: report its memory growth")
    args = p.parse_args()
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("serve_load.py only loads a server on this machine (127.0.0.1, localhost, ::1)")
    run_level(args.url, args.model, 2, 4, args.max_tokens, 0.0, 0)          # warm-up
    rss_before = rss_kib(args.pid) if args.pid else None
    counted = lambda outcome: metric(args.url, f'ardeploy_requests_total{{endpoint="chat",outcome="{outcome}"}}')  # noqa: E731
    before = {outcome: counted(outcome) for outcome in ("ok", "cancelled")}
    levels = [int(x) for x in args.clients.split(",")]
    for level in levels:
        report = run_level(args.url, args.model, level, args.requests, args.max_tokens, args.disconnect, level)
        print(json.dumps(report), flush=True)
    time.sleep(1.0)                                    # let the last hung-up requests be counted
    after = {outcome: counted(outcome) - before[outcome] for outcome in ("ok", "cancelled")}
    summary = {"sent": args.requests * len(levels), "server_completed": after["ok"],
               "server_cancelled": after["cancelled"], "lost": args.requests * len(levels) - sum(after.values())}
    if rss_before:
        summary["rss_growth_pct"] = round(100 * (rss_kib(args.pid) - rss_before) / rss_before, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
