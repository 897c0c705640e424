"""A model whose INT4 weights exceed 2 GiB, calibrated w4a16 on the CPU: the >2 GB case end to end.

    python scripts/big_graph_check.py --work DIR [--layers 20] [--compute auto|numpy|torch] [--keep]

Writes a random-weight Hugging Face folder in the Llama-3-8B layer shape (hidden 4096, MLP 14336, 32 heads,
8 KV heads) with `--layers` layers and a 1024-token vocabulary -- 20 layers: 4.36 G linear parameters, so
INT4 weights of 2.18 GB, over protobuf's 2 GiB (the size at which `calibrate` of the Llama-3-8B shape failed
with "EncodeError: Failed to serialize proto") -- straight to safetensors, a tensor at a time (no torch model
in memory); exports it in fp16; deletes the folder; calibrates w4a16 RTN with the perplexity check (one window
of 32 tokens: the check's quantized score graph is the graph that failed); loads the quantized bundle with the
runtime and generates 4 greedy tokens. Prints one JSON line: seconds per step, peak RSS, INT4 bytes, tokens.
Disk: ~9 GB for the folder, ~9 GB for the bundle (the folder is deleted first), ~2.4 GB for the result;
everything under --work is deleted at the end unless --keep. Run by tests/test_quant_memory.py::test_over_2gb
when ARDEPLOY_TEST_BIG=1 (minutes: it is not part of the regular suite).
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             vocab_size=1024, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"],
             model_type="llama", torch_dtype="float16")


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    d, ff, hd = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["head_dim"]
    q, kv = SHAPE["num_attention_heads"] * hd, SHAPE["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (SHAPE["vocab_size"], d), "model.norm.weight": (d,),
              "lm_head.weight": (SHAPE["vocab_size"], d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                       p + "mlp.down_proj.weight": (d, ff), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    return shapes


def write_folder(folder: Path, layers: int) -> int:
    """config.json and model.safetensors (fp16, std 0.02 normals; norms near 1), written a chunk at a time."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**SHAPE, "num_hidden_layers": layers}))
    shapes = tensor_shapes(layers)
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    # one block of random values, written at a different start for each chunk: the file is written at disk
    # speed (the values only need to be unremarkable, not independent)
    pool = (np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32) * np.float32(0.02)).astype(np.float16)
    pool = np.concatenate([pool, pool])
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for i, (name, shape) in enumerate(shapes.items()):
            count = int(np.prod(shape))
            if len(shape) == 1:
                f.write((np.float16(1.0) + pool[:count]).tobytes())
                continue
            for j, start in enumerate(range(0, count, 1 << 24)):
                k = min(1 << 24, count - start)
                first = (7919 * (i + j)) % (1 << 24)
                f.write(pool[first: first + k].tobytes())
    return offset


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next((int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:")), 0)


def int4_bytes(bundle: Path) -> int:
    import onnx
    model = onnx.load(str(bundle / "score.onnx"), load_external_data=False)
    return sum(int({e.key: e.value for e in t.external_data}["length"]) for t in model.graph.initializer
               if t.data_type == onnx.TensorProto.INT4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="a folder for the model, bundles (~20 GB at the peak)")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--compute", default="auto")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    from ardeploy.calibration.quantize import CalibConfig, calibrate_bundle
    from ardeploy.export.bundle import export_path
    from ardeploy.runtime import Generator, SamplingConfig
    work = Path(a.work)
    hf, fp16, q = work / "hf", work / "fp16", work / "w4a16"
    seconds, t = {}, time.perf_counter()
    try:
        write_folder(hf, a.layers)
        seconds["write_folder"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        export_path(str(hf), fp16, dtype="fp16", max_seq=256, quiet=True)
        shutil.rmtree(hf)
        seconds["export"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        ids = np.random.default_rng(1).integers(3, SHAPE["vocab_size"], 32 * 3)
        m = calibrate_bundle(fp16, ids, q, CalibConfig("w4a16", int4_weights="rtn", samples=1, seq_len=32,
                                                       check_windows=1, keep_fp=None, progress=False,
                                                       compute=a.compute))
        seconds["calibrate"] = round(time.perf_counter() - t, 1)
        calibrate_peak = peak_rss()
        shutil.rmtree(fp16)
        t = time.perf_counter()
        gen = Generator.load(q, backend="ort")
        tokens = gen.generate(ids[:8].tolist(), SamplingConfig(greedy=True, max_new_tokens=4, ignore_eos=True)).token_ids
        seconds["load_and_generate"] = round(time.perf_counter() - t, 1)
        print(json.dumps({"layers": a.layers, "int4_bytes": int4_bytes(q), "weights_bytes": m["weights"]["bytes"],
                          "check": m["quantization"]["check"], "seconds": seconds, "calibrate_peak_rss": calibrate_peak,
                          "peak_rss": peak_rss(), "tokens": [int(x) for x in tokens],
                          "stages": json.loads((q / "calibration.json").read_text())["seconds"]}))
    finally:
        if not a.keep:
            for p in (hf, fp16, q):
                shutil.rmtree(p, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
