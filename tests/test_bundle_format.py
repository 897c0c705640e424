"""The bundle format (runtime/bundle.py): what export writes now, and older manifests still read."""
from __future__ import annotations

import json
import shutil

import pytest

from ardeploy.cli import main
from ardeploy.runtime import Generator, SamplingConfig
from ardeploy.runtime.bundle import FORMAT_VERSION, Bundle
from conftest import one_line_error, rng_ids, threads


@pytest.fixture(scope="module")
def bundle(tiny_hf, export_once):
    return export_once(tiny_hf("gqa_tied_llama3_bias")[0], max_seq=64, max_batch=2)


def as_version_1(src, dst):
    """A copy of the bundle whose manifest says format version 1, as bundles made before 2026-12-07 do."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["format_version"] = 1
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_export_writes_the_newest_version_and_declares_the_argmax(bundle):
    b = Bundle.load(bundle)
    assert b.manifest["format_version"] == FORMAT_VERSION == 2
    assert "next_token" in b.graph(b.ort_graph).outputs


def test_a_version_1_bundle_still_loads_and_gives_the_same_tokens(bundle, tmp_path):
    old = as_version_1(bundle, tmp_path / "v1")
    cfg = SamplingConfig(greedy=True, max_new_tokens=12, ignore_eos=True)
    for flavor in ("ort", "portable"):
        new_tokens = Generator.load(bundle, threads=threads(), flavor=flavor).generate(rng_ids(6), cfg).token_ids
        old_tokens = Generator.load(old, threads=threads(), flavor=flavor).generate(rng_ids(6), cfg).token_ids
        assert old_tokens == new_tokens


def test_a_newer_version_is_refused_in_one_line(bundle, tmp_path, capsys):
    newer = tmp_path / "v9"
    shutil.copytree(bundle, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["format_version"] = 9
    (newer / "manifest.json").write_text(json.dumps(manifest))
    code = main(["generate", str(newer), "--prompt-ids", "5,6", "--max-new-tokens", "2"])
    one_line_error(code, capsys, "format version 9", "reads versions 1, 2")


def test_image_bundles_state_their_condition_and_version_1_gets_it_derived(tmp_path):
    from ardeploy.runtime.bundle import image_condition
    assert image_condition({"class_conditional": {"num_classes": 10}}) == "class"
    assert image_condition({"caption": {"dim": 8}}) == "caption"
    assert image_condition({"visual_tokens": {}}) == "prompt"
    assert image_condition({"condition": "caption", "class_conditional": {}}) == "caption"   # stated wins


def test_quantized_bundles_state_what_each_device_computes():
    """One quantized bundle, two arithmetics: the CPU's MatMulNBits rounds activations to int8, CUDA's does
    not (the CPU/GPU greedy answers of SmolLM2 w4a16 agreed on 5 of 10 prompts, fp16 on 9): said per device."""
    from ardeploy.runtime.bundle import device_numerics
    assert device_numerics({"dtype": "fp16"}) == {}
    w4 = device_numerics({"dtype": "fp16", "quantization": {"scheme": "w4a16", "activations": None}})
    assert "int4 weights" in w4["cpu"] and "int8 per block" in w4["cpu"]
    assert "fp16 activations" in w4["cuda"] and "int8" not in w4["cuda"]
    w8a8 = device_numerics({"dtype": "fp32", "quantization": {"scheme": "w8a8", "activations": {"dtype": "int8"}}})
    assert w8a8["cpu"] == w8a8["cuda"] and "int8 activations" in w8a8["cpu"]
