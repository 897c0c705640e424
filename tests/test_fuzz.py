"""Damaged inputs through the command line: every case must fail with exit status 2 and one stderr
line naming the file (or option) and the problem, no traceback, no partial output and nothing
outside --out touched. Fixed seeds, tiny inputs: the whole file runs in well under two minutes.

Input kinds: bundle manifest.json, weights.bin, the .onnx graphs, tokenizer.json, GGUF files,
safetensors files, Meta params.json, LlamaGen .pt files, calibration/evaluation text files and
out-of-range command-line values; then (issue 21) paths that leave the bundle, --force and writers
racing for --out, full or read-only disks, signals during export/calibrate and a SIGKILL'd run's
leftovers, absurd config values, manifests disagreeing with their graphs, failing chat templates,
text that is not UTF-8 and closed streams, broken pipes, argparse errors, non-finite numerics and
mistyped Python API values. CASES counts the cases per kind (the issue's closing note quotes them).
Signals and broken pipes run the CLI in a subprocess; a full disk is an injected OSError.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_hf_model, meta_state_dict, write_meta_folder

NAME = "gqa_tied_llama3_bias"


# -- helpers -----------------------------------------------------------------------------------------
def tree(root: Path) -> dict:
    """Every path under root with its size and modification time: what a refused command must not change."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def refused(argv, capsys, root: Path, *needles: str, watch: tuple = ()) -> str:
    """Run the CLI; assert a clean refusal (exit 2, one line naming every needle) and that nothing under
    `root` (the inputs, and the folder --out would be written in) or the `watch` folders changed."""
    from ardeploy.cli import main
    before = [tree(r) for r in (root, *watch)]
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ardeploy: error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    assert [tree(r) for r in (root, *watch)] == before, "a refused command wrote or changed files"
    return lines[0]


def _byte_tokenizer_json() -> str:
    """A byte-level tokenizer over the tiny model's 256 ids (the tiny checkpoints come without one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


@pytest.fixture(scope="module")
def tiny_bundle(tiny_hf, export_once, tmp_path_factory) -> Path:
    """The tiny bundle, given a tokenizer (so text prompts, calibration and evaluation text work)."""
    folder, _ = tiny_hf(NAME)
    out = Path(shutil.copytree(export_once(folder, max_seq=64, max_batch=2), tmp_path_factory.mktemp("fuzz") / "b"))
    (out / "tokenizer.json").write_text(_byte_tokenizer_json())
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"] = "tokenizer.json"
    manifest["files"] = sorted(set(manifest.get("files", [])) | {"tokenizer.json"})
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle, to damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def gen_args(bundle: Path) -> list:
    return ["generate", bundle, "--prompt", "hello", "--max-new-tokens", "2", "--greedy", "--threads", "1", "--quiet"]


# -- manifest.json -----------------------------------------------------------------------------------
def _set(path: str, value):
    def edit(m):
        *parents, last = path.split(".")
        for p in parents:
            m = m[p]
        if value is _DELETE:
            del m[last]
        else:
            m[last] = value
    return edit


_DELETE = object()
MANIFEST_TEXT = {"empty": "", "not-json": "{not json", "a-list": "[1, 2, 3]", "a-string": '"bundle"',
                 "truncated": None, "binary": "\x00\x01\x02\xff"}
MANIFEST_EDITS = {
    "future-version": (_set("format_version", 99), "format version 99"),
    "version-string": (_set("format_version", "1"), "format version"),
    "no-graphs": (_set("graphs", _DELETE), "graphs"),
    "graphs-a-list": (_set("graphs", ["decode.onnx"]), "graphs"),
    "graph-file-int": (_set("graphs.decode_ort.file", 7), "graphs"),
    "no-weights": (_set("weights", _DELETE), "weights"),
    "weights-file-list": (_set("weights.file", ["weights.bin"]), "weights"),
    "no-spec": (_set("spec", _DELETE), "spec"),
    "n-layers-string": (_set("spec.n_layers", "two"), "n_layers"),
    "vocab-negative": (_set("spec.vocab_size", -5), "vocab_size"),
    "no-max-seq": (_set("max_seq", _DELETE), "max_seq"),
    "max-seq-string": (_set("max_seq", "64"), "max_seq"),
    "max-batch-zero": (_set("max_batch", 0), "max_batch"),
    "kv-dtype-unknown": (_set("kv_dtype", "float7"), "kv_dtype"),
    "tokenizer-int": (_set("tokenizer", 3), "tokenizer"),
    "special-tokens-list": (_set("special_tokens", [1, 2]), "special_tokens"),
    "missing-graph-file": (_set("graphs.decode_ort.file", "nowhere.onnx"), "nowhere.onnx"),
}


@pytest.mark.parametrize("kind", list(MANIFEST_TEXT))
def test_manifest_text(kind, bundle, tmp_path, capsys):
    mpath = bundle / "manifest.json"
    text = MANIFEST_TEXT[kind]
    if text is None:
        text = mpath.read_text()[:57]
    mpath.write_text(text, encoding="latin-1")
    refused(gen_args(bundle), capsys, tmp_path, "manifest.json")


@pytest.mark.parametrize("kind", list(MANIFEST_EDITS))
def test_manifest_fields(kind, bundle, tmp_path, capsys):
    edit, needle = MANIFEST_EDITS[kind]
    mpath = bundle / "manifest.json"
    manifest = json.loads(mpath.read_text())
    edit(manifest)
    mpath.write_text(json.dumps(manifest))
    refused(gen_args(bundle), capsys, tmp_path, "manifest.json" if kind != "missing-graph-file" else "bundle", needle)


def test_manifest_refused_by_calibrate_writes_nothing(bundle, tmp_path, capsys):
    (bundle / "manifest.json").write_text("[]")
    data = tmp_path / "data.txt"
    data.write_text("some calibration text " * 50)
    refused(["calibrate", bundle, "--scheme", "w8a16", "--data", data, "--out", tmp_path / "out", "--quiet"], capsys,
            tmp_path, "manifest.json")


MANIFEST_SEEDS = list(range(12))


@pytest.mark.parametrize("seed", MANIFEST_SEEDS)
def test_manifest_random_bytes(seed, bundle, tmp_path, capsys):
    """A few random bytes of manifest.json overwritten (fixed seeds): refused in one line naming a bundle
    file, or (when only a free-text field was hit) run normally; never a traceback."""
    from ardeploy.cli import main
    mpath = bundle / "manifest.json"
    data = bytearray(mpath.read_bytes())
    rng = np.random.default_rng(100 + seed)
    for i in rng.integers(0, len(data), 1 + seed % 4):
        data[i] = int(rng.choice(list(b'{}[]":,0123456789-ex \x00\xff')))
    mpath.write_bytes(bytes(data))
    before = tree(tmp_path)
    capsys.readouterr()
    code = main([str(a) for a in gen_args(bundle)])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err, err
    if code:
        line = err.strip().splitlines()
        assert len(line) == 1 and line[0].startswith("ardeploy: error:") and str(bundle) in line[0], err
    assert tree(tmp_path) == before


# -- weights.bin -------------------------------------------------------------------------------------
def test_weights_short(bundle, tmp_path, capsys):
    w = bundle / "weights.bin"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    refused(gen_args(bundle), capsys, tmp_path, "weights.bin", "bytes")


def test_weights_empty(bundle, tmp_path, capsys):
    (bundle / "weights.bin").write_bytes(b"")
    refused(gen_args(bundle), capsys, tmp_path, "weights.bin", "bytes")


def test_weights_long(bundle, tmp_path, capsys):
    with open(bundle / "weights.bin", "ab") as f:
        f.write(np.random.default_rng(0).bytes(4096))
    refused(gen_args(bundle), capsys, tmp_path, "weights.bin", "bytes")


def test_weights_zeros_load_or_refuse(bundle, tmp_path, capsys):
    """All-zero weights are a valid file of the right size: they must run (the model is garbage, not
    the file) or be refused cleanly."""
    from ardeploy.cli import main
    w = bundle / "weights.bin"
    w.write_bytes(bytes(w.stat().st_size))
    capsys.readouterr()
    code = main([str(a) for a in gen_args(bundle)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and code in (0, 2), err
    if code:
        assert len(err.strip().splitlines()) == 1, err


# -- the .onnx graphs --------------------------------------------------------------------------------
def _runtime_graph(bundle: Path) -> str:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return manifest["graphs"]["decode_ort"]["file"]


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "flipped"])
def test_onnx_damaged(damage, bundle, tmp_path, capsys):
    g = bundle / _runtime_graph(bundle)
    data = g.read_bytes()
    rng = np.random.default_rng(1)
    if damage == "truncated":
        data = data[: len(data) // 3]
    elif damage == "random":
        data = rng.bytes(len(data))
    elif damage == "empty":
        data = b""
    else:
        arr = bytearray(data)
        for i in rng.integers(0, min(len(arr), 2048), 64):
            arr[i] ^= 0xFF
        data = bytes(arr)
    g.write_bytes(data)
    refused(gen_args(bundle), capsys, tmp_path, g.name)


@pytest.mark.parametrize("other", ["score", "prefill"])
def test_onnx_io_disagrees_with_manifest(other, bundle, tmp_path, capsys):
    """A valid graph, but not the one the manifest describes (its inputs and outputs differ)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    target = bundle / manifest["graphs"]["decode_ort"]["file"]
    shutil.copyfile(bundle / manifest["graphs"][other]["file"], target)
    refused(gen_args(bundle), capsys, tmp_path, target.name, "manifest")


