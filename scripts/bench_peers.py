"""The same workload through the tools users would pick instead, measured in the same run.

    python scripts/bench_peers.py --model smollm2 --bundle bundles/smollm2 [--prompt-len 16,512]
        [--new-tokens 128] [--repeat 3] [--threads 2] [--peers ours,ours-concat,transformers,llamacpp-f32,...]
        [--curve-tokens 1536] [--json out.json] [--plot curve.png]

Peers (each runs in its own subprocess, so its memory is its own):
  ours          ardeploy runtime, ONNX Runtime, the bundle's ONNX Runtime graph (fused attention, cache in place)
  ours-portable the same runtime on the bundle's portable graph (time-major cache, Concat inside the graph)
  ours-concat   ablation: the portable graphs, past K/V kept as growing arrays concatenated every step
                (what Optimum-style past/present exports do)
  transformers  transformers generate() with its KV cache, FP32, from the same GGUF
  llamacpp-q4_1 / llamacpp-f32 / llamacpp-f16
                llama.cpp via llama-cpp-python on the shipped Q4_1 GGUF and on F32/F16 GGUFs written
                from the same (dequantized) weights. It must be built for this CPU
                (CMAKE_ARGS=-DGGML_NATIVE=ON); its system_info is printed and recorded with its numbers.
  ort-genai     onnxruntime-genai (FP32, CPU) on a model its own builder exports from the same weights
                (written once to the cache: GGUF -> Hugging Face folder via transformers -> builder)

Nothing is installed silently: a missing peer is reported with the command that installs it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ALL_PEERS = ["ours", "ours-portable", "ours-concat", "transformers", "llamacpp-q4_1", "llamacpp-f32", "llamacpp-f16", "ort-genai"]
INSTALL = {
    "transformers": "pip install torch==2.13.0 transformers accelerate gguf",
    "llamacpp": 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python   (compiles llama.cpp for this CPU; '
                'several minutes)',
    "ort-genai": "pip install onnxruntime-genai torch==2.13.0 transformers gguf",
}


def peak_rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(min(1000, vocab // 4), vocab - 1, n).tolist()


# -- workers: each returns {"ttft_s", "decode_tokens_per_s", "steps": [(context, seconds)]} per run ---------
def worker_ours(args, concat: bool, flavor: str = "auto"):
    from ardeploy.runtime.backends.ort import OrtBackend
    from ardeploy.runtime.bundle import Bundle
    from ardeploy.runtime.generator import Generator
    bundle = Bundle.load(args.bundle)
    backend = OrtBackend(bundle, threads=args.threads, flavor="portable" if concat else flavor)
    gen = Generator(bundle, backend, 1)          # its prompt feeding (in pieces), not its sampling loop
    vocab = bundle.vocab_size

    def generate(ids, n):
        arena = gen.arena
        arena.reset(1)
        started = time.perf_counter()
        x = np.asarray([ids], dtype=np.int64)
        if concat:
            sess = backend.session("prefill")
            outs = sess.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})
            logits, past = outs[0], outs[1:]
        else:
            logits = gen.feed_prompt(x, np.ones_like(x), arena)
        tok = int(np.argmax(logits[0]))
        first_token_at = time.perf_counter()
        steps, length = [], len(ids)
        if concat:         # a second session, on the portable decode graph, for the ablation only
            dec = backend.session("decode")
            names = [o.name for o in dec.get_outputs()]
        for _ in range(n - 1):
            step_started = time.perf_counter()
            x = np.array([[tok]], dtype=np.int64)
            mask = np.ones((1, length + 1), dtype=np.int64)
            if concat:
                feed = {"input_ids": x, "attention_mask": mask}
                for i in range(bundle.n_layers):
                    feed[f"past.{i}.key"], feed[f"past.{i}.value"] = past[2 * i], past[2 * i + 1]
                outs = dec.run(names, feed)
                logits = outs[0]
                # the design being measured: past and present joined into a new, longer array every step
                past = [np.concatenate([p, new], axis=0) for p, new in zip(past, outs[1:])]
            else:
                logits = backend.step(x, mask, arena)
            tok = int(np.argmax(logits[0]))
            length += 1
            steps.append((length, time.perf_counter() - step_started))
        return first_token_at - started, steps
    return run_workload(args, vocab, generate)


def worker_transformers(args):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    vocab = model.config.vocab_size

    @torch.no_grad()
    def generate(ids, n):
        # generate()'s own loop, timed per token by a streamer callback
        from transformers.generation.streamers import BaseStreamer
        times = []

        class Clock(BaseStreamer):
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass
        model.generation_config.eos_token_id = None
        started = time.perf_counter()
        model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       max_new_tokens=n, do_sample=False, pad_token_id=0, streamer=Clock())
        tokens = times[1:]           # the first put() is the prompt
        steps = [(len(ids) + i + 1, b - a) for i, (a, b) in enumerate(zip(tokens, tokens[1:]))]
        return tokens[0] - started, steps
    return run_workload(args, vocab, generate)


def write_dequantized_gguf(src: Path, dst: Path, dtype: str) -> None:
    """The same weights as `src`, dequantized to F32 or F16 (norms stay F32 as llama.cpp expects)."""
    import gguf
    from gguf import quants
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst) + ".partial", arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), vtype)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    for tensor in reader.tensors:
        arr = quants.dequantize(tensor.data, tensor.tensor_type).reshape([int(x) for x in reversed(tensor.shape.tolist())])
        arr = arr.astype(np.float16 if dtype == "f16" and arr.ndim == 2 else np.float32)
        writer.add_tensor(tensor.name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(dst) + ".partial", dst)


def worker_llamacpp(args, variant: str):
    from llama_cpp import Llama
    path = Path(args.gguf)
    if variant != "q4_1":
        converted = Path(args.cache) / f"{path.stem.split('.')[0]}.{variant.upper()}.gguf"
        if not converted.exists():
            write_dequantized_gguf(path, converted, variant)
        path = converted
    max_len = max(args.prompt_len) + args.new_tokens + 8
    llm = Llama(model_path=str(path), n_ctx=max(max_len, args.curve_tokens + 32), n_threads=args.threads,
                n_batch=512, verbose=False, logits_all=False)
    vocab = llm.n_vocab()
    import llama_cpp
    system_info = llama_cpp.llama_print_system_info().decode()

    def last_logits():
        # without logits_all, llama-cpp-python keeps no scores: read the context's last row directly
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    def generate(ids, n):
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(last_logits()))
        first_token_at = time.perf_counter()
        steps = []
        for _ in range(n - 1):
            step_started = time.perf_counter()
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
            steps.append((llm.n_tokens, time.perf_counter() - step_started))
        return first_token_at - started, steps
    return {**run_workload(args, vocab, generate), "system_info": system_info}


def ort_genai_model(args) -> Path:
    """onnxruntime-genai's own FP32 CPU export of the same weights, made once into the cache."""
    out = Path(args.cache) / f"ort-genai-{Path(args.gguf).name.split('.')[0]}-fp32"
    if (out / "genai_config.json").exists():
        return out
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    gguf = Path(args.gguf)
    work = Path(tempfile.mkdtemp(prefix=".ort-genai-", dir=args.cache))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        cfg = loaded.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config          # a GGUF-loaded model refuses save_pretrained
        plain = LlamaForCausalLM(cfg)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(work / "hf")
        shutil.copy(Path(args.bundle) / "tokenizer.json", work / "hf" / "tokenizer.json")
        (work / "hf" / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work / "hf"), "-o",
                        str(work / "out"), "-p", "fp32", "-e", "cpu", "-c", str(work / "cache")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.replace(work / "out", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def worker_ort_genai(args):
    import onnxruntime_genai as og
    folder = ort_genai_model(args)
    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if opts.get("intra_op_num_threads") != args.threads:
        opts["intra_op_num_threads"] = args.threads
        cfg_path.write_text(json.dumps(cfg, indent=2))
    model = og.Model(str(folder))
    vocab = cfg["model"]["vocab_size"]
    max_len = max(max(args.prompt_len) + args.new_tokens, args.curve_tokens + 16) + 8

    def generate(ids, n):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=max_len)
        gen = og.Generator(model, params)
        started = time.perf_counter()
        gen.append_tokens(np.array(ids, np.int32))      # runs the prompt
        gen.generate_next_token()                      # picks the first token from its logits
        first_token_at = time.perf_counter()
        steps = []
        for i in range(n - 1):
            step_started = time.perf_counter()
            gen.generate_next_token()                  # one decode step + argmax
            steps.append((len(ids) + i + 1, time.perf_counter() - step_started))
        return first_token_at - started, steps
    return run_workload(args, vocab, generate)


