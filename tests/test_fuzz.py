"""Damaged inputs through the command line: every case must fail with exit status 2 and one stderr
line naming the file (or option) and the problem, no traceback, no partial output and nothing
outside --out touched. Fixed seeds, tiny inputs: the whole file runs in well under two minutes.

Input kinds: bundle manifest.json, weights.bin, the .onnx graphs, tokenizer.json, GGUF files,
safetensors files, Meta params.json, LlamaGen .pt files, calibration/evaluation text files and
out-of-range command-line values. CASES counts the cases per kind (the issue's closing note quotes them).
"""
from __future__ import annotations

import json
import shutil
import struct
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
}


def test_case_counts():
    print("fuzz cases per input kind:", json.dumps(CASES))
    assert sum(CASES.values()) >= 100