def test_portable_graph_io_disagrees(bundle, tmp_path, capsys):
    manifest = json.loads((bundle / "manifest.json").read_text())
    shutil.copyfile(bundle / manifest["graphs"]["score"]["file"], bundle / manifest["graphs"]["decode"]["file"])
    refused(gen_args(bundle) + ["--flavor", "portable"], capsys, tmp_path, manifest["graphs"]["decode"]["file"],
            "manifest")


# -- tokenizer.json ----------------------------------------------------------------------------------
TOKENIZER_TEXT = {"garbage": "\x00garbage\xff", "empty": "", "not-a-tokenizer": '{"hello": 1}', "a-list": "[]"}


@pytest.mark.parametrize("kind", list(TOKENIZER_TEXT))
def test_tokenizer_damaged(kind, bundle, tmp_path, capsys):
    (bundle / "tokenizer.json").write_text(TOKENIZER_TEXT[kind], encoding="latin-1")
    refused(gen_args(bundle), capsys, tmp_path, "tokenizer.json")


# -- GGUF --------------------------------------------------------------------------------------------
def _tiny_gguf(path: Path) -> bytes:
    """A small, well-formed GGUF file (a few metadata keys and two float32 tensors)."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.arange(32 * 8, dtype=np.float32).reshape(32, 8))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _gguf_tensor_table_offset(data: bytes) -> tuple[int, int]:
    """(position of the first tensor info, tensor count) of a GGUF v3 file with the metadata our writer makes."""
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + klen
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        pos += _gguf_value_size(data, pos, vtype)
    return pos, n_tensors


def _gguf_value_size(data: bytes, pos: int, vtype: int) -> int:
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    if vtype in fixed:
        return fixed[vtype]
    if vtype == 8:                                   # string
        return 8 + struct.unpack_from("<Q", data, pos)[0]
    (etype,) = struct.unpack_from("<I", data, pos)   # array
    (count,) = struct.unpack_from("<Q", data, pos + 4)
    size = 12
    for _ in range(count):
        size += _gguf_value_size(data, pos + size, etype)
    return size


def _gguf_damaged(data: bytes, damage: str) -> bytes:
    table, _ = _gguf_tensor_table_offset(data)
    if damage == "bad-magic":
        return b"GGUX" + data[4:]
    if damage == "bad-version":
        return data[:4] + struct.pack("<I", 99) + data[8:]
    if damage == "empty":
        return b""
    if damage == "header-only":
        return data[:10]
    if damage == "truncated-table":
        return data[: table + 12]
    if damage == "huge-tensor-count":
        return data[:8] + struct.pack("<Q", 1 << 40) + data[16:]
    if damage == "huge-key-length":
        return data[:24] + struct.pack("<Q", 1 << 50) + data[32:]
    if damage == "offset-past-end":
        (nlen,) = struct.unpack_from("<Q", data, table)
        dims_at = table + 8 + nlen
        (ndim,) = struct.unpack_from("<I", data, dims_at)
        offset_at = dims_at + 4 + 8 * ndim + 4
        return data[:offset_at] + struct.pack("<Q", 1 << 40) + data[offset_at + 8:]
    if damage == "data-truncated":
        return data[: len(data) - 512]
    raise AssertionError(damage)


GGUF_DAMAGE = ["bad-magic", "bad-version", "empty", "header-only", "truncated-table", "huge-tensor-count",
               "huge-key-length", "offset-past-end", "data-truncated"]


@pytest.mark.parametrize("damage", GGUF_DAMAGE)
def test_gguf_damaged(damage, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    good = _tiny_gguf(tmp_path / "good.gguf")
    (tmp_path / "good.gguf").unlink()
    bad = src / "model.gguf"
    bad.write_bytes(_gguf_damaged(good, damage))
    refused(["export", bad, "--out", tmp_path / "out", "--quiet"], capsys, tmp_path, "model.gguf")


@pytest.mark.parametrize("seed", range(8))
def test_gguf_truncated_anywhere(seed, tmp_path, capsys):
    good = _tiny_gguf(tmp_path / "good.gguf")
    (tmp_path / "good.gguf").unlink()
    cut = int(np.random.default_rng(200 + seed).integers(1, len(good) - 1))
    (tmp_path / "model.gguf").write_bytes(good[:cut])
    refused(["export", tmp_path / "model.gguf", "--out", tmp_path / "out", "--quiet"], capsys, tmp_path, "model.gguf")


# -- safetensors -------------------------------------------------------------------------------------
def _safetensors_damaged(data: bytes, damage: str) -> bytes:
    (n,) = struct.unpack_from("<Q", data, 0)
    header = data[8:8 + n]
    if damage == "empty":
        return b""
    if damage == "short-length":
        return data[:5]
    if damage == "huge-length":
        return struct.pack("<Q", 1 << 60) + data[8:]
    if damage == "length-past-end":
        return struct.pack("<Q", len(data)) + data[8:]
    if damage == "garbage-header":
        return data[:8] + bytes(b ^ 0x5A for b in header) + data[8 + n:]
    if damage == "header-a-list":
        new = b"[1, 2, 3]".ljust(n)
        return data[:8] + new + data[8 + n:]
    if damage == "offsets-past-end":
        meta = json.loads(header)
        for k, v in meta.items():
            if k != "__metadata__":
                v["data_offsets"] = [v["data_offsets"][0], v["data_offsets"][1] + (1 << 30)]
                break
        new = json.dumps(meta).encode()
        return struct.pack("<Q", len(new)) + new + data[8 + n:]
    if damage == "data-truncated":
        return data[: 8 + n + 64]
    raise AssertionError(damage)


SAFETENSORS_DAMAGE = ["empty", "short-length", "huge-length", "length-past-end", "garbage-header", "header-a-list",
                      "offsets-past-end", "data-truncated"]


@pytest.mark.parametrize("damage", SAFETENSORS_DAMAGE)
def test_safetensors_damaged(damage, tiny_hf, tmp_path, capsys):
    folder, _ = tiny_hf(NAME)
    src = Path(shutil.copytree(folder, tmp_path / "hf"))
    st = src / "model.safetensors"
    st.write_bytes(_safetensors_damaged(st.read_bytes(), damage))
    refused(["export", src, "--out", tmp_path / "out", "--quiet"], capsys, tmp_path, "model.safetensors")


@pytest.mark.parametrize("seed", range(6))
def test_safetensors_truncated_anywhere(seed, tiny_hf, tmp_path, capsys):
    folder, _ = tiny_hf(NAME)
    src = Path(shutil.copytree(folder, tmp_path / "hf"))
    st = src / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: int(np.random.default_rng(300 + seed).integers(1, len(data) - 1))])
    refused(["export", src, "--out", tmp_path / "out", "--quiet"], capsys, tmp_path, "model.safetensors")


CONFIG_DAMAGE = {"not-json": "{", "a-list": "[]", "empty": "", "no-hidden-size": None}


@pytest.mark.parametrize("damage", list(CONFIG_DAMAGE))
def test_hf_config_damaged(damage, tiny_hf, tmp_path, capsys):
    folder, _ = tiny_hf(NAME)
    src = Path(shutil.copytree(folder, tmp_path / "hf"))
    cfg = src / "config.json"
    text = CONFIG_DAMAGE[damage]
    if text is None:
        c = json.loads(cfg.read_text())
        del c["hidden_size"]
        text = json.dumps(c)
    cfg.write_text(text)
    refused(["export", src, "--out", tmp_path / "out", "--quiet"], capsys, tmp_path, "config.json")


# -- Meta params.json --------------------------------------------------------------------------------
def _meta_folder(folder: Path) -> Path:
    """A tiny Meta-layout folder (consolidated.00.pth + params.json) from the conftest model."""
    model = make_hf_model("meta")
    return write_meta_folder(folder, meta_state_dict(model), model.config, n_shards=1)


@pytest.fixture(scope="module")
def meta_folder(tmp_path_factory) -> Path:
    return _meta_folder(tmp_path_factory.mktemp("meta") / "meta")


PARAMS_DAMAGE = {"not-json": "{'dim': 64", "empty": "", "a-list": "[64, 2]", "no-dim": "dim", "no-n-layers": "n_layers",
                 "no-n-heads": "n_heads", "dim-string": ("dim", "sixty-four"), "n-layers-zero": ("n_layers", 0),
                 "n-heads-not-dividing": ("n_heads", 3)}


@pytest.mark.parametrize("damage", list(PARAMS_DAMAGE))
def test_meta_params_damaged(damage, meta_folder, tmp_path, capsys):
    src = Path(shutil.copytree(meta_folder, tmp_path / "meta"))
    p = src / "params.json"
    spec = PARAMS_DAMAGE[damage]
    if isinstance(spec, str) and damage.startswith("no-"):
        params = json.loads(p.read_text())
        del params[spec]
        p.write_text(json.dumps(params))
    elif isinstance(spec, tuple):
        params = json.loads(p.read_text())
        params[spec[0]] = spec[1]
        p.write_text(json.dumps(params))
    else:
        p.write_text(spec)
    needle = "invalid model spec" if isinstance(spec, tuple) and damage != "dim-string" else "params.json"
    refused(["export", src, "--out", tmp_path / "out", "--quiet"], capsys, tmp_path, needle)


def test_meta_shard_not_torch(meta_folder, tmp_path, capsys):
    src = Path(shutil.copytree(meta_folder, tmp_path / "meta"))
    (src / "consolidated.00.pth").write_bytes(np.random.default_rng(2).bytes(4096))
    refused(["export", src, "--out", tmp_path / "out", "--quiet"], capsys, tmp_path, "consolidated.00.pth")


# -- LlamaGen .pt ------------------------------------------------------------------------------------
PT_DAMAGE = {"random": lambda rng: rng.bytes(2048), "empty": lambda rng: b"", "text": lambda rng: b"not a torch file\n",
             "zip-garbage": lambda rng: b"PK\x03\x04" + rng.bytes(1024)}


@pytest.mark.parametrize("damage", list(PT_DAMAGE))
def test_llamagen_pt_not_torch(damage, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    (src / "gpt.pt").write_bytes(PT_DAMAGE[damage](rng))
    (src / "vq.pt").write_bytes(rng.bytes(512))
    refused(["export", src / "gpt.pt", "--family", "llamagen-c2i", "--image-size", "256", "--vq", src / "vq.pt",
             "--out", tmp_path / "out", "--quiet"], capsys, tmp_path, "gpt.pt")


# -- calibration / evaluation text -------------------------------------------------------------------
TEXT_DAMAGE = {"empty": b"", "binary": bytes(range(256)) * 8, "whitespace": b" \n\t\n  ", "bad-utf8": b"ok \xff\xfe text",
               "jsonl-garbage": b'{"text": "a"}\n{oops\n', "too-short": b"hi"}


@pytest.mark.parametrize("damage", list(TEXT_DAMAGE))
def test_calibration_text_damaged(damage, tiny_bundle, tmp_path, capsys):
    data = tmp_path / ("data.jsonl" if damage == "jsonl-garbage" else "data.txt")
    data.write_bytes(TEXT_DAMAGE[damage])
    refused(["calibrate", tiny_bundle, "--scheme", "w8a16", "--data", data, "--out", tmp_path / "out", "--samples", "2",
             "--seq-len", "16", "--threads", "1", "--quiet"], capsys, tmp_path, data.name, watch=(tiny_bundle,))


@pytest.mark.parametrize("damage", ["empty", "binary", "bad-utf8"])
def test_eval_text_damaged(damage, tiny_bundle, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_bytes(TEXT_DAMAGE[damage])
    refused(["eval", tiny_bundle, "--ppl", data, "--threads", "1", "--quiet"], capsys, tmp_path, data.name,
            watch=(tiny_bundle,))


def test_calibration_data_missing_or_folder(tiny_bundle, tmp_path, capsys):
    for data in (tmp_path / "nothing.txt", tmp_path):
        refused(["calibrate", tiny_bundle, "--scheme", "w8a16", "--data", data, "--out", tmp_path / "out", "--quiet"],
                capsys, tmp_path, data.name, watch=(tiny_bundle,))


# -- out-of-range command-line values ----------------------------------------------------------------
GENERATE_ARGS = [("--max-new-tokens", "-1"), ("--max-new-tokens", "0"), ("--top-p", "2"), ("--top-p", "0"),
                 ("--temperature", "-1"), ("--top-k", "-3"), ("--min-p", "1.5"), ("--repetition-penalty", "0"),
                 ("--threads", "-2"), ("--prompt-ids", "999999"), ("--prompt-ids", "-4"), ("--prompt-ids", "1,x"),
                 ("--prompt-ids", ",".join(["5"] * 80)), ("--seed", "-1"), ("--temperature", "nan"),
                 ("--repetition-penalty", "nan"), ("--min-p", "nan"), ("--top-p", "nan"), ("--temperature", "inf")]


@pytest.mark.parametrize("option,value", GENERATE_ARGS)
def test_generate_out_of_range(option, value, tiny_bundle, tmp_path, capsys):
    args = ["generate", tiny_bundle, "--quiet"]
    if option != "--prompt-ids":
        args += ["--prompt", "hello"]
    needle = option.lstrip("-")[:5]
    if option == "--prompt-ids":
        needle = "max_seq" if len(value) > 20 else value
    refused(args + [option, value], capsys, tmp_path, needle, watch=(tiny_bundle,))


EXPORT_ARGS = [("--max-seq", "0"), ("--max-seq", "-5"), ("--max-batch", "0"), ("--opset", "3")]


@pytest.mark.parametrize("option,value", EXPORT_ARGS)
def test_export_out_of_range(option, value, tiny_hf, tmp_path, capsys):
    folder, _ = tiny_hf(NAME)
    refused(["export", folder, "--out", tmp_path / "out", option, value, "--quiet"], capsys, tmp_path, option)


OTHER_ARGS = [
    ("bench", ["--batch", "0"]), ("bench", ["--batch", "9"]), ("bench", ["--new-tokens", "0"]),
    ("bench", ["--prompt-len", "0"]), ("bench", ["--repeat", "0"]), ("bench", ["--batch", "a"]),
    ("bench", ["--prompt-len", "70"]),
    ("calibrate", ["--samples", "0"]), ("calibrate", ["--seq-len", "1"]), ("calibrate", ["--percentile", "200"]),
    ("calibrate", ["--smoothquant-alpha", "3"]), ("calibrate", ["--keep-fp", "99"]),
    ("eval", ["--seq-len", "1"]), ("eval", ["--stride", "0"]), ("eval", ["--max-tokens", "0"]),
    ("verify", ["--steps", "0"]), ("verify", ["--prompt-ids", "999999"]),
]


@pytest.mark.parametrize("command,extra", OTHER_ARGS, ids=lambda v: v if isinstance(v, str) else "_".join(v))
def test_other_out_of_range(command, extra, tiny_bundle, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = [command, tiny_bundle, *extra, "--quiet"]
    if command == "calibrate":
        args += ["--scheme", "w8a16", "--data", data, "--out", tmp_path / "out", "--threads", "1", "--samples", "2",
                 "--seq-len", "16"] if "--samples" not in extra and "--seq-len" not in extra else \
                ["--scheme", "w8a16", "--data", data, "--out", tmp_path / "out", "--threads", "1"]
    elif command == "eval":
        args += ["--ppl", data, "--threads", "1"]
    elif command == "bench":
        args += ["--threads", "1", "--repeat", "1"] if "--repeat" not in extra else ["--threads", "1"]
        args += [] if "--prompt-len" in extra else ["--prompt-len", "8"]
        args += [] if "--new-tokens" in extra else ["--new-tokens", "4"]
    needle = extra[1] if extra[0] in ("--prompt-ids", "--batch") else extra[0].lstrip("-")[:5]
    refused(args, capsys, tmp_path, needle, watch=(tiny_bundle,))


# -- paths a bundle names: confined to its folder ----------------------------------------------------
def _edit_manifest(bundle: Path, edit) -> None:
    mpath = bundle / "manifest.json"
    manifest = json.loads(mpath.read_text())
    edit(manifest)
    mpath.write_text(json.dumps(manifest))


def _outside_copy(bundle: Path, name: str) -> Path:
    """A copy of one of the bundle's files in a folder beside it (where an escaping entry would point)."""
    elsewhere = bundle.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return Path(shutil.copyfile(bundle / name, elsewhere / name))


