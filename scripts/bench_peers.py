"""The same workload through the tools users would pick instead, measured in the same run.

GPU: one command per model shape, each inside the GPU machine's 10-minute limit (--budget
stops the benchmark in time and leaves its JSON complete). Run them in the project root with ardeploy
importable (PYTHONPATH or pip --target) and the GPU wheels installed; fp16, random weights in the real
shapes (scripts/gpu_shapes.py), the same prompt ids for every peer. Times are estimates from the
export/build times and speeds in shared/reference/gpu_facts.md.

  # 1. SmolLM2-135M shape (~4-5 min: shape 15 s, export 20 s, ours + portable ~1 min,
  #    GenAI build ~30 s + two runs ~1 min, transformers eager ~1.5 min)
  S=/tmp/smol && python scripts/gpu_shapes.py smollm2-135m --out $S/hf \
    && python -m ardeploy.cli export $S/hf --out $S/b --dtype fp16 --max-seq 1024 --max-batch 8 \
    && python scripts/bench_peers.py --device cuda --hf $S/hf --bundle $S/b --scratch $S \
       --peers ours,ort-genai-graph,ort-genai,ours-portable,transformers --batch 1,4,8 --prompt-len 16,512 \
       --curve-tokens 896 --timeout 240 --budget 500 --json $OUT/smollm2.json
  # 2. Llama-3.2-1B shape, the same peers (~5-6 min: export 25 s, GenAI build ~1 min)
  S=/tmp/l1 && python scripts/gpu_shapes.py llama-3.2-1b --out $S/hf \
    && python -m ardeploy.cli export $S/hf --out $S/b --dtype fp16 --max-seq 1024 --max-batch 8 \
    && python scripts/bench_peers.py --device cuda --hf $S/hf --bundle $S/b --scratch $S \
       --peers ours,ort-genai-graph,ort-genai,ours-portable,transformers --batch 1,4,8 --prompt-len 16,512 \
       --curve-tokens 896 --timeout 240 --budget 480 --json $OUT/llama1b.json
  # 3, 4. transformers with static cache + torch.compile, one command per small shape (~3-5 min: the
  #    first compile about a minute, one more per batch size; no bundle needed); SHAPE = smollm2-135m,
  #    then llama-3.2-1b
  python scripts/gpu_shapes.py SHAPE --out /tmp/c/hf && python scripts/bench_peers.py --device cuda \
       --hf /tmp/c/hf --peers transformers-compile --batch 1,4,8 --prompt-len 16,512 --budget 500 \
       --json $OUT/compile-SHAPE.json
  # 5. Llama-3-8B shape: ours and GenAI + CUDA graph (~8 min: shape ~1 min for 16 GB, export ~70 s,
  #    ours ~1.5 min, GenAI build 2-3 min + run ~1.5 min; disk 3 x 16 GB of the 64). transformers
  #    eager (~2 min) and GenAI without the graph (~1.5 min) fit a second such command, not this one.
  S=/tmp/l8 && python scripts/gpu_shapes.py llama-3-8b --out $S/hf \
    && python -m ardeploy.cli export $S/hf --out $S/b --dtype fp16 --max-seq 1024 --max-batch 8 \
    && python scripts/bench_peers.py --device cuda --hf $S/hf --bundle $S/b --scratch $S \
       --peers ours,ort-genai-graph --batch 1,4,8 --prompt-len 16,512 --curve-tokens 896 \
       --timeout 330 --budget 400 --json $OUT/llama8b.json
  # then, on any machine with matplotlib (not the GPU machine):
  python scripts/plot_step_curve.py smollm2.json llama1b.json llama8b.json --out step_vs_context.png

The JSON is rewritten after every peer, so a command cut off keeps the peers that finished; a peer that
fails, or passes --timeout, is recorded with its error line (and the last lines of its log). It also
holds the machine (GPU name, driver, versions of torch, transformers, onnxruntime(-gpu),
onnxruntime-genai(-cuda)), the settings, and per configuration the first 16 greedy tokens of row 0
(ratios print how many leading tokens a peer shares with ours).

CPU:

    python scripts/bench_peers.py --model smollm2 --bundle bundles/smollm2 [--prompt-len 16,512]
        [--new-tokens 128] [--repeat 3] [--threads 2] [--peers ours,ours-concat,transformers,llamacpp-f32,...]
        [--curve-tokens 1536] [--json out.json] [--plot curve.png]
    python scripts/bench_peers.py --device cpu --hf HF_FOLDER --bundle B ...   (the GPU workload, on the CPU)

Peers (each runs in its own subprocess, so its memory is its own):
  ours          ardeploy runtime, ONNX Runtime, the bundle's ONNX Runtime graph (fused attention, cache in place);
                on the GPU (and for batches) through the public API: Generator.load(bundle, device=...) and its
                generation loop, greedy, EOS ignored
  ours-portable the same runtime on the bundle's portable graph (time-major cache, Concat inside the graph)
  ours-concat   ablation (CPU): the portable graphs, past K/V kept as growing arrays concatenated every step
                (what Optimum-style past/present exports do)
  transformers  transformers generate() with its KV cache, from the same GGUF (FP32) or --hf folder (fp16 on
                the GPU, FP32 on the CPU)
  transformers-compile
                the same with a static cache (generation_config.cache_implementation = "static"), whose decode
                step transformers compiles with torch.compile; warmed up at every batch size before timing
  llamacpp-q4_1 / llamacpp-q4_0 / llamacpp-f32 / llamacpp-f16
                llama.cpp (CPU) via llama-cpp-python on the shipped Q4_1 GGUF, on F32/F16 GGUFs written from
                the same (dequantized) weights, and on a Q4_0 GGUF quantized by llama.cpp from that F32 file
                (all cached next to it; llama.cpp's Q4_0 keeps SmolLM2's tied embedding/output at Q8_0). It must be
                built for this CPU (CMAKE_ARGS=-DGGML_NATIVE=ON; on a VM whose CPU reports AMX that build crashed
                with SIGSEGV, and one with GGML_NATIVE=OFF, the AVX-512 flags on and GGML_AMX_* off ran); its
                system_info is printed and recorded with its numbers.
  ort-genai     onnxruntime-genai on a model its own builder exports from the same weights: from the GGUF
                (FP32, CPU, cached: GGUF -> Hugging Face folder via transformers -> builder) or from --hf
                (`-p fp16 -e cuda` on the GPU, `-p fp32 -e cpu` on the CPU, into the scratch folder)
  ort-genai-graph
                the same GenAI model with CUDA graphs (the builder's enable_cuda_graph=true changes only the
                CUDA provider option in genai_config.json, so both read one build)
  ort-genai-int4 / ort-genai-int4-graph
                GenAI's INT4 build of --hf (`-p int4 -e cuda`: its MatMulNBits weights, RTN, block 32), without
                and with CUDA graphs: the peer of our w4a16 bundles on the GPU

Measured per peer, batch and prompt length (medians of --repeat runs): first token (prompt in, first token
chosen), decode tokens/s (tokens after the first / their time; batches: all rows' tokens) and the median
step; --curve-tokens: every step's time in one long batch-1 generation from a 16-token prompt (on the GPU
for ours and GenAI only). Each GPU peer hands its tokens to the host every step (as streaming does).
Nothing is installed silently: a missing peer is reported with the command that installs it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

DEFAULT_PEERS = ["ours", "ours-portable", "ours-concat", "transformers", "llamacpp-q4_1", "llamacpp-f32", "llamacpp-f16",
                 "ort-genai"]
GPU_PEERS = ["ours", "ours-portable", "transformers", "transformers-compile", "ort-genai", "ort-genai-graph"]
ALL_PEERS = [*DEFAULT_PEERS, "transformers-compile", "llamacpp-q4_0", "ort-genai-graph", "ort-genai-int4",
             "ort-genai-int4-graph"]
GENAI_PEERS = {"ort-genai", "ort-genai-graph", "ort-genai-int4", "ort-genai-int4-graph"}
CPU_ONLY = {"ours-concat", "llamacpp-q4_1", "llamacpp-q4_0", "llamacpp-f32", "llamacpp-f16"}
BATCH_ONE = CPU_ONLY                 # their loops feed one sequence
INSTALL = {
    "transformers": "pip install torch==2.13.0 transformers accelerate gguf",
    "llamacpp": 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python   (compiles llama.cpp for this CPU; '
                'several minutes)',
    "ort-genai": "pip install onnxruntime-genai torch==2.13.0 transformers gguf   (GPU: onnxruntime-genai-cuda)",
}
DISTRIBUTIONS = ["numpy", "torch", "transformers", "tokenizers", "onnx", "onnxruntime", "onnxruntime-gpu",
                 "onnxruntime-genai", "onnxruntime-genai-cuda", "llama_cpp_python", "ardeploy"]


def peak_rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(min(1000, vocab // 4), vocab - 1, n).tolist()


def batch_prompts(vocab: int, batch: int, n: int, seed: int) -> list[list[int]]:
    """`batch` different prompts of n tokens; row 0 is the batch-1 prompt of the same seed."""
    return [prompt_ids(vocab, n, seed + 1000 * row) for row in range(batch)]


# -- worker side: progress lines and per-configuration records go to stderr as they happen ----------------
def say(text: str) -> None:
    print("@@ " + text, file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    """One finished configuration, so the driver keeps it even if this worker dies later."""
    print("@@result " + json.dumps(record), file=sys.stderr, flush=True)


def describe(config: dict) -> str:
    if "error" in config:
        return f"batch {config.get('batch', 1)} prompt {config.get('prompt_len', '-')}: failed: {config['error']}"
    return (f"batch {config.get('batch', 1)} prompt {config['prompt_len']:5d}: first token {config['ttft_s'] * 1000:8.1f} "
            f"ms, decode {config['decode_tokens_per_s']:7.1f} tok/s, step {config['step_s'] * 1000:6.2f} ms")


def error_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:500]


def measure(args, vocab: int, generate, batch: int, prompt_len: int) -> dict:
    """generate may also return row 0's tokens: the first 16 of the first run are kept, so peers that ran
    the same weights can be seen to agree (random weights have near-ties: agreement fades after a while)."""
    runs, first_tokens = [], None
    for r in range(args.repeat):
        ttft, steps, *tokens = generate(batch_prompts(vocab, batch, prompt_len, r), args.new_tokens)
        if tokens and first_tokens is None:
            first_tokens = [int(t) for t in tokens[0][:16]]
        decode = sum(s for _, s in steps)
        runs.append({"ttft_s": ttft, "decode_tokens_per_s": batch * len(steps) / decode,
                     "step_s": statistics.median(s for _, s in steps)})
    record = {"prompt_len": prompt_len, "batch": batch, **{k: statistics.median(r[k] for r in runs) for k in runs[0]},
              "decode_tokens_per_s_range": [min(r["decode_tokens_per_s"] for r in runs),
                                            max(r["decode_tokens_per_s"] for r in runs)]}
    if first_tokens is not None:
        record["first_tokens"] = first_tokens
    return record


def run_workload(args, vocab, generate, batches=None, warmup=None, curve: bool = True) -> dict:
    """generate(rows, n) -> (first-token seconds, [(context after the step, seconds)] for the n-1 decode steps).
    warmup(batch), if given, runs before each batch size's measurements (compiled peers)."""
    if warmup is None:
        # on the GPU also the longest prompt: first uses of a shape (allocator growth, kernel choice) cost
        lengths = [16] + ([max(args.prompt_len)] if args.device == "cuda" else [])
        for n in lengths:
            generate([prompt_ids(vocab, n, 999)], 4)       # warm-up

        def warmup(batch):                             # a first run at each further batch size (graph captures)
            for n in lengths if batch > 1 else []:
                generate(batch_prompts(vocab, batch, n, 999), 4)
    out = {"configs": []}
    for batch in batches or [1]:
        try:
            say(f"warming up at batch {batch}")
            warmup(batch)
        except Exception as e:                         # noqa: BLE001 - recorded, the next batch size may work
            failed = error_line(e)
            for p in args.prompt_len:
                out["configs"].append({"prompt_len": p, "batch": batch, "error": "warm-up: " + failed})
                emit(out["configs"][-1])
            continue
        for p in args.prompt_len:
            try:
                record = measure(args, vocab, generate, batch, p)
            except Exception as e:                     # noqa: BLE001
                record = {"prompt_len": p, "batch": batch, "error": error_line(e)}
            out["configs"].append(record)
            emit(record)
    if curve and args.curve_tokens:
        say(f"step curve: {args.curve_tokens} tokens")
        out["curve"] = generate([prompt_ids(vocab, 16, 7)], args.curve_tokens)[1]
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def preload_cuda(device: str) -> None:
    """On the GPU machine ONNX Runtime's CUDA provider finds CUDA's libraries through torch's (import first)."""
    if device == "cuda":
        try:
            import torch  # noqa: F401
        except ImportError:
            pass