def run_workload(args, vocab, generate) -> dict:
    generate(prompt_ids(vocab, 16, 999), 4)          # warm-up
    out = {"configs": []}
    for p in args.prompt_len:
        runs = []
        for r in range(args.repeat):
            ttft, steps = generate(prompt_ids(vocab, p, r), args.new_tokens)
            decode = sum(s for _, s in steps)
            runs.append({"ttft_s": ttft, "decode_tokens_per_s": len(steps) / decode,
                         "step_s": statistics.median(s for _, s in steps)})
        out["configs"].append({"prompt_len": p, **{k: statistics.median(r[k] for r in runs) for k in runs[0]},
                               "decode_tokens_per_s_range": [min(r["decode_tokens_per_s"] for r in runs),
                                                             max(r["decode_tokens_per_s"] for r in runs)]})
    if args.curve_tokens:
        _, steps = generate(prompt_ids(vocab, 16, 7), args.curve_tokens)
        out["curve"] = steps
    out["peak_rss_mib"] = peak_rss_mib()
    return out


# -- driver -------------------------------------------------------------------------------------------
def missing(peer: str) -> str | None:
    import importlib.util
    need = {"transformers": ["torch", "transformers", "gguf", "accelerate"], "ort-genai": ["onnxruntime_genai", "torch", "transformers", "gguf"]}
    mods = need.get(peer, ["llama_cpp"] if peer.startswith("llamacpp") else [])
    lacking = [m for m in mods if importlib.util.find_spec(m) is None]
    if not lacking:
        return None
    key = "llamacpp" if peer.startswith("llamacpp") else peer
    return f"{peer}: missing {', '.join(lacking)} — install with: {INSTALL[key]}"


