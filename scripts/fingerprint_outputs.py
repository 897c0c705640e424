"""Fingerprints of what the runtime and calibration produce, to show a refactor changed no output.

    python scripts/fingerprint_outputs.py --out after.json
    PYTHONPATH=/path/to/old/package python scripts/fingerprint_outputs.py --out before.json   # an older tree
    python scripts/fingerprint_outputs.py --compare before.json after.json

Every entry is a SHA-256 of exact bytes (token ids, float32 logits of every step, image codes, quantized
weight files and graphs), so "the same" means bit-identical. It uses only the public API that older
versions share (Generator.load / ImageGenerator.load keywords, verify's run_bundle_greedy, calibrate_bundle),
and the tests' tiny random models (tests/conftest.py, the image tests' builders); models are made and
exported fresh in a scratch folder, so both trees see the same inputs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
TINY = ["gqa_tied_llama3_bias", "mha_untied_theta", "gqa8x2_untied_linear", "qwen3_qknorm"]


def digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else json.dumps(part).encode())
    return h.hexdigest()[:16]


def text_entries(scratch: Path) -> dict:
    from ardeploy.export.bundle import export_path
    from ardeploy.export.verify import run_bundle_greedy
    from ardeploy.runtime import Generator, SamplingConfig
    from ardeploy.runtime.backends.ort import OrtBackend
    from ardeploy.runtime.bundle import Bundle
    from conftest import make_hf_model, rng_ids
    out = {}
    greedy = SamplingConfig(greedy=True, max_new_tokens=24, ignore_eos=True)
    sampled = SamplingConfig(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=3,
                             max_new_tokens=24, ignore_eos=True)
    prompts = [rng_ids(12, seed=31), rng_ids(5, seed=32)]
    for name in TINY:
        make_hf_model(name).save_pretrained(scratch / f"hf_{name}")
        bundle = scratch / f"b_{name}"
        export_path(scratch / f"hf_{name}", bundle, quiet=True, max_seq=128, max_batch=2)
        for flavor in ("ort", "portable"):
            gen = Generator.load(bundle, threads=2, flavor=flavor)
            key = f"text/{name}/{flavor}"
            out[key + "/greedy-b1"] = digest([r.token_ids for r in gen.generate([prompts[0]], greedy)])
            out[key + "/greedy-b2"] = digest([r.token_ids for r in gen.generate(prompts, greedy)])
            out[key + "/sampled-b2"] = digest([r.token_ids for r in gen.generate(prompts, sampled)])
            chunked = Generator.load(bundle, threads=2, flavor=flavor, prefill_chunk=8)
            long = [rng_ids(40, seed=5), rng_ids(19, seed=6)]
            out[key + "/chunked-b2"] = digest([r.token_ids for r in chunked.generate(long, greedy)])
            tokens, logits = run_bundle_greedy(OrtBackend(Bundle.load(bundle), threads=2, flavor=flavor),
                                               Bundle.load(bundle), prompts[0], 16)
            out[key + "/verify-logits"] = digest(tokens, np.stack(logits).astype(np.float32))
    return out


def chat_entries(scratch: Path) -> dict:
    from ardeploy.export.bundle import export_path
    from ardeploy.export.named_models import resolve
    from ardeploy.runtime import ChatSession, Generator, SamplingConfig
    bundle = scratch / "smollm2"
    export_path(resolve("smollm2"), bundle, quiet=True, max_seq=512, max_batch=1)
    session = ChatSession(Generator.load(bundle, threads=2))
    cfg = SamplingConfig(greedy=True, max_new_tokens=16)
    turns = ["Name a river in Europe.", "And one in Asia?"]
    return {"chat/smollm2": digest([[*session.turn(t, cfg)] for t in turns])}


def image_entries(scratch: Path) -> dict:
    import torch
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageRequest, ImageSettings
    import test_image_emu3 as emu3
    import test_image_llamagen as lg
    from ardeploy.export.bundle import export_path
    import argparse as ap
    out = {}
    torch.manual_seed(1)
    ref = lg.RefLlamaGen("c2i").eval()
    vq = lg.janus_vq()
    d = scratch / "c2i"
    d.mkdir()
    torch.save({"model": ref.gpt_state_dict(), "steps": 5, "args": ap.Namespace(gpt_model="tiny")}, d / "gpt.pt")
    torch.save({"model": lg.janus_to_llamagen(vq.state_dict())}, d / "vq.pt")
    export_path(d / "gpt.pt", d / "bundle", family="llamagen-c2i", quiet=True, score_graph=False, max_batch=4,
                family_options={"image_size": lg.IMAGE, "vq": str(d / "vq.pt"), "n_head": lg.HEADS})
    settings = ImageSettings(Guidance(4.0), SamplingConfig(top_k=10, temperature=0.9), seed=0)
    for flavor in ("ort", "portable"):
        gen = ImageGenerator.load(d / "bundle", threads=2, flavor=flavor)
        results = gen.generate([ImageRequest(class_id=c) for c in (1, 7, 3)], settings)
        out[f"image/llamagen-c2i/{flavor}"] = digest(np.stack([r.codes for r in results]),
                                                     np.stack([r.image for r in results]))
    model = emu3.make_emu3()
    model.save_pretrained(scratch / "emu3_hf")
    emu3.write_tokenizer(scratch / "emu3_hf", emu3.vocabulary())
    export_path(scratch / "emu3_hf", scratch / "emu3", quiet=True, score_graph=False, max_seq=128)
    gen = ImageGenerator.load(scratch / "emu3", threads=2)
    results = gen.generate([ImageRequest(prompt_ids=[emu3.BOS, 20, 33, 41])],
                           ImageSettings(Guidance(3.0), SamplingConfig(top_k=8), seed=1, size=(8, 8)), decode=False)
    out["image/emu3"] = digest(np.stack([r.codes for r in results]), [r.token_ids for r in results])
    return out


def graph_bytes(path: Path) -> np.ndarray:
    """A file's bytes; for a graph, without the exporter's per-node metadata (stack traces name the
    source tree's paths, which differ between the two trees compared)."""
    if path.suffix != ".onnx":
        return np.frombuffer(path.read_bytes(), np.uint8)
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        del node.metadata_props[:]
    return np.frombuffer(model.SerializeToString(), np.uint8)


def calibration_entries(scratch: Path) -> dict:
    from ardeploy.calibration.quantize import CalibConfig, calibrate_bundle
    ids = np.random.default_rng(0).integers(3, 256, 64 * 16)
    out = {}
    for scheme, extra in (("w8a16", {}), ("w8a8", {}), ("w4a16", {"int4_weights": "awq-gptq"}),
                          ("w8a16", {"weight_method": "gptq"})):
        name = scheme + ("-gptq" if extra.get("weight_method") == "gptq" else "")
        q = scratch / f"q_{name}"
        calibrate_bundle(scratch / "b_gqa8x2_untied_linear", ids, q,
                         CalibConfig(scheme=scheme, samples=8, seq_len=64, check_windows=0, progress=False, **extra))
        files = sorted(p for p in q.iterdir() if p.suffix in (".bin", ".onnx"))
        out[f"calibration/{name}"] = digest([p.name for p in files], *[graph_bytes(p) for p in files])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the fingerprints here (JSON)")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two fingerprint files")
    p.add_argument("--skip", default="", help="comma-separated groups to skip: text, chat, image, calibration")
    args = p.parse_args()
    if args.compare:
        before, after = (json.loads(Path(f).read_text()) for f in args.compare)
        differ = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
        missing = sorted(before.keys() ^ after.keys())
        print(f"{len(before.keys() & after.keys()) - len(differ)} identical, {len(differ)} differ: {differ}; "
              f"only in one: {missing}")
        return 1 if differ else 0
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        scratch, result = Path(tmp), {}
        for group, make in (("text", text_entries), ("chat", chat_entries), ("image", image_entries),
                            ("calibration", calibration_entries)):
            if group not in skip:
                result.update(make(scratch))
                print(f"{group}: done", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"{len(result)} fingerprints -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