# -- workers: each returns run_workload's dict ------------------------------------------------------
def worker_ours(args, concat: bool, flavor: str = "auto"):
    from ardeploy.runtime.backends.ort import OrtBackend
    from ardeploy.runtime.bundle import Bundle
    from ardeploy.runtime.generator import Generator
    bundle = Bundle.load(args.bundle)
    backend = OrtBackend(bundle, threads=args.threads, flavor="portable" if concat else flavor)
    gen = Generator(bundle, backend, 1)          # its prompt feeding (in pieces), not its sampling loop
    vocab = bundle.vocab_size

    def generate(rows, n):
        ids = rows[0]
        arena = gen.arena
        arena.reset(1)
        started = time.perf_counter()
        x = np.asarray([ids], dtype=np.int64)
        if concat:
            sess = backend.session("prefill")
            outs = sess.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})
            logits, past = outs[0], outs[1:]
        else:
            logits = gen.batch.start([list(ids)], bundle.pad_id)
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
                logits = gen.batch.feed(x)
            tok = int(np.argmax(logits[0]))
            length += 1
            steps.append((length, time.perf_counter() - step_started))
        return first_token_at - started, steps
    return {**run_workload(args, vocab, generate), "loop": "steps", "device": "cpu"}


def worker_ours_runtime(args, flavor: str = "auto"):
    """Our runtime through its public API (Generator.load + its own generation loop, greedy, EOS ignored):
    what the GPU path (device-resident I/O, captured decode graph) is measured through."""
    preload_cuda(args.device)
    from ardeploy.runtime import Generator, SamplingConfig
    from ardeploy.runtime.bundle import Bundle
    from ardeploy.runtime.generator import Run
    max_batch = min(max(args.batch), Bundle.load(args.bundle).max_batch)
    started = time.perf_counter()
    gen = Generator.load(args.bundle, max_batch=max_batch, device=args.device, flavor=flavor,
                         threads=args.threads if args.device == "cpu" else None)
    say(f"loaded on {args.device} in {time.perf_counter() - started:.1f} s (max batch {max_batch})")

    def generate(rows, n):
        cfg = SamplingConfig(greedy=True, max_new_tokens=n, ignore_eos=True)
        stamps, tokens, begun = [], [], time.perf_counter()
        for count, event in enumerate(Run(gen.events(rows, cfg)), start=1):
            if count % len(rows) == 0:             # every row has its token of this step
                stamps.append(time.perf_counter())
            if event.row == 0:
                tokens.append(event.token)
        steps = [(len(rows[0]) + i + 1, b - a) for i, (a, b) in enumerate(zip(stamps, stamps[1:]))]
        return stamps[0] - begun, steps, tokens
    result = run_workload(args, gen.bundle.vocab_size, generate, args.batch)
    return {**result, "loop": "runtime", "device": args.device, "graph": gen.backend.graph}