def run_peer(peer: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", peer, "--bundle", str(args.bundle), "--gguf", str(args.gguf),
           "--cache", str(args.cache), "--prompt-len", ",".join(map(str, args.prompt_len)),
           "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat), "--threads", str(args.threads),
           "--curve-tokens", str(args.curve_tokens)]
    if peer == "ort-genai":       # export its model first, in another process, so the timed one's RSS is its own
        prep = subprocess.run([*cmd[:3], "ort-genai-prepare", *cmd[4:]], capture_output=True, text=True)
        if prep.returncode != 0:
            return {"error": "its model builder failed: " + (prep.stderr.strip().splitlines() or ["?"])[-1]}
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(results: dict, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    fig, ax = plt.subplots(figsize=(7, 4))
    for peer, res in results.items():
        curve = res.get("curve")
        if not curve:
            continue
        ctx = np.array([c for c, _ in curve])
        ms = np.array([s for _, s in curve]) * 1000
        k = 16   # running median keeps the lines readable on a noisy machine
        smooth = [np.median(ms[max(0, i - k): i + 1]) for i in range(len(ms))]
        ax.plot(ctx, smooth, label=peer)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode step time (ms, running median)")
    ax.set_title("SmolLM2-135M, batch 1, greedy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", default="smollm2", help="model name or GGUF path the peers load")
    ap.add_argument("--bundle", help="our bundle of the same model (ardeploy export smollm2 --out ...)")
    ap.add_argument("--peers", default=",".join(ALL_PEERS))
    ap.add_argument("--prompt-len", default="16,512")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--curve-tokens", type=int, default=0, help="also time every step of one long generation")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--plot", help="PNG of decode step time against context length")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.prompt_len = [int(x) for x in str(args.prompt_len).split(",") if x]
    return args


def run_worker(args) -> dict:
    """In the worker subprocess: one peer's measurements (or the ort-genai model export)."""
    worker = args.worker
    if worker in ("ours", "ours-concat", "ours-portable"):
        return worker_ours(args, concat=worker == "ours-concat", flavor="portable" if worker == "ours-portable" else "auto")
    if worker == "transformers":
        return worker_transformers(args)
    if worker == "ort-genai":
        return worker_ort_genai(args)
    if worker == "ort-genai-prepare":
        return {"folder": str(ort_genai_model(args))}
    return worker_llamacpp(args, worker.split("-")[1])


def run_peers(args, peers: list[str]) -> dict:
    """Each peer in its own subprocess; a missing or failing peer is reported and recorded, not fatal."""
    results = {}
    for peer in peers:
        why = missing(peer)
        if why:
            print(why, file=sys.stderr)
            results[peer] = {"error": why}
            continue
        print(f"running {peer} ...", file=sys.stderr, flush=True)
        results[peer] = run_peer(peer, args)
        if "system_info" in results[peer]:
            print(f"  {peer} system_info: {results[peer]['system_info'].strip()}", file=sys.stderr)
        for c in results[peer].get("configs", []):
            print(f"  {peer:14s} prompt {c['prompt_len']:5d}: first token {c['ttft_s'] * 1000:8.1f} ms, decode "
                  f"{c['decode_tokens_per_s']:6.1f} tok/s, peak RSS {results[peer]['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr)
        if "error" in results[peer]:
            print(f"  {peer}: failed: {results[peer]['error']}", file=sys.stderr)
    return results


def print_ratios(results: dict) -> None:
    print("\nratios ours / peer (decode tok/s: > 1 is better; first token: < 1 is better)")
    for peer, res in results.items():
        if peer == "ours" or "configs" not in res:
            continue
        for mine, theirs in zip(results["ours"]["configs"], res["configs"]):
            print(f"  vs {peer:14s} prompt {mine['prompt_len']:5d}: decode "
                  f"{mine['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:.2f}x, first token "
                  f"{mine['ttft_s'] / theirs['ttft_s']:.2f}x")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0

    from ardeploy.export.named_models import resolve
    from ardeploy.runtime.files import cache_dir
    args.gguf = resolve(args.model)
    args.cache = cache_dir()
    if not args.bundle:
        print("give --bundle (export one with: ardeploy export smollm2 --out bundles/smollm2)", file=sys.stderr)
        return 2
    peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in peers if p not in ALL_PEERS]
    if unknown:
        print(f"unknown peer {unknown[0]!r} (known: {', '.join(ALL_PEERS)})", file=sys.stderr)
        return 2
    results = run_peers(args, peers)
    if "ours" in results and "configs" in results["ours"]:
        print_ratios(results)
    if args.plot:
        print(plot(results, Path(args.plot)), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