def _entry_absolute(field: str, name: str):
    return lambda bundle: _set(field, str(_outside_copy(bundle, name)))


def _entry_climbing(field: str, name: str):
    return lambda bundle: _set(field, f"../elsewhere/{_outside_copy(bundle, name).name}")


def _entry_symlink(field: str, name: str):
    def edit(bundle):
        target = _outside_copy(bundle, name)
        (bundle / name).unlink()
        (bundle / name).symlink_to(target)
        return lambda m: None
    return edit


def _graph_data_escapes(location):
    """The runtime graph's external data pointing outside the bundle (through its own .onnx file)."""
    def edit(bundle):
        import onnx
        path = bundle / _runtime_graph(bundle)
        model = onnx.load(str(path), load_external_data=False)
        weights = _outside_copy(bundle, "weights.bin")
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location(weights)
        onnx.save_model(model, str(path))
        return lambda m: None
    return edit


PATH_ESCAPES = {
    "graph-absolute": (_entry_absolute("graphs.decode_ort.file", "decode_ort.onnx"), "graphs.decode_ort.file"),
    "graph-dotdot": (_entry_climbing("graphs.decode_ort.file", "decode_ort.onnx"), "graphs.decode_ort.file"),
    "graph-symlink": (_entry_symlink("graphs.decode_ort.file", "decode_ort.onnx"), "symlink"),
    "weights-absolute": (_entry_absolute("weights.file", "weights.bin"), "weights.file"),
    "weights-dotdot": (_entry_climbing("weights.file", "weights.bin"), "weights.file"),
    "weights-symlink": (_entry_symlink("weights.file", "weights.bin"), "symlink"),
    "tokenizer-absolute": (_entry_absolute("tokenizer", "tokenizer.json"), "tokenizer"),
    "tokenizer-dotdot": (_entry_climbing("tokenizer", "tokenizer.json"), "tokenizer"),
    "tokenizer-symlink": (_entry_symlink("tokenizer", "tokenizer.json"), "symlink"),
    "calibration-dotdot": (lambda b: _set("quantization", {"calibration": "../calibration.json"}),
                           "quantization.calibration"),
    "uncond-caption-absolute": (lambda b: _set("image", {"caption": {"uncond_file": "/etc/hostname"}}),
                                "image.caption.uncond_file"),
    "graph-data-dotdot": (_graph_data_escapes(lambda w: f"../elsewhere/{w.name}"), "external data"),
    "graph-data-absolute": (_graph_data_escapes(str), "external data"),
}


