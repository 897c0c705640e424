"""Loader details that need no export: sharded safetensors, the RoPE row permutation, and the
SentencePiece -> tokenizers conversion (against sentencepiece itself)."""
from __future__ import annotations

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
