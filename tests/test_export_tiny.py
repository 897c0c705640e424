"""FP32 export of tiny random transformers checkpoints: greedy tokens identical to `transformers`,
logits within 1e-4 at every step, through the real runtime (KV arena, ONNX Runtime IOBinding), on
both graph flavors: the ONNX Runtime graph (fused attention, cache updated in place) and the portable one."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIGS, rng_ids, threads

N_NEW = 48
ATOL = 1e-4


def hf_greedy(model, prompt: list[int], n: int):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [l[0].float().numpy() for l in out.logits]


def ours_greedy(bundle, prompt: list[int], n: int, flavor: str = "ort"):
    from ardeploy.export.verify import run_bundle_greedy
    from ardeploy.runtime.backends.ort import OrtBackend
    from ardeploy.runtime.bundle import Bundle
    b = Bundle.load(bundle)
    backend = OrtBackend(b, threads=threads(), flavor=flavor)
    assert backend.flavor == flavor
    return run_bundle_greedy(backend, b, prompt, n)


@pytest.mark.parametrize("flavor", ["ort", "portable"])
@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_matches_transformers(name, flavor, tiny_hf, export_once):
    folder, model = tiny_hf(name)
    bundle = export_once(folder, max_seq=128)
    prompt = rng_ids(7, seed=1)
    ref_tokens, ref_logits = hf_greedy(model, prompt, N_NEW)
    tokens, logits = ours_greedy(bundle, prompt, N_NEW, flavor)
    deltas = [float(np.abs(a - b).max()) for a, b in zip(ref_logits, logits)]
    print(f"{name} ({flavor}): max |dlogits| {max(deltas):.3g}")
    assert tokens == ref_tokens
    assert max(deltas) <= ATOL


def test_meta_folder_matches_transformers(tmp_path, export_once):
    """A Meta-style folder (interleaved-pair RoPE rows, Meta tensor names) written from the same weights."""
    from conftest import make_hf_model, meta_state_dict, write_meta_folder
    model = make_hf_model("meta")
    meta_dir = write_meta_folder(tmp_path / "meta", meta_state_dict(model), model.config, n_shards=1)
    bundle = export_once(meta_dir, max_seq=128)
    prompt = rng_ids(9, seed=2)
    ref_tokens, ref_logits = hf_greedy(model, prompt, N_NEW)
    for flavor in ("ort", "portable"):
        tokens, logits = ours_greedy(bundle, prompt, N_NEW, flavor)
        assert tokens == ref_tokens, flavor
        assert max(float(np.abs(a - b).max()) for a, b in zip(ref_logits, logits)) <= ATOL, flavor


@pytest.mark.parametrize("flavor", ["ort", "portable"])
def test_batch_left_padding_equals_alone(flavor, tiny_hf, export_once):
    from ardeploy.runtime import Generator, SamplingConfig
    folder, _ = tiny_hf("gqa_tied_llama3_bias")
    bundle = export_once(folder, max_seq=128, max_batch=2)
    gen = Generator.load(bundle, threads=threads(), flavor=flavor)
    cfg = SamplingConfig(greedy=True, max_new_tokens=24, ignore_eos=True)
    short, long = rng_ids(4, seed=3), rng_ids(11, seed=4)
    batch = gen.generate([short, long], cfg)
    alone = [gen.generate(short, cfg), gen.generate(long, cfg)]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert all(len(r.token_ids) == 24 for r in batch)


def test_bundle_layout_and_manifest(tiny_hf, export_once):
    """Every graph references the one weights file; nothing is stored twice; the manifest tells the contract."""
    import onnx
    folder, model = tiny_hf("gqa_tied_llama3_bias")
    bundle = export_once(folder, max_seq=128)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["kv_layout"]["order"] == ["time", "batch", "kv_head", "head_dim"]
    assert set(manifest["graphs"]) == {"prefill", "decode", "score", "decode_ort"}
    assert manifest["graphs"]["decode_ort"]["kv_layout"]["order"] == ["batch", "kv_head", "time", "head_dim"]
    n_params = sum(p.numel() for p in model.parameters())
    weights = (bundle / "weights.bin").stat().st_size
    # fp32, each parameter once (tied embedding counted once), plus alignment padding only
    assert n_params * 4 <= weights < n_params * 4 + 64 * 1024 * (manifest["weights"]["tensors"] + 1)
    for kind, g in manifest["graphs"].items():
        m = onnx.load(bundle / g["file"], load_external_data=False)
        locations = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"weights.bin"}
        assert [i.name for i in m.graph.input] == [x["name"] for x in g["inputs"]]
        assert [o.name for o in m.graph.output] == [x["name"] for x in g["outputs"]]
        assert (bundle / g["file"]).stat().st_size < 1 << 20     # graphs hold no weights
    dec = manifest["graphs"]["decode"]
    past = next(x for x in dec["inputs"] if x["name"] == "past.0.key")
    assert past["shape"] == ["past_seq", "batch", 2, 16]
    present = next(x for x in dec["outputs"] if x["name"] == "present.1.value")
    assert present["shape"] == ["seq", "batch", 2, 16]
    fused = manifest["graphs"]["decode_ort"]
    cache = next(x for x in fused["outputs"] if x["name"] == "present.1.value")
    assert cache["shape"] == ["batch", 2, "max_seq", 16]