@pytest.mark.parametrize("kind", list(PATH_ESCAPES))
def test_bundle_path_escapes(kind, bundle, tmp_path, capsys):
    """Every file a bundle names must lie inside its folder: absolute names, '..' and symlinks out are refused
    in one line naming the entry (the outside copy would otherwise be read and run)."""
    make_edit, needle = PATH_ESCAPES[kind]
    _edit_manifest(bundle, make_edit(bundle))
    refused(gen_args(bundle), capsys, tmp_path, "outside" if "symlink" in kind else str(bundle), needle)


def test_calibrate_cannot_overwrite_a_file_beside_out(tiny_bundle, tmp_path, capsys):
    """Security: a downloaded bundle whose tokenizer entry is ../notes.txt made `calibrate` copy its own file
    over the user's notes.txt beside --out (calibration/write.py copied bundle/entry to out/entry)."""
    downloads, work = tmp_path / "downloads", tmp_path / "work"
    bundle = Path(shutil.copytree(tiny_bundle, downloads / "bundle"))
    shutil.copyfile(bundle / "tokenizer.json", downloads / "notes.txt")          # the attacker's, beside the bundle
    _edit_manifest(bundle, _set("tokenizer", "../notes.txt"))
    work.mkdir()
    (work / "notes.txt").write_text("the user's notes")
    data = tmp_path / "data.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    refused(["calibrate", bundle, "--scheme", "w8a16", "--data", data, "--out", work / "q", "--samples", "2",
             "--seq-len", "16", "--check-windows", "0", "--threads", "1", "--quiet"], capsys, tmp_path,
            "tokenizer", "'../notes.txt'")
    assert (work / "notes.txt").read_text() == "the user's notes"


LAYERS_REPORT = {"source": "test", "layers": []}


def _engines_record(bundle: Path, **changes) -> Path:
    """BUNDLE/engines with every field `inspect` prints: without the path rule inspect ran to the end (exit 0)
    on the layers, graphs and folder escapes below (checked on 51ebece: exit 0, the outside layers file read)."""
    engines = bundle / "engines"
    engines.mkdir()
    (engines / "engine.plan").write_bytes(b"plan")
    (engines / "layers.json").write_text(json.dumps(LAYERS_REPORT))
    record = {"format": "ardeploy-engines", "format_version": 1,
              "engines": [{"file": "engine.plan", "graph": "decode", "bytes": 4, "profiles": []}],
              "layers": {"file": "layers.json"}, "graphs": {}, "tensorrt": {"label": "TensorRT"},
              "target": {"compute_capability": "any"}, "precision": "fp16",
              "max_seq": 8, "max_batch": 1, "opt_seq": 8, "build_seconds": 0, "created": "", "plan_bytes": 4,
              "plan_to_weights": 1.0, "io": {}, **changes}
    (engines / "engines.json").write_text(json.dumps(record))
    return engines


def _layers_outside(bundle: Path) -> Path:
    """An attacker's layers report beside the bundle, named by its absolute path."""
    outside = bundle.parent / "their_layers.json"
    outside.write_text(json.dumps(LAYERS_REPORT))
    return _engines_record(bundle, layers={"file": str(outside.resolve())})


def _engines_elsewhere(bundle: Path) -> None:
    """BUNDLE/engines as a symlink to an engines folder outside the bundle."""
    elsewhere = bundle.parent / "elsewhere_bundle"
    elsewhere.mkdir()
    (bundle / "engines").symlink_to(_engines_record(elsewhere))


ENGINE_ESCAPES = {
    "plan-dotdot": lambda b: _engines_record(b, engines=[{"file": "../../secret.plan"}]),
    "layers-absolute": _layers_outside,
    "graph-dotdot": lambda b: _engines_record(b, graphs={"../other/decode.onnx": "0" * 64}),
    "folder-symlink": _engines_elsewhere,
}


