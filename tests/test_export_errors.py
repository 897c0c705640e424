"""Bad input gets one clear line (exit status 2), and nothing half-written is left behind."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from ardeploy.cli import main


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def hf_copy(tiny_hf, tmp_path):
    folder, _ = tiny_hf("mha_untied_theta")
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def assert_one_line_error(code, err, *needles):
    """Exit status 2; the error is one line (warnings about the input may come before it)."""
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("ardeploy: error:") and err.count("ardeploy: error:") == 1 and "Traceback" not in err, err
    err = last
    for n in needles:
        assert n in err, err


def assert_nothing_written(parent, name="out"):
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}") or p.name == name]
    assert leftovers == []


def test_folder_without_weights(hf_copy, tmp_path, capsys):
    (hf_copy / "model.safetensors").unlink()
    code, err = run_cli(["export", hf_copy, "--out", tmp_path / "out", "--quiet"], capsys)
    assert_one_line_error(code, err, "no weights found")
    assert_nothing_written(tmp_path)


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["export", tmp_path / "empty", "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "not a checkpoint folder")


def test_unsupported_architecture(hf_copy, tmp_path, capsys):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(["export", hf_copy, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "GPT2LMHeadModel", "not supported")


def test_wrong_shape_tensor_is_named(hf_copy, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    sd = load_file(hf_copy / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(sd, hf_copy / "model.safetensors")
    code, err = run_cli(["export", hf_copy, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "model.layers.1.mlp.up_proj.weight", "[100, 64]", "[128, 64]")


def test_missing_tensor_is_named(hf_copy, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    sd = load_file(hf_copy / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, hf_copy / "model.safetensors")
    code, err = run_cli(["export", hf_copy, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "missing tensor(s) model.norm.weight")


def test_truncated_safetensors(hf_copy, tmp_path, capsys):
    path = hf_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, err = run_cli(["export", hf_copy, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "truncated safetensors file")


def test_unwritable_out(hf_copy, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = run_cli(["export", hf_copy, "--out", blocker / "bundle"], capsys)
    assert_one_line_error(code, err, "cannot write there")


def test_existing_out_needs_force(hf_copy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(["export", hf_copy, "--out", out], capsys)
    assert_one_line_error(code, err, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "precious"


def test_force_replaces_only_what_ardeploy_wrote(hf_copy, tmp_path, capsys):
    """--force never deletes a folder ardeploy did not write (or a file); it replaces a bundle holding only
    the files its manifest lists (anything else is named and kept), and the old bundle stays until the new
    one is complete."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    code, err = run_cli(["export", hf_copy, "--out", work, "--force"], capsys)
    assert_one_line_error(code, err, str(work), "not a folder ardeploy wrote")
    assert (work / "thesis.tex").read_text() == "years of work"
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    code, err = run_cli(["export", hf_copy, "--out", afile, "--force"], capsys)
    assert_one_line_error(code, err, "not a folder ardeploy wrote")
    bundle = tmp_path / "bundle"
    assert run_cli(["export", hf_copy, "--out", bundle, "--no-score"], capsys)[0] == 0
    first = json.loads((bundle / "manifest.json").read_text())["created"]
    (bundle / "notes.txt").write_text("the user's")
    code, err = run_cli(["export", hf_copy, "--out", bundle, "--force"], capsys)
    assert_one_line_error(code, err, str(bundle), "notes.txt", "did not write")
    assert (bundle / "notes.txt").read_text() == "the user's"
    (bundle / "notes.txt").unlink()
    assert run_cli(["export", hf_copy, "--out", bundle, "--force"], capsys)[0] == 0
    assert (bundle / "score.onnx").exists()
    assert json.loads((bundle / "manifest.json").read_text())["created"] >= first


def test_failure_midway_leaves_nothing(hf_copy, tmp_path, monkeypatch):
    from ardeploy.export import assemble, bundle
    from ardeploy.export.registry import load_checkpoint
    from ardeploy.export.text_graphs import TextGraphs

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")
    monkeypatch.setattr(TextGraphs, "build", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        bundle.export_bundle(load_checkpoint(hf_copy), tmp_path / "out", quiet=True)
    assert_nothing_written(tmp_path)
    assert assemble is not None


def test_meta_checkpoint_with_objects_is_refused(tmp_path, capsys):
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2}))
    torch.save({"tok_embeddings.weight": torch.zeros(4, 8), "evil": _Unpicklable()}, folder / "consolidated.00.pth")
    code, err = run_cli(["export", folder, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "refused to load")


class _Unpicklable:
    """Any non-tensor object: weights_only loading must refuse it."""


def test_bad_dtype_rejected_by_cli(hf_copy, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(hf_copy), "--out", str(tmp_path / "out"), "--dtype", "int3"])
    assert e.value.code == 2