def load_transformers(args, compiled: bool):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    if args.hf:
        dtype = torch.float16 if args.device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=dtype).to(args.device).eval()
    else:
        gguf = Path(args.gguf)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    if compiled:
        from transformers.generation import CompileConfig
        model.generation_config.cache_implementation = "static"
        # transformers' defaults (reduce-overhead, inductor) but static shapes: each batch size gets a graph
        # of its own rather than one with a symbolic batch dimension after the second size
        model.generation_config.compile_config = CompileConfig(dynamic=False)
        if args.device != "cuda":          # transformers compiles only on accelerators unless told to
            model.generation_config.compile_config._compile_all_devices = True
    return model


def worker_transformers(args, compiled: bool = False):
    import torch
    from transformers.generation.streamers import BaseStreamer
    model = load_transformers(args, compiled)
    vocab = model.config.vocab_size
    cuda = args.device == "cuda"

    @torch.no_grad()
    def generate(rows, n):
        # generate()'s own loop, timed per token by a streamer callback
        times = []

        class Clock(BaseStreamer):
            def put(self, value):
                if cuda:
                    torch.cuda.synchronize()      # generate() already waits for each token; make it certain
                times.append(time.perf_counter())

            def end(self):
                pass
        model.generation_config.eos_token_id = None
        ids = torch.tensor(rows, device=args.device)
        started = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, streamer=Clock())
        tokens = times[1:]           # the first put() is the prompt
        steps = [(len(rows[0]) + i + 1, b - a) for i, (a, b) in enumerate(zip(tokens, tokens[1:]))]
        return tokens[0] - started, steps, out[0, len(rows[0]):].tolist()

    def warmup(batch):
        # the static cache keeps its largest length, so the longest run first fixes the compiled shapes
        for p in sorted(args.prompt_len, reverse=True):
            generate(batch_prompts(vocab, batch, p, 99), args.new_tokens)
    result = run_workload(args, vocab, generate, args.batch, warmup if compiled else None,
                          curve=not (cuda or compiled))
    if compiled:       # one graph per batch size means nothing was recompiled while being timed
        from torch._dynamo.utils import counters
        result["compiled_graphs"] = counters["stats"].get("unique_graphs", 0)
        say(f"torch.compile made {result['compiled_graphs']} graphs for {len(args.batch)} batch sizes")
    return {**result, "device": args.device, "dtype": str(model.dtype),
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


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


def write_q4_0_gguf(src: Path, dst: Path, threads: int) -> None:
    """llama.cpp's own Q4_0 quantization of the F32 file (its default choices for the other tensors)."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    partial = str(dst) + ".partial"
    status = llama_cpp.llama_model_quantize(str(src).encode(), partial.encode(), llama_cpp.byref(params))
    if status != 0 or not Path(partial).exists():
        Path(partial).unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> Q4_0) returned {status}")
    os.replace(partial, dst)


def llamacpp_file(args, variant: str) -> Path:
    """The GGUF of `variant` (q4_1: the shipped file; the others written once into the cache)."""
    path = Path(args.gguf)
    if variant == "q4_1":
        return path
    stem = path.stem.split('.')[0]
    converted = Path(args.cache) / f"{stem}.{variant.upper()}.gguf"
    if converted.exists():
        return converted
    if variant == "q4_0":
        f32 = llamacpp_file(args, "f32")
        say(f"quantizing {f32.name} to Q4_0")
        write_q4_0_gguf(f32, converted, args.threads)
    else:
        write_dequantized_gguf(path, converted, variant)
    return converted


def worker_llamacpp(args, variant: str):
    from llama_cpp import Llama
    path = llamacpp_file(args, variant)
    max_len = max(args.prompt_len) + args.new_tokens + 8
    llm = Llama(model_path=str(path), n_ctx=max(max_len, args.curve_tokens + 32), n_threads=args.threads,
                n_batch=512, verbose=False, logits_all=False)
    vocab = llm.n_vocab()
    import llama_cpp
    system_info = llama_cpp.llama_print_system_info().decode()

    def last_logits():
        # without logits_all, llama-cpp-python keeps no scores: read the context's last row directly
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    def generate(rows, n):
        ids = rows[0]
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
    return {**run_workload(args, vocab, generate), "system_info": system_info, "file": path.name}


def ort_genai_model(args) -> Path:
    """onnxruntime-genai's own FP32 CPU export of the GGUF's weights, made once into the cache."""
    out = Path(args.cache) / f"ort-genai-{Path(args.gguf).name.split('.')[0]}-fp32"
    if (out / "genai_config.json").exists():
        return out
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
        run_builder(work / "hf", work / "out", "fp32", "cpu", work / "cache", work / "builder.log")
        os.replace(work / "out", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def run_builder(hf: Path, out: Path, precision: str, ep: str, cache: Path, log: Path) -> None:
    """onnxruntime-genai's model builder; its output goes to `log` (the last error line is raised)."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", precision,
           "-e", ep, "-c", str(cache)]
    say("building: " + " ".join(cmd[1:]))
    started = time.perf_counter()
    with open(log, "w") as sink:
        done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError("the GenAI builder failed: " + last_error(log.read_text().splitlines()))
    say(f"built in {time.perf_counter() - started:.0f} s")