@pytest.mark.parametrize("kind", list(ENGINE_ESCAPES))
def test_engines_record_path_escapes(kind, bundle, tmp_path, capsys):
    """engines.json is read by `inspect` (which prints layers.json) and the TensorRT backend: the same rule."""
    ENGINE_ESCAPES[kind](bundle)
    refused(["inspect", bundle, "--quiet"], capsys, tmp_path, "outside" if kind == "folder-symlink" else "engines.json")


# -- writes never delete what ardeploy did not write ------------------------------------------------
@pytest.fixture(scope="module")
def traced_once():
    """export.bundle._trace, each (spec, dtype, opset, score) traced once in this module: an export that is
    refused while writing then costs a second, not a trace (the pieces do not depend on the weights)."""
    import copy
    from ardeploy.export import bundle as export_module
    real, cache = export_module._trace, {}

    def cached(graphs, dtype, opset, score_graph, quiet):
        key = (json.dumps(graphs.spec.to_dict(), sort_keys=True, default=str), type(graphs).__name__, str(dtype),
               opset, score_graph)
        if key not in cache:
            cache[key] = real(graphs, dtype, opset, score_graph, quiet)
        return copy.deepcopy(cache[key])
    return cached


@pytest.fixture
def fast_export(traced_once, monkeypatch):
    monkeypatch.setattr("ardeploy.export.bundle._trace", traced_once)


def export_args(src, out, *extra) -> list:
    return ["export", src, "--out", out, "--no-score", "--target", "portable", "--quiet", *extra]


def test_force_refuses_a_copied_manifest_beside_user_files(tiny_hf, tiny_bundle, tmp_path, capsys):
    """Data loss: --force deleted any folder whose manifest.json had ardeploy's format marker, so a user folder
    holding a copied manifest lost all its files. Now every file must be one the manifest lists."""
    folder, _ = tiny_hf(NAME)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(tiny_bundle / "manifest.json", work / "manifest.json")
    (work / "thesis.tex").write_text("years of work")
    (work / "data").mkdir()
    (work / "data" / "results.csv").write_text("1,2,3")
    refused(["export", folder, "--out", work, "--force", "--quiet"], capsys, tmp_path, str(work), "thesis.tex", "--force")


def test_force_refuses_an_old_manifest_with_user_files(tiny_hf, tiny_bundle, tmp_path, capsys):
    """A manifest without the `files` list (written before it existed): the files it names are ardeploy's."""
    folder, _ = tiny_hf(NAME)
    old = Path(shutil.copytree(tiny_bundle, tmp_path / "old"))
    _edit_manifest(old, _set("files", _DELETE))
    (old / "notes.txt").write_text("mine")
    refused(["export", folder, "--out", old, "--force", "--quiet"], capsys, tmp_path, "notes.txt")


def test_force_replaces_an_old_manifest_bundle(tiny_hf, tiny_bundle, tmp_path, fast_export, capsys):
    from ardeploy.cli import main
    folder, _ = tiny_hf(NAME)
    old = Path(shutil.copytree(tiny_bundle, tmp_path / "old"))
    _edit_manifest(old, _set("files", _DELETE))
    assert main([str(a) for a in export_args(folder, old, "--force")]) == 0, capsys.readouterr().err
    assert "tokenizer.json" not in json.loads((old / "manifest.json").read_text())["files"]


