"""Rebuild a `tokenizers` tokenizer (tokenizer.json) from GGUF metadata or a SentencePiece tokenizer.model.

The bundle always carries a tokenizer.json, so the runtime needs only the `tokenizers` package.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .errors import CheckpointError

# Pre-tokenizer split patterns, by the names llama.cpp writes in `tokenizer.ggml.pre`.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
GPT2 = {None, "default", "gpt-2", "gpt2"}

# SentencePiece / GGUF token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _byte_level_pretokenizer(pre: str | None):
    if pre in DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pattern = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}.get(pre)
    if pattern is None:
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not known to ardeploy")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _add_specials(tk: Tokenizer, tokens: list[str], types: list[int]) -> None:
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    tk.add_special_tokens(special)
    tk.add_tokens(user)


def _bos_eos_template(tk: Tokenizer, tokens, bos, eos, add_bos: bool, add_eos: bool) -> None:
    if not (add_bos and bos is not None) and not (add_eos and eos is not None):
        return
    single = ([tokens[bos]] if add_bos else []) + ["$A"] + ([tokens[eos]] if add_eos else [])
    pair = single + ["$B"]
    specials = sorted({(tokens[i], i) for i, on in ((bos, add_bos), (eos, add_eos)) if on and i is not None})
    tk.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                      special_tokens=specials)


def spm_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary: every split of a piece into two pieces,
    ranked by the merged piece's id (SentencePiece ids follow merge order), then by the parts' ids."""
    found = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((pid, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


def _sentencepiece_tokenizer(tokens, scores, types, bpe: bool, add_prefix: bool, unk_id: int | None) -> Tokenizer:
    if bpe:
        vocab = {t: i for i, t in enumerate(tokens)}
        unk = tokens[unk_id] if unk_id is not None else None
        model = models.BPE(vocab=vocab, merges=spm_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True)
    else:
        model = models.Unigram([(t, float(s)) for t, s in zip(tokens, scores)], unk_id=unk_id, byte_fallback=True)
    tk = Tokenizer(model)
    norms = [normalizers.Replace(" ", "\u2581")]
    if add_prefix:
        norms.insert(0, normalizers.Prepend("\u2581"))
    tk.normalizer = normalizers.Sequence(norms)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(steps)
    _add_specials(tk, tokens, types)
    return tk


def from_gguf(reader) -> tuple[str, dict]:
    """tokenizer.json text and special token ids from a GGUF file's `tokenizer.ggml.*` metadata."""
    def get(key, default=None):
        found = reader.fields.get(f"tokenizer.ggml.{key}")
        return default if found is None else found.contents()

    kind = get("model")
    tokens = list(get("tokens") or [])
    if not tokens:
        raise CheckpointError("GGUF file has no tokenizer.ggml.tokens")
    types = list(get("token_type") or [NORMAL] * len(tokens))
    bos, eos = get("bos_token_id"), get("eos_token_id")
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in get("merges") or []]
        tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                  fuse_unk=False, byte_fallback=False,
                                  ignore_merges=get("pre") in ("llama-bpe", "llama3")))
        tk.pre_tokenizer = _byte_level_pretokenizer(get("pre"))
        tk.decoder = decoders.ByteLevel()
        _add_specials(tk, tokens, types)
        _bos_eos_template(tk, tokens, bos, eos, bool(get("add_bos_token", False)), bool(get("add_eos_token", False)))
    elif kind == "llama":
        tk = _sentencepiece_tokenizer(tokens, get("scores") or [0.0] * len(tokens), types, bpe=True,
                                      add_prefix=bool(get("add_space_prefix", True)), unk_id=get("unknown_token_id", 0))
        _bos_eos_template(tk, tokens, bos, eos, bool(get("add_bos_token", True)), bool(get("add_eos_token", False)))
    else:
        raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    eos_ids = [int(eos)] if eos is not None else []
    eot = get("eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    pad = get("padding_token_id")
    return tk.to_str(), {"bos_token_id": None if bos is None else int(bos), "eos_token_id": eos_ids,
                         "pad_token_id": None if pad is None else int(pad)}


def from_tokenizer_model(path: Path) -> tuple[str, dict]:
    """tokenizer.json text and special ids from a SentencePiece `tokenizer.model` (Llama-2 and relatives)."""
    head = path.read_bytes()[:64]
    if head[:1].isalnum() and b" " in head.split(b"\n")[0]:
        raise CheckpointError(f"{path}: a tiktoken vocabulary (Llama 3 style) cannot be converted yet")
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise CheckpointError(f"{path}: converting it needs the `sentencepiece` package") from None
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:
        raise CheckpointError(f"{path}: not a SentencePiece model") from None
    norm = proto.normalizer_spec
    if (norm.name and norm.name != "identity") or norm.remove_extra_whitespaces:
        # Llama's models use neither; reproducing NFKC tables or whitespace folding is out of scope.
        raise CheckpointError(f"{path}: SentencePiece normalization {norm.name!r} (remove_extra_whitespaces="
                              f"{norm.remove_extra_whitespaces}) is not reproduced by the converter")
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    unk = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    tk = _sentencepiece_tokenizer(tokens, scores, types, bpe=proto.trainer_spec.model_type == 2,
                                  add_prefix=proto.normalizer_spec.add_dummy_prefix, unk_id=unk)
    bos, eos = proto.trainer_spec.bos_id, proto.trainer_spec.eos_id
    bos = bos if 0 <= bos < len(tokens) else None
    eos = eos if 0 <= eos < len(tokens) else None
    _bos_eos_template(tk, tokens, bos, eos, add_bos=True, add_eos=False)
    pad = proto.trainer_spec.pad_id
    return tk.to_str(), {"bos_token_id": bos, "eos_token_id": [eos] if eos is not None else [],
                         "pad_token_id": pad if 0 <= pad < len(tokens) else None}