def genai_precision(args, peer: str) -> str:
    """The builder's -p for a GenAI peer: int4 for the -int4 peers, else fp16 on the GPU and fp32 on the CPU."""
    if "-int4" in peer:
        return "int4"
    return "fp16" if args.device == "cuda" else "fp32"


def genai_build_dir(args, peer: str) -> Path:
    return Path(args.scratch_dir) / f"ort-genai-{genai_precision(args, peer)}"


def prepare_genai(args, peer: str) -> Path:
    """The GenAI model of --hf for `peer`, built once per precision into the scratch folder."""
    out = genai_build_dir(args, peer)
    if (out / "genai_config.json").exists():
        return out
    cuda = args.device == "cuda"
    work = Path(args.scratch_dir) / "ort-genai-build"
    shutil.rmtree(work, ignore_errors=True)     # a build cut off earlier in this run
    work.mkdir(parents=True)
    run_builder(Path(args.hf), work / "out", genai_precision(args, peer), "cuda" if cuda else "cpu", work / "cache",
                work / "builder.log")
    os.replace(work / "out", out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def cuda_graph_variant(folder: Path) -> Path:
    """A sibling folder of links to the same files, whose genai_config.json turns the CUDA provider's
    enable_cuda_graph on: all that the builder's --extra_options enable_cuda_graph=true changes (its
    0.18 output with and without that option differs in that one value)."""
    out = folder.parent / (folder.name + "-graph")
    if (out / "genai_config.json").exists():
        return out
    out.mkdir(exist_ok=True)
    for item in folder.iterdir():
        if item.name != "genai_config.json" and not (out / item.name).exists():
            try:
                os.link(item, out / item.name)           # a hard link: the same bytes, no path to resolve
            except OSError:
                (out / item.name).symlink_to(item.resolve())
    cfg = json.loads((folder / "genai_config.json").read_text())
    set_cuda_graph(cfg)
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def set_cuda_graph(cfg: dict) -> None:
    providers = cfg["model"]["decoder"].setdefault("session_options", {}).setdefault("provider_options", [])
    cuda = [p for p in providers if "cuda" in p]
    if not cuda:
        raise RuntimeError("the GenAI model has no CUDA provider options (was it built with -e cuda?)")
    cuda[0]["cuda"]["enable_cuda_graph"] = "1"


def worker_ort_genai(args, peer: str):
    preload_cuda(args.device)
    import onnxruntime_genai as og
    graph = peer.endswith("-graph")
    folder = prepare_genai(args, peer) if args.hf else ort_genai_model(args)
    if graph:
        folder = cuda_graph_variant(folder)
    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    if args.device == "cpu":
        opts = cfg["model"]["decoder"].setdefault("session_options", {})
        if opts.get("intra_op_num_threads") != args.threads:
            opts["intra_op_num_threads"] = args.threads
            cfg_path.write_text(json.dumps(cfg, indent=2))
    started = time.perf_counter()
    model = og.Model(str(folder))
    say(f"loaded in {time.perf_counter() - started:.1f} s")
    vocab = cfg["model"]["vocab_size"]
    max_len = max(max(args.prompt_len) + args.new_tokens, args.curve_tokens + 16) + 8
    sync = args.device == "cuda"

    def generate(rows, n):
        params = og.GeneratorParams(model)
        options = {"do_sample": False, "max_length": max_len, "batch_size": len(rows)}
        if args.hf:
            options["min_length"] = max_len          # random weights may pick the EOS id: never stop early
        params.set_search_options(**options)
        gen = og.Generator(model, params)
        started = time.perf_counter()
        gen.append_tokens(np.array(rows, np.int32))    # runs the prompt
        gen.generate_next_token()                      # picks the first token from its logits
        if sync:
            gen.get_next_tokens()                      # the tokens on the host: the step is finished
        first_token_at = time.perf_counter()
        steps = []
        for i in range(n - 1):
            step_started = time.perf_counter()
            gen.generate_next_token()                  # one decode step + argmax
            if sync:
                gen.get_next_tokens()
            steps.append((len(rows[0]) + i + 1, time.perf_counter() - step_started))
        return first_token_at - started, steps, list(gen.get_sequence(0)[len(rows[0]):])
    batches = args.batch if args.hf else [1]
    return {**run_workload(args, vocab, generate, batches), "device": args.device, "cuda_graph": graph}


def worker_facts(args) -> dict:
    """Versions and the machine, for the JSON (in a worker: the driver never holds a CUDA context)."""
    import platform
    from importlib import metadata
    facts = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        facts["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                            if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    facts["versions"] = {}
    for dist in DISTRIBUTIONS:
        try:
            facts["versions"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if args.device == "cuda":
        facts.update(gpu_facts())
    return facts


def gpu_facts() -> dict:
    out = {}
    try:
        import torch
        out["gpu"] = torch.cuda.get_device_name(0)
        out["torch_cuda"] = torch.version.cuda
        out["gpu_memory_mib"] = torch.cuda.get_device_properties(0).total_memory // 2**20
    except Exception as e:                                     # noqa: BLE001 - a fact missing, not a failure
        out["gpu_error"] = error_line(e)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        if smi and "," in smi[0]:
            out["driver"] = smi[0].rsplit(",", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import onnxruntime as ort
        out["onnxruntime_providers"] = ort.get_available_providers()
    except Exception as e:                                     # noqa: BLE001
        out["onnxruntime_error"] = error_line(e)
    return out


def run_worker(args) -> dict:
    """In the worker subprocess: one peer's measurements (or a preparation step)."""
    worker = args.worker
    if worker == "facts":
        return worker_facts(args)
    if worker in ("ours", "ours-portable") and args.ours_loop == "runtime":
        return worker_ours_runtime(args, flavor="portable" if worker == "ours-portable" else "auto")
    if worker in ("ours", "ours-concat", "ours-portable"):
        return worker_ours(args, concat=worker == "ours-concat", flavor="portable" if worker == "ours-portable" else "auto")
    if worker in ("transformers", "transformers-compile"):
        return worker_transformers(args, compiled=worker == "transformers-compile")
    if worker in GENAI_PEERS:
        return worker_ort_genai(args, worker)
    if worker == "ort-genai-prepare":
        return {"folder": str(prepare_genai(args, args.genai_peer) if args.hf else ort_genai_model(args))}
    return worker_llamacpp(args, worker.split("-")[1])


def run_worker_noted(args) -> dict:
    result = run_worker(args)
    if args.worker in BATCH_ONE and args.batch != [1]:
        result["note"] = "batch 1 only"
    return result


# -- driver -------------------------------------------------------------------------------------------
def missing(peer: str) -> str | None:
    import importlib.util
    genai = ["onnxruntime_genai", "torch", "transformers", "gguf"]
    hf_gguf = ["torch", "transformers", "gguf", "accelerate"]
    need = {"transformers": hf_gguf, "transformers-compile": hf_gguf, **{p: genai for p in GENAI_PEERS}}
    mods = need.get(peer, ["llama_cpp"] if peer.startswith("llamacpp") else [])
    lacking = [m for m in mods if importlib.util.find_spec(m) is None]
    if not lacking:
        return None
    key = "llamacpp" if peer.startswith("llamacpp") else \
        "ort-genai" if peer in GENAI_PEERS else peer.replace("-compile", "")
    return f"{peer}: missing {', '.join(lacking)} — install with: {INSTALL[key]}"


def missing_for(peer: str, args) -> str | None:
    """What keeps `peer` from running with these options (None: nothing)."""
    if args.device == "cuda" and peer in CPU_ONLY:
        return f"{peer}: runs on the CPU only (drop it, or use --device cpu)"
    if peer.endswith("-graph") and args.device != "cuda":
        return f"{peer}: CUDA graphs need --device cuda"
    if peer.startswith("ours") and not args.bundle:
        return f"{peer}: give --bundle (export one with: ardeploy export HF --out BUNDLE)"
    if args.hf and (peer.startswith("transformers") or peer.startswith("ort-genai")):
        # they read the Hugging Face folder: no GGUF reader needed
        import importlib.util
        mods = ["torch", "transformers"] + (["onnxruntime_genai"] if peer.startswith("ort-genai") else [])
        lacking = [m for m in mods if importlib.util.find_spec(m) is None]
        key = "ort-genai" if peer.startswith("ort-genai") else "transformers"
        return f"{peer}: missing {', '.join(lacking)} — install with: {INSTALL[key]}" if lacking else None
    return missing(peer)


def last_error(lines: list[str]) -> str:
    """The line that says what went wrong: the last exception line of a traceback, else the last line."""
    lines = [line.rstrip() for line in lines if line.strip()]
    pattern = re.compile(r"^([A-Za-z_][\w.]*)?(Error|Exception|Interrupt|Exit|Fail)\w*(:|$)")
    for line in reversed(lines):
        if pattern.match(line.strip()):
            return line.strip()[:500]
    return lines[-1].strip()[:500] if lines else "(no output)"


def run_subprocess(cmd: list[str], timeout: float | None, label: str) -> dict:
    """Run one worker; relay its progress lines live, keep its per-configuration records, kill its whole
    process group after `timeout` seconds. Returns its result, or {"error", "log_tail", "configs"}."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    tail, records, stdout = deque(maxlen=40), [], []

    def relay():
        for line in proc.stderr:
            if line.startswith("@@result "):
                try:
                    records.append(json.loads(line[len("@@result "):]))
                except ValueError:
                    continue
                print(f"  {label:20s} {describe(records[-1])}", file=sys.stderr, flush=True)
            elif line.startswith("@@ "):
                print(f"  {label:20s} {line[3:].rstrip()}", file=sys.stderr, flush=True)
            else:
                tail.append(line.rstrip())
    readers = [threading.Thread(target=relay, daemon=True),
               threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)]
    for reader in readers:
        reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout or None)
    except subprocess.TimeoutExpired:
        timed_out = True
    except BaseException:                      # Ctrl-C: leave no worker behind
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if timed_out:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for reader in readers:
        reader.join(timeout=10)
    result = last_json(stdout) if proc.returncode == 0 else None
    if result is not None:
        return result
    if timed_out:
        why = f"timed out after {timeout:.0f} s (--timeout or --budget)"
    elif proc.returncode == 0:
        why = "the worker printed no result"
    elif proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}; last line: {last_error(list(tail))}"
    else:
        why = last_error(list(tail))
    return {"error": why, "log_tail": list(tail)[-15:], "configs": records}


def last_json(lines: list[str]) -> dict | None:
    for line in reversed(lines):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def worker_command(worker: str, args, genai_peer: str | None = None) -> list[str]:
    spec = {k: getattr(args, k) for k in ("bundle", "gguf", "cache", "hf", "device", "prompt_len", "batch", "new_tokens",
                                           "repeat", "threads", "curve_tokens", "ours_loop", "scratch_dir")}
    spec["genai_peer"] = genai_peer
    return [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--spec", json.dumps(spec)]


def time_left(args) -> float | None:
    """Seconds the next subprocess may run: --timeout, cut to what --budget leaves (None: no limit)."""
    limits = [args.timeout] if args.timeout else []
    if args.deadline is not None:
        limits.append(max(1.0, args.deadline - time.monotonic()))
    return min(limits) if limits else None


def run_peer(peer: str, args) -> dict:
    if peer.startswith("ort-genai") and not (args.hf and (genai_build_dir(args, peer) / "genai_config.json").exists()):
        # its model is built in another process first, so the timed one's RSS is its own
        prep = run_subprocess(worker_command("ort-genai-prepare", args, peer), time_left(args), peer + " (build)")
        if "error" in prep:
            return {"error": "its model builder failed: " + prep["error"], "log_tail": prep.get("log_tail", [])}
    started = time.perf_counter()
    result = run_subprocess(worker_command(peer, args), time_left(args), peer)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def settings(args, peers: list[str]) -> dict:
    keys = ("device", "model", "hf", "bundle", "prompt_len", "batch", "new_tokens", "repeat", "threads", "curve_tokens",
            "timeout", "budget", "ours_loop")
    out = {k: getattr(args, k) for k in keys}
    out["peers"] = peers
    if not args.gguf:
        out["model"] = None                   # the peers read --hf (and ours its bundle)
    marker = Path(args.hf or "-") / "gpu_shape.json"
    if marker.exists():
        out.update(json.loads(marker.read_text()))
    if args.hf and (Path(args.hf) / "config.json").exists():
        cfg = json.loads((Path(args.hf) / "config.json").read_text())
        out["hf_config"] = {k: cfg.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                   "tie_word_embeddings", "dtype")}
    return out


def write_json(results: dict, path: str | None) -> None:
    if path:
        tmp = Path(str(path) + ".partial")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, path)


def run_peers(args, peers: list[str], results: dict) -> dict:
    """Each peer in its own subprocess; a missing or failing peer is reported and recorded, not fatal.
    The JSON is rewritten after every peer."""
    for peer in peers:
        why = missing_for(peer, args)
        if not why and args.deadline is not None and args.deadline - time.monotonic() < 15:
            why = f"{peer}: skipped, --budget {args.budget:.0f} s spent"
        if why:
            print(why, file=sys.stderr, flush=True)
            results[peer] = {"error": why}
            write_json(results, args.json)
            continue
        print(f"running {peer} ...", file=sys.stderr, flush=True)
        results[peer] = run_peer(peer, args)
        res = results[peer]
        if "system_info" in res:
            print(f"  {peer} system_info: {res['system_info'].strip()}", file=sys.stderr, flush=True)
        if "error" in res:
            print(f"  {peer}: failed: {res['error']}", file=sys.stderr, flush=True)
        else:
            print(f"  {peer}: done in {res.get('wall_s', 0):.0f} s, peak RSS {res.get('peak_rss_mib', 0):.0f} MiB",
                  file=sys.stderr, flush=True)
        write_json(results, args.json)
    return results


def print_ratios(results: dict) -> None:
    print("\nratios ours / peer (decode tok/s: > 1 is better; first token: < 1 is better)", flush=True)
    mine = {(c.get("batch", 1), c["prompt_len"]): c for c in results["ours"]["configs"] if "error" not in c}
    for peer, res in results.items():
        if peer == "ours" or not isinstance(res, dict) or "configs" not in res:
            continue
        for theirs in res["configs"]:
            key = (theirs.get("batch", 1), theirs.get("prompt_len"))
            if "error" in theirs or key not in mine:
                continue
            ours = mine[key]
            print(f"  vs {peer:20s} batch {key[0]} prompt {key[1]:5d}: decode "
                  f"{ours['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:.2f}x, first token "
                  f"{ours['ttft_s'] / theirs['ttft_s']:.2f}x{agreement(ours, theirs)}", flush=True)


def agreement(ours: dict, theirs: dict) -> str:
    """How many leading greedy tokens of row 0 two peers share (when both recorded them)."""
    a, b = ours.get("first_tokens"), theirs.get("first_tokens")
    if not a or not b:
        return ""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f", same first {same}/{min(len(a), len(b))} tokens"


def plot(results: dict, path: Path) -> str:
    from plot_step_curve import plot as plot_curves
    return plot_curves([(path, results)], path)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", default="smollm2", help="model name or GGUF path the peers load (without --hf)")
    ap.add_argument("--hf", help="a Hugging Face folder the transformers and GenAI peers load instead "
                                 "(e.g. from scripts/gpu_shapes.py); needed with --device cuda")
    ap.add_argument("--bundle", help="our bundle of the same model (ardeploy export ... --out BUNDLE)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--peers", help=f"comma-separated (default on the CPU: {','.join(DEFAULT_PEERS)}; "
                                    f"with --device cuda: {','.join(GPU_PEERS)}); all: {','.join(ALL_PEERS)}")
    ap.add_argument("--prompt-len", default="16,512")
    ap.add_argument("--batch", default="1", help="batch sizes, e.g. 1,4,8 (aggregate decode tok/s; "
                                                 "llama.cpp and ours-concat run batch 1 only)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--curve-tokens", type=int, default=0, help="also time every step of one long generation")
    ap.add_argument("--timeout", type=float, default=0, help="seconds per peer subprocess (0: none)")
    ap.add_argument("--budget", type=float, default=0,
                    help="seconds for the whole run (0: none): the peer running when it is spent is stopped, "
                         "later ones are skipped, and the JSON is complete before an outer limit kills the command")
    ap.add_argument("--scratch", help="folder under which this run's scratch folder (GenAI builds) is made and "
                                      "removed at the end (default: the system's temporary folder)")
    ap.add_argument("--ours-loop", choices=["steps", "runtime"],
                    help="ours: time backend steps (the CPU default at batch 1) or the runtime's own loop "
                         "(the default on the GPU and for batches)")
    ap.add_argument("--json", help="write all results here (rewritten after every peer)")
    ap.add_argument("--plot", help="PNG of decode step time against context length (needs matplotlib)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.spec:                                     # a worker: the driver's settings, as it resolved them
        for key, value in json.loads(args.spec).items():
            setattr(args, key, value)
        return args
    args.prompt_len = [int(x) for x in str(args.prompt_len).split(",") if x]
    args.batch = [int(x) for x in str(args.batch).split(",") if x]
    args.ours_loop = args.ours_loop or ("steps" if args.device == "cpu" and args.batch == [1] else "runtime")
    args.gguf = args.cache = args.scratch_dir = None
    args.deadline = time.monotonic() + args.budget if args.budget else None
    return args


def check_args(args, peers: list[str]) -> str | None:
    """One line saying what is wrong with the options, or None."""
    unknown = [p for p in peers if p not in ALL_PEERS]
    if unknown:
        return f"unknown peer {unknown[0]!r} (known: {', '.join(ALL_PEERS)})"
    for option, values in (("--prompt-len", args.prompt_len), ("--batch", args.batch),
                           ("--new-tokens", [args.new_tokens]), ("--repeat", [args.repeat])):
        if not values or min(values) < 1:
            return f"{option} must be at least 1"
    if args.new_tokens < 2:
        return "--new-tokens must be at least 2 (decode speed needs a step after the first token)"
    if args.hf and not (Path(args.hf) / "config.json").exists():
        return f"{args.hf}: not a Hugging Face folder (no config.json)"
    if args.device == "cuda" and not args.hf and any(not p.startswith("ours") for p in peers):
        return "--device cuda: give --hf HF_FOLDER for the peers (scripts/gpu_shapes.py writes one)"
    if not args.bundle and not args.hf:
        return "give --bundle (export one with: ardeploy export smollm2 --out bundles/smollm2)"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker_noted(args)), flush=True)
        return 0
    peers = [p for p in (args.peers or ",".join(GPU_PEERS if args.device == "cuda" else DEFAULT_PEERS)).split(",") if p]
    problem = check_args(args, peers)
    if problem:
        print(f"bench_peers.py: {problem}", file=sys.stderr)
        return 2
    from ardeploy.runtime.files import cache_dir
    args.cache = str(cache_dir())
    if any(p.startswith("llamacpp") or (not args.hf and p.startswith(("transformers", "ort-genai"))) for p in peers):
        from ardeploy.export.named_models import resolve
        try:
            args.gguf = str(resolve(args.model))
        except Exception as e:                         # noqa: BLE001 - one line, like every other refusal
            print(f"bench_peers.py: --model {args.model}: {error_line(e)}", file=sys.stderr)
            return 2
    if args.scratch:
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
    args.scratch_dir = tempfile.mkdtemp(prefix="bench-peers-", dir=args.scratch)
    try:
        results = {"settings": settings(args, peers)}
        results["machine"] = run_subprocess(worker_command("facts", args), 120, "facts")
        print(f"machine: {json.dumps(results['machine'])}", file=sys.stderr, flush=True)
        write_json(results, args.json)
        run_peers(args, peers, results)
    finally:
        shutil.rmtree(args.scratch_dir, ignore_errors=True)
    if "configs" in results.get("ours", {}):
        print_ratios(results)
    if args.plot:
        print(plot(results, Path(args.plot)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