def test_out_appearing_during_export_is_kept(tiny_hf, tmp_path, fast_export, monkeypatch, capsys):
    """Data loss: a --out that appeared while an export ran (another process, a user) was replaced at the final
    move and its contents deleted, though --force was not given. Now the move refuses and keeps it."""
    from ardeploy.cli import main
    from ardeploy.export import bundle as export_module
    folder, _ = tiny_hf(NAME)
    out = tmp_path / "out"
    real = export_module._write_tokenizer

    def another_writer(ckpt, tmp):
        out.mkdir()
        (out / "theirs.txt").write_text("written meanwhile")
        return real(ckpt, tmp)
    monkeypatch.setattr(export_module, "_write_tokenizer", another_writer)
    capsys.readouterr()
    code = main([str(a) for a in export_args(folder, out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(out) in err[0] and "appeared" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]                # no partial folder left
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and (out / "theirs.txt").read_text() == "written meanwhile"


def test_foreign_file_appearing_before_a_forced_replace_is_kept(tiny_hf, tiny_bundle, tmp_path, fast_export,
                                                                 monkeypatch, capsys):
    from ardeploy.cli import main
    from ardeploy.export import bundle as export_module
    folder, _ = tiny_hf(NAME)
    out = Path(shutil.copytree(tiny_bundle, tmp_path / "out"))
    real = export_module._write_tokenizer

    def user_adds_a_file(ckpt, tmp):
        (out / "added.txt").write_text("mine")
        return real(ckpt, tmp)
    monkeypatch.setattr(export_module, "_write_tokenizer", user_adds_a_file)
    capsys.readouterr()
    code = main([str(a) for a in export_args(folder, out, "--force")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "added.txt" in err[0], err
    assert (out / "added.txt").read_text() == "mine" and (out / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_build_refuses_foreign_files_in_engines(bundle, tmp_path, capsys):
    """`build` replaces BUNDLE/engines; a file there that no engines.json lists is kept (and named)."""
    engines = _engines_record(bundle)
    (engines / "notes.txt").write_text("mine")
    refused(["build", bundle, "--precision", "fp32", "--quiet"], capsys, tmp_path, "notes.txt")


def test_stale_partials_of_a_live_writer_are_kept(tmp_path):
    """The next run removes partial folders of dead runs only: a live writer's stays (it is still working)."""
    from ardeploy.runtime import atomic
    out = tmp_path / "out"
    live = tmp_path / f".out.partial-{atomic._host_tag()}-{os.getppid()}-abc"
    dead = tmp_path / f".out.partial-{atomic._host_tag()}-{_dead_pid()}-abc"
    other = tmp_path / f".other.partial-{atomic._host_tag()}-{_dead_pid()}-abc"
    for folder in (live, dead, other):
        folder.mkdir()
    assert atomic.remove_stale_partials(out) == [dead]
    assert live.exists() and other.exists() and not dead.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- the file system: full, read-only, not ours -----------------------------------------------------
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _failing_mkdtemp(code: int):
    def mkdtemp(*args, **kwargs):
        raise OSError(code, os.strerror(code), kwargs.get("dir"))
    return mkdtemp


FS_ERRORS = {"export-full-disk": ("export", "put", errno.ENOSPC), "export-read-only": ("export", "mkdtemp", errno.EROFS),
             "export-no-permission": ("export", "mkdtemp", errno.EACCES),
             "calibrate-full-disk": ("calibrate", "put", errno.ENOSPC),
             "calibrate-read-only": ("calibrate", "mkdtemp", errno.EROFS),
             "calibrate-quota": ("calibrate", "put", errno.EDQUOT)}


@pytest.mark.parametrize("kind", list(FS_ERRORS))
def test_file_system_errors(kind, tiny_hf, tiny_bundle, tmp_path, fast_export, monkeypatch, capsys):
    """A full disk, a quota, a read-only or forbidden place: one line naming --out and the reason, exit 2,
    no partial folder (injected OSErrors: the first write into weights.bin, or the temporary folder)."""
    from ardeploy.runtime import atomic, weights_file
    command, where, code = FS_ERRORS[kind]
    out = tmp_path / "out"
    if where == "put":
        def full(*args, **kwargs):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(weights_file.WeightsFile, "put", full)
    else:
        monkeypatch.setattr(atomic.tempfile, "mkdtemp", _failing_mkdtemp(code))
    data = tmp_path / "data.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = export_args(tiny_hf(NAME)[0], out) if command == "export" else \
        ["calibrate", tiny_bundle, "--scheme", "w8a16", "--data", data, "--out", out, "--samples", "2", "--seq-len", "16",
         "--check-windows", "0", "--threads", "1", "--quiet"]
    refused(args, capsys, tmp_path, str(out), os.strerror(code), watch=(tiny_bundle,))


def test_calibrate_out_not_empty(tiny_bundle, tmp_path, capsys):
    """Was an internal error (calibration called the atomic helpers without the user-error class)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    data = tmp_path / "data.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    for extra in ([], ["--force"]):
        refused(["calibrate", tiny_bundle, "--scheme", "w8a16", "--data", data, "--out", out, "--quiet", *extra],
                capsys, tmp_path, str(out), watch=(tiny_bundle,))


def test_png_full_disk_leaves_no_partial(tmp_path, monkeypatch):
    from ardeploy.runtime.errors import UserError
    from ardeploy.runtime.png import write_png
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: (self.touch(), _no_space())[1])
    with pytest.raises(UserError, match="img.png.*No space left"):
        write_png(tmp_path / "img.png", np.zeros((4, 4, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_png_write_error_names_the_file_asked_for(tmp_path):
    from ardeploy.runtime.errors import UserError
    from ardeploy.runtime.png import write_png
    with pytest.raises(UserError, match=r"missing/img\.png: cannot write there: No such file") as caught:
        write_png(tmp_path / "missing" / "img.png", np.zeros((4, 4, 3), np.uint8))
    assert "partial" not in str(caught.value)


# -- signals during writing commands, and a killed run's leftovers ----------------------------------
def _pausing_cli(argv, module: str, function: str, ready: Path, **popen) -> subprocess.Popen:
    """`ardeploy ARGV` in a fresh interpreter whose `module.function` (a step inside the folder being written)
    marks `ready` and then waits: the test's moment to send a signal. SIGINT and SIGHUP start as in a terminal
    (Python's own defaults): the CLI leaves a signal alone that its parent ignored (nohup, some CI shells)."""
    code = "\n".join([
        "import pathlib, signal, sys, time", "signal.signal(signal.SIGINT, signal.default_int_handler); signal.signal(signal.SIGHUP, signal.SIG_DFL)",
        f"import {module} as target",
        "def pause(*args, **kwargs):", f"    pathlib.Path({str(ready)!r}).write_text('writing')", "    time.sleep(120)",
        f"target.{function} = pause", "from ardeploy.cli import main", f"sys.exit(main({[str(a) for a in argv]!r}))"])
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **popen)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the command never reached its writing step"
        time.sleep(0.05)


def _signal_args(kind: str, tiny_hf, tiny_bundle, tmp_path) -> tuple[list, str, str]:
    out = tmp_path / "work" / "out"
    if kind == "export":
        return export_args(tiny_hf(NAME)[0], out), "ardeploy.export.bundle", "_trace"
    data = tmp_path / "data.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return (["calibrate", tiny_bundle, "--scheme", "w8a16", "--data", data, "--out", out, "--samples", "2",
             "--seq-len", "16", "--check-windows", "0", "--threads", "1", "--quiet"],
            "ardeploy.calibration.write", "smoke_run")


SIGNAL_CASES = [("export", signal.SIGTERM), ("export", signal.SIGINT), ("export", signal.SIGHUP),
                ("calibrate", signal.SIGTERM)]


@pytest.mark.parametrize("command,signum", SIGNAL_CASES, ids=lambda v: getattr(v, "name", v))
def test_signal_while_writing_leaves_nothing(command, signum, tiny_hf, tiny_bundle, tmp_path):
    """SIGTERM/SIGINT/SIGHUP while the output folder is being written: exit 128 + signal, one line, and no
    partial folder (SIGTERM used to kill the process with .out.partial-* left beside --out)."""
    (tmp_path / "work").mkdir()
    argv, module, function = _signal_args(command, tiny_hf, tiny_bundle, tmp_path)
    ready = tmp_path / "ready"
    proc = _pausing_cli(argv, module, function, ready)
    _wait_for(ready, proc)
    assert [p.name for p in (tmp_path / "work").iterdir() if ".partial-" in p.name], "no partial folder to remove"
    proc.send_signal(signum)
    code, err = proc.wait(60), proc.stderr.read().strip().splitlines()
    assert code == 128 + signum and err == [f"ardeploy: interrupted{'' if signum == signal.SIGINT else ' by ' + signum.name}"], err
    assert list((tmp_path / "work").iterdir()) == []


def test_killed_export_partial_removed_by_next_run(tiny_hf, tmp_path, fast_export, capsys):
    """SIGKILL cannot be caught: its partial folder stays, and the next run into the same place removes it."""
    from ardeploy.cli import main
    work = tmp_path / "work"
    work.mkdir()
    argv, module, function = _signal_args("export", tiny_hf, None, tmp_path)
    ready = tmp_path / "ready"
    proc = _pausing_cli(argv, module, function, ready)
    _wait_for(ready, proc)
    proc.kill()
    proc.wait(60)
    assert [p.name for p in work.iterdir() if ".partial-" in p.name]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert [p.name for p in work.iterdir()] == ["out"]


# -- absurd or mistyped config values, before anything is allocated ---------------------------------
HF_CONFIG_VALUES = {"layers-1e9": ("num_hidden_layers", 10**9, "n_layers"), "vocab-1e12": ("vocab_size", 10**12, "vocab_size"),
                    "hidden-string": ("hidden_size", "big", "hidden_size"),
                    "heads-zero": ("num_attention_heads", 0, "n_heads"), "head-dim-1e9": ("head_dim", 10**9, "head_dim"),
                    "layers-fraction": ("num_hidden_layers", 2.5, "num_hidden_layers"),
                    "eps-string": ("rms_norm_eps", "tiny", "rms_norm_eps"),
                    "eos-string": ("eos_token_id", "</s>", "eos_token_id"),
                    "eos-list-string": ("eos_token_id", [2, "</s>"], "eos_token_id"),
                    "rope-scaling-string": ("rope_scaling", "llama3", "rope scaling")}


@pytest.mark.parametrize("kind", list(HF_CONFIG_VALUES))
def test_hf_config_values(kind, tiny_hf, tmp_path, capsys):
    key, value, needle = HF_CONFIG_VALUES[kind]
    src = Path(shutil.copytree(tiny_hf(NAME)[0], tmp_path / "hf"))
    config = json.loads((src / "config.json").read_text())
    config[key] = value
    (src / "config.json").write_text(json.dumps(config))
    if (src / "generation_config.json").exists() and key == "eos_token_id":
        (src / "generation_config.json").unlink()
    started = time.perf_counter()
    refused(["export", src, "--out", tmp_path / "out", "--quiet"], capsys, tmp_path, "config.json", needle)
    assert time.perf_counter() - started < 5, "refused only after allocating for the absurd value"


def _sharded(src: Path, weight_map) -> None:
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


CHECKPOINT_FILES = {
    "weight-map-list": (lambda src: _sharded(src, ["model.safetensors"]), "weight_map"),
    "weight-map-dotdot": (lambda src: _sharded(src, {"x": "../model.safetensors"}), "weight_map"),
    "weight-map-absolute": (lambda src: _sharded(src, {"x": str(src / "model.safetensors")}), "weight_map"),
    "generation-bos-string": (lambda src: (src / "generation_config.json").write_text('{"bos_token_id": "<s>"}'),
                              "bos_token_id"),
    "template-a-number": (lambda src: (src / "tokenizer_config.json").write_text('{"chat_template": 42}'),
                          "chat_template"),
    "template-list-of-numbers": (lambda src: (src / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "default", "template": 7}]}'), "chat_template"),
}


@pytest.mark.parametrize("kind", list(CHECKPOINT_FILES))
def test_checkpoint_side_files(kind, tiny_hf, tmp_path, capsys):
    make, needle = CHECKPOINT_FILES[kind]
    src = Path(shutil.copytree(tiny_hf(NAME)[0], tmp_path / "hf"))
    make(src)
    refused(["export", src, "--out", tmp_path / "out", "--quiet"], capsys, tmp_path, needle)


def _safetensors_header_edit(data: bytes, edit) -> bytes:
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    edit(header[name])
    new = json.dumps(header).encode()
    return struct.pack("<Q", len(new)) + new + data[8 + n:]


SAFETENSORS_ENTRIES = {
    "impossible-shape": lambda e: e.update(shape=[10**6, 10**6]),
    "negative-shape": lambda e: e.update(shape=[-1, 64]),
    "shape-a-string": lambda e: e.update(shape="64x64"),
    "unknown-dtype": lambda e: e.update(dtype="F7"),
    "offsets-reversed": lambda e: e.update(data_offsets=e["data_offsets"][::-1]),
}


@pytest.mark.parametrize("damage", list(SAFETENSORS_ENTRIES))
def test_safetensors_entries(damage, tiny_hf, tmp_path, capsys):
    """A header entry whose dtype x shape does not match its bytes (a shape of 10**12 elements) is refused
    by name before any tensor is read."""
    src = Path(shutil.copytree(tiny_hf(NAME)[0], tmp_path / "hf"))
    st = src / "model.safetensors"
    st.write_bytes(_safetensors_header_edit(st.read_bytes(), SAFETENSORS_ENTRIES[damage]))
    refused(["export", src, "--out", tmp_path / "out", "--quiet"], capsys, tmp_path, "model.safetensors", "tensor")


def test_gguf_absurd_block_count(tmp_path, capsys):
    import gguf
    path = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 10**9), (w.add_context_length, 64), (w.add_embedding_length, 8),
                       (w.add_head_count, 2), (w.add_feed_forward_length, 16)):
        add(value)
    w.add_tensor("token_embd.weight", np.zeros((32, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(["export", path, "--out", tmp_path / "out", "--quiet"], capsys, tmp_path, "model.gguf", "n_layers")


def test_meta_absurd_layers(meta_folder, tmp_path, capsys):
    src = Path(shutil.copytree(meta_folder, tmp_path / "meta"))
    params = json.loads((src / "params.json").read_text())
    params["n_layers"] = 10**9
    (src / "params.json").write_text(json.dumps(params))
    refused(["export", src, "--out", tmp_path / "out", "--quiet"], capsys, tmp_path, "n_layers")


MANIFEST_VS_GRAPHS = {
    "fewer-layers": (_set("spec.n_layers", 1), "n_layers"), "more-layers": (_set("spec.n_layers", 3), "n_layers"),
    "layers-1e9": (_set("spec.n_layers", 10**9), "n_layers"), "max-seq-beyond-rotary": (_set("max_seq", 4096), "rotary"),
    "max-seq-1e12": (_set("max_seq", 10**12), "max_seq"), "kv-heads-differ": (_set("spec.n_kv_heads", 4), "n_kv_heads"),
    "head-dim-differs": (_set("spec.head_dim", 32), "head_dim"), "max-batch-1e6": (_set("max_batch", 10**6), "max_batch"),
    "eos-a-string": (_set("special_tokens.eos_token_id", "</s>"), "eos_token_id"),
    "bos-outside-vocab": (_set("special_tokens.bos_token_id", 10**6), "bos_token_id"),
    "pad-a-list-of-strings": (_set("special_tokens.pad_token_id", ["<pad>"]), "pad_token_id"),
    "template-a-number": (_set("chat_template", 42), "chat_template"),
}


@pytest.mark.parametrize("kind", list(MANIFEST_VS_GRAPHS))
def test_manifest_against_graphs_and_bounds(kind, bundle, tmp_path, capsys):
    edit, needle = MANIFEST_VS_GRAPHS[kind]
    _edit_manifest(bundle, edit)
    refused(gen_args(bundle), capsys, tmp_path, "manifest.json", needle)


def test_kv_cache_larger_than_memory(bundle, tmp_path, monkeypatch, capsys):
    """max_seq x max_batch within each bound but a cache beyond this machine's memory: refused before
    the allocation (the portable graph has no rotary table to bound max_seq)."""
    from ardeploy.runtime import manifest_checks
    monkeypatch.setattr(manifest_checks, "host_memory_bytes", lambda: 2**12)      # the tiny cache: 64 KiB
    refused(gen_args(bundle) + ["--flavor", "portable"], capsys, tmp_path, str(bundle), "KV cache", "--max-seq")


# -- chat templates that fail -----------------------------------------------------------------------
TEMPLATES = {"raise-exception": ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
             "sandbox-attribute": ("{{ messages.__class__.__mro__ }}", "sandbox"),
             "sandbox-subclasses": ("{% for m in messages %}{{ m.__class__.__subclasses__() }}{% endfor %}", "sandbox"),
             "syntax": ("{% for m in %}", "not a valid template"), "undefined-call": ("{{ nothing() }}", "undefined"),
             "type-error": ("{{ messages + 1 }}", "TypeError"), "division": ("{{ 1 // 0 }}", "ZeroDivisionError")}


@pytest.mark.parametrize("kind", list(TEMPLATES))
def test_chat_template_failures(kind, bundle, tmp_path, capsys):
    template, needle = TEMPLATES[kind]
    _edit_manifest(bundle, _set("chat_template", template))
    refused(gen_args(bundle) + ["--chat"], capsys, tmp_path, "chat template", needle)


# -- text encodings and standard streams ------------------------------------------------------------
TEXT_OPTIONS = {"prompt": ["--prompt", "caf\udce9"], "stop": ["--prompt", "hi", "--stop", "\udcff"],
                "stop-escaped-trailing-backslash": ["--prompt", "hi", "--stop-escaped", "end\\"],
                "stop-escaped-unknown": ["--prompt", "hi", "--stop-escaped", "\\q"]}


@pytest.mark.parametrize("kind", list(TEXT_OPTIONS))
def test_text_options(kind, tiny_bundle, tmp_path, capsys):
    """Command-line text that is not UTF-8 arrives as lone surrogates (os.fsdecode): refused by name."""
    args = ["generate", tiny_bundle, "--max-new-tokens", "2", "--greedy", "--quiet", *TEXT_OPTIONS[kind]]
    refused(args, capsys, tmp_path, "--stop-escaped" if "escaped" in kind else "--" + kind.split("-")[0],
            watch=(tiny_bundle,))


def _chat_stdin(text: bytes):
    import io
    return io.TextIOWrapper(io.BytesIO(text), encoding="utf-8")


STDIN_CASES = {"invalid-utf8": lambda: _chat_stdin(b"hello\n\xff\xfe\n"), "closed": lambda: None,
               "closed-file": lambda: (lambda f: (f.close(), f)[1])(_chat_stdin(b"hi\n")),
               "system-not-utf8": lambda: _chat_stdin(b"hi\n")}


@pytest.mark.parametrize("kind", list(STDIN_CASES))
def test_chat_input(kind, bundle, tmp_path, monkeypatch, capsys):
    """A chat line that is not UTF-8 is named by its number; a closed stdin is said to be closed."""
    _edit_manifest(bundle, _set("chat_template", "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"))
    monkeypatch.setattr(sys, "stdin", STDIN_CASES[kind]())
    extra = ["--system", "\udcff"] if kind == "system-not-utf8" else []
    from ardeploy.cli import main
    capsys.readouterr()
    code = main([str(a) for a in ["chat", bundle, "--max-new-tokens", "2", "--greedy", "--quiet", *extra]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("ardeploy: error:") and "Traceback" not in "".join(err), err
    assert ("line 2" if kind == "invalid-utf8" else "--system" if "system" in kind else "closed") in err[-1], err


@pytest.mark.parametrize("kind", ["closed", "closed-file"])
def test_prompt_file_from_a_closed_stdin(kind, tiny_bundle, tmp_path, monkeypatch, capsys):
    """`generate --prompt-file -` with standard input closed (`<&-`): was an internal error (AttributeError)."""
    monkeypatch.setattr(sys, "stdin", STDIN_CASES[kind]())
    refused(["generate", tiny_bundle, "--prompt-file", "-", "--max-new-tokens", "2", "--quiet"], capsys, tmp_path,
            "--prompt-file -", "closed", watch=(tiny_bundle,))


def test_stop_strings_taken_literally(tiny_bundle, capsys):
    """A literal --stop (é, a backslash at the end) stops where the text has it; escapes only with
    --stop-escaped. Both used to go through unicode_escape (é never matched; a final backslash crashed)."""
    from ardeploy.cli import build_parser
    from ardeploy.cli.options import sampling_config
    args = build_parser().parse_args(["generate", "b", "--stop", "é", "--stop", "a\\", "--stop", "\\n",
                                      "--stop-escaped", "\\n", "--stop-escaped", "\\u00e9"])
    assert sampling_config(args).stop == ["é", "a\\", "\\n", "\n", "é"]
    from ardeploy.runtime import Generator, SamplingConfig
    gen = Generator.load(tiny_bundle, threads=1)
    seed, text = next((seed, text) for seed in range(20)
                      if len(text := gen.generate("hello", SamplingConfig(max_new_tokens=16, seed=seed)).text) >= 6)
    stop = text[3:5]                         # whatever characters the random model wrote, taken literally
    cut = gen.generate("hello", SamplingConfig(max_new_tokens=16, seed=seed, stop=[stop]))
    assert cut.stop_reason == "stop_string" and cut.text == text[:text.index(stop)]


BROKEN_PIPES = {"generate": (["generate", "--prompt", "hello", "--max-new-tokens", "20"], b""),
                "generate-json": (["generate", "--prompt", "hello", "--max-new-tokens", "3", "--json"], b""),
                "chat": (["chat", "--max-new-tokens", "20"], b"hello\nagain\n")}


@pytest.mark.parametrize("kind", list(BROKEN_PIPES))
def test_broken_pipe_is_quiet(kind, tiny_bundle):
    """stdout closed by its reader (`| head`): exit 141 (or 0 when nothing was left to write), nothing on stderr.
    The read end is closed before the command starts, so its first write already fails."""
    argv, stdin = BROKEN_PIPES[kind]
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-c", "import sys; from ardeploy.cli import main; sys.exit(main())",
                           argv[0], str(tiny_bundle), *argv[1:], "--greedy", "--threads", "1", "--quiet"],
                          stdout=write, stderr=subprocess.PIPE, input=stdin, timeout=120)
    os.close(write)
    err = [line for line in proc.stderr.decode().splitlines() if not line.startswith(("chat:", "["))]
    assert proc.returncode in (141, 0) and err == [], (proc.returncode, proc.stderr.decode())


# -- argparse errors --------------------------------------------------------------------------------
ARGPARSE_CASES = {"unknown-option": ["generate", "B", "--bogus"], "bad-int": ["generate", "B", "--top-k", "1.5"],
                  "missing-required": ["export", "x"], "bad-choice": ["export", "x", "--out", "o", "--dtype", "int3"],
                  "no-command": [], "unknown-command": ["frobnicate"]}


@pytest.mark.parametrize("kind", list(ARGPARSE_CASES))
def test_argparse_errors_one_line(kind, capsys):
    from ardeploy.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(ARGPARSE_CASES[kind])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("ardeploy: error:") and "--help" in err[0], err


# -- numerics ---------------------------------------------------------------------------------------
def test_tiny_temperature_is_greedy(tiny_bundle):
    """--temperature 1e-300 used to turn the logits into NaN and always pick the last vocabulary id."""
    from ardeploy.runtime import Generator, SamplingConfig
    gen = Generator.load(tiny_bundle, threads=1)
    greedy = gen.generate("hello", SamplingConfig(max_new_tokens=8, greedy=True)).token_ids
    for temperature in (1e-300, 1e-30, 1e-6):
        tiny = gen.generate("hello", SamplingConfig(max_new_tokens=8, temperature=temperature, seed=3)).token_ids
        assert tiny == greedy, temperature


def test_overflowing_repetition_penalty_draws_from_the_limit():
    from ardeploy.runtime.sampling import Sampler, SamplingConfig
    logits = np.array([[1.0, 3.0, 2.0, -1.0]], np.float32)
    sampler = Sampler(SamplingConfig(repetition_penalty=1e-300, seed=0), 1)
    tokens = {int(sampler(logits, [[1, 2]])[0]) for _ in range(20)}
    assert tokens <= {1, 2} and len(tokens) == 2           # the two overflowed entries, equally likely


def test_nan_weights_are_refused_naming_the_step(bundle, tmp_path, capsys):
    """A graph giving NaN logits used to yield token 0 (argmax's first NaN) silently."""
    w = bundle / "weights.bin"
    w.write_bytes(np.full(w.stat().st_size // 4, np.nan, np.float32).tobytes())
    refused(gen_args(bundle), capsys, tmp_path, "not finite", "prompt")


def test_non_finite_logits_at_a_decode_step():
    from ardeploy.runtime.errors import UserError
    from ardeploy.runtime.sampling import Sampler, SamplingConfig, check_finite
    sampler = Sampler(SamplingConfig(greedy=True), 2)
    sampler(np.zeros((2, 5), np.float32), [[], []])
    with pytest.raises(UserError, match="decode step 1.*row 1"):
        sampler(np.array([[0, 1, 2, 3, 4], [0, np.nan, 0, 0, 0]], np.float32), [[], []])
    check_finite(np.array([[-np.inf, 0.0]], np.float32), 3)               # -inf masks are allowed
    with pytest.raises(UserError, match="decode step 3"):
        check_finite(np.array([[-np.inf, -np.inf]], np.float32), 3)


# -- the Python API ---------------------------------------------------------------------------------
API_VALUES = {"top_k": 2.5, "seed": 1.5, "max_new_tokens": "5", "temperature": "hot", "top_p": None,
              "greedy": "yes", "stop": "END", "repetition_penalty": [1.1], "min_p": True}


@pytest.mark.parametrize("field", list(API_VALUES))
def test_api_type_errors(field):
    """A float top_k or seed failed inside numpy with a TypeError; now ardeploy's own one-line error."""
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.errors import UserError
    with pytest.raises(UserError, match=field) as error:
        SamplingConfig(**{field: API_VALUES[field]})
    assert "\n" not in str(error.value)


# -- the counts --------------------------------------------------------------------------------------
CASES = {
    "manifest.json": len(MANIFEST_TEXT) + len(MANIFEST_EDITS) + 1 + len(MANIFEST_SEEDS),
    "weights.bin": 4,
    ".onnx": 4 + 2 + 1,
    "tokenizer.json": len(TOKENIZER_TEXT),
    "GGUF": len(GGUF_DAMAGE) + 8,
    "safetensors (+ config.json)": len(SAFETENSORS_DAMAGE) + 6 + len(CONFIG_DAMAGE),
    "Meta params.json (+ shard)": len(PARAMS_DAMAGE) + 1,
    "LlamaGen .pt": len(PT_DAMAGE),
    "calibration/eval text": len(TEXT_DAMAGE) + 3 + 2,
    "CLI values": len(GENERATE_ARGS) + len(EXPORT_ARGS) + len(OTHER_ARGS),
    # the second pass (issue 21)
    "path confinement (bundle, engines.json, calibrate)": len(PATH_ESCAPES) + 1 + len(ENGINE_ESCAPES),
    "--force and concurrent writers": 7,
    "file system (ENOSPC, EDQUOT, EROFS, EACCES, non-empty --out, a PNG under a missing folder)": len(FS_ERRORS) + 3,
    "signals and killed runs": len(SIGNAL_CASES) + 1,
    "absurd or mistyped checkpoint values": len(HF_CONFIG_VALUES) + len(CHECKPOINT_FILES) + len(SAFETENSORS_ENTRIES) + 2,
    "manifest against its graphs and bounds": len(MANIFEST_VS_GRAPHS) + 1,
    "chat templates": len(TEMPLATES),
    "text encodings and standard input": len(TEXT_OPTIONS) + len(STDIN_CASES) + 1 + 2,
    "broken pipes": len(BROKEN_PIPES),
    "argparse errors": len(ARGPARSE_CASES),
    "numerics": 4,
    "Python API types": len(API_VALUES),
}


def test_case_counts():
    print("fuzz cases per input kind:", json.dumps(CASES))
    assert sum(CASES.values()) >= 250
