"""Loader details: sharded safetensors, Meta model-parallel shards (merged lazily), the RoPE row
permutation, and the SentencePiece -> tokenizers conversion (against sentencepiece itself)."""
from __future__ import annotations

import json

import pytest
import torch

from ardeploy.export.checkpoint import permute_to_interleaved, unpermute_interleaved
from ardeploy.export.registry import load_checkpoint


def test_sharded_checkpoint_loads_the_same_tensors(tiny_hf, tmp_path):
    folder, model = tiny_hf("mha_untied_theta")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    a, b = load_checkpoint(folder), load_checkpoint(tmp_path)
    assert a.spec == b.spec and set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert torch.equal(a.tensors[name].load(), b.tensors[name].load()), name


def test_interleaved_rope_permutation_is_exact():
    """Rotating interleaved pairs of w@x equals rotating halves of (permuted w)@x."""
    torch.manual_seed(0)
    heads, hd, dim = 3, 8, 16
    w, x = torch.randn(heads * hd, dim), torch.randn(dim)
    theta = torch.rand(hd // 2)
    q = (w @ x).view(heads, hd)
    pairs = torch.view_as_complex(q.view(heads, hd // 2, 2).contiguous()) * torch.polar(torch.ones_like(theta), theta)
    interleaved = torch.view_as_real(pairs).reshape(heads, hd)
    qh = (unpermute_interleaved(w, heads) @ x).view(heads, hd)
    cos, sin = torch.cat([theta.cos()] * 2), torch.cat([theta.sin()] * 2)
    halves = qh * cos + torch.cat((-qh[:, hd // 2:], qh[:, : hd // 2]), -1) * sin
    # the same rotation, the second in the half-split order of its rows
    assert torch.allclose(unpermute_interleaved(interleaved.reshape(-1, 1), heads).view(heads, hd), halves, atol=1e-6)
    assert torch.equal(permute_to_interleaved(unpermute_interleaved(w, heads), heads), w)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_conversion_matches_sentencepiece(tmp_path, model_type):
    spm = pytest.importorskip("sentencepiece")
    import inspect
    import textwrap

    from tokenizers import Tokenizer

    from ardeploy.export.tokenizer_convert import from_tokenizer_model
    corpus = tmp_path / "corpus.txt"
    text = "\n".join(textwrap.dedent(inspect.getdoc(obj) or "") for obj in (str, dict, list, int, float, open, zip, map))
    corpus.write_text(text + "\n长江是中国最长的河流。黄河是中国第二长河。\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type=model_type, byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   # as Llama's tokenizer.model: no normalization, spaces kept
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tok_json, specials = from_tokenizer_model(tmp_path / "sp.model")
    tok = Tokenizer.from_str(tok_json)
    assert specials["bos_token_id"] == 1 and specials["eos_token_id"] == [2]
    samples = ["Return a new list.", "  leading spaces and  double  spaces", "numbers 12345 and ünïcödé",
               "长江是河流", "emoji 🌊 falls back to bytes"]
    for s in samples:
        ids = tok.encode(s).ids
        assert ids == [1] + sp.encode(s), s           # BOS then SentencePiece's own ids
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(s)), s


def test_sentencepiece_with_normalization_is_refused(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from ardeploy.export.checkpoint import CheckpointError
    from ardeploy.export.tokenizer_convert import from_tokenizer_model
    (tmp_path / "c.txt").write_text("some text to train on\n" * 50 + "other words here\n" * 50)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe")     # default nmt_nfkc normalization
    with pytest.raises(CheckpointError, match="normalization"):
        from_tokenizer_model(tmp_path / "sp.model")


# -- Meta folders over several model-parallel shards ---------------------------------------------
@pytest.fixture(scope="module")
def meta_folders(tmp_path_factory):
    """The tiny Meta model (conftest.META_CONFIG) in one shard and in two."""
    from conftest import make_hf_model, meta_state_dict, write_meta_folder
    model = make_hf_model("meta")
    meta, root = meta_state_dict(model), tmp_path_factory.mktemp("meta")
    return tuple(write_meta_folder(root / name, meta, model.config, n) for name, n in (("one", 1), ("two", 2)))


def test_meta_two_shards_load_the_same_tensors_lazily(meta_folders, monkeypatch):
    """Two shards give the one-shard tensors bit for bit; opening them maps the files (torch.load with
    mmap and weights_only, once per shard) and concatenates nothing until a tensor is loaded, and a
    tensor's load concatenates exactly its slices, one per shard."""
    one, two = meta_folders
    loads, cats = [], []
    real_load, real_cat = torch.load, torch.cat
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw) or real_load(*a, **kw))
    monkeypatch.setattr(torch, "cat", lambda parts, *a, **kw: cats.append(len(parts)) or real_cat(parts, *a, **kw))
    b = load_checkpoint(two)
    assert len(loads) == 2 and all(kw.get("mmap") and kw.get("weights_only") for kw in loads)
    assert cats == []                       # nothing merged (nor read) up front
    b.tensors["layers.1.mlp.down_proj.weight"].load()
    assert cats == [2]
    monkeypatch.undo()
    a = load_checkpoint(one)
    assert a.spec == b.spec and set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].shape == b.tensors[name].shape, name
        tensor = b.tensors[name].load()
        assert tensor.shape == b.tensors[name].shape and torch.equal(a.tensors[name].load(), tensor), name


def test_meta_two_shards_export_the_same_weights(meta_folders, tmp_path):
    from ardeploy.export.bundle import export_path
    one, two = meta_folders
    for folder in meta_folders:
        export_path(folder, tmp_path / folder.name, quiet=True, max_seq=64)
    assert (tmp_path / "one" / "weights.bin").read_bytes() == (tmp_path / "two" / "weights.bin").read_bytes()
    manifests = [json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("one", "two")]
    assert manifests[0]["spec"] == manifests[1]["spec"]
    assert len(manifests[1]["source"]["files"]) == 2


def test_meta_shards_that_disagree_are_refused(meta_folders, tmp_path):
    from ardeploy.export.checkpoint import CheckpointError
    _, two = meta_folders
    shard = torch.load(two / "consolidated.01.pth", weights_only=True)
    for case, change in {"missing": lambda sd: sd.pop("layers.0.attention.wv.weight"),
                         "shape": lambda sd: sd.update({"layers.0.attention.wo.weight": torch.zeros(3, 3)})}.items():
        bad = tmp_path / case
        bad.mkdir()
        (bad / "params.json").write_bytes((two / "params.json").read_bytes())
        (bad / "consolidated.00.pth").write_bytes((two / "consolidated.00.pth").read_bytes())
        changed = dict(shard)
        change(changed)
        torch.save(changed, bad / "consolidated.01.pth")
        with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth.*layers\.0\.attention\.w"):
            load_checkpoint(bad)
