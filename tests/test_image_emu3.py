"""Emu3: a tiny random `Emu3ForConditionalGeneration` (Llama LM + Emu3VQVAE) exported from its Hugging
Face folder; the LM against transformers' logits, the VQ decoder graph against `Emu3VQVAE.decode`, and
guided, constrained greedy generation against transformers' own generate() (negative prompt + prefix
constraint). Emu3.5's layout and loader run on the same machinery (its LM is Qwen3: test_export_tiny)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import one_line_error, threads

ATOL = 1e-4
SPECIALS = {"<|endoftext|>": 0, "<|extra_203|>": 1, "<|extra_204|>": 2, "<image>": 3, "<|extra_200|>": 4,
            "<|extra_201|>": 5, "<|image token|>": 6, "<|image start|>": 7, "<|image end|>": 8}
PAD, BOS, EOS, EOL, EOF, IMG, BOI, EOI = 0, 1, 2, 4, 5, 6, 7, 8
WORDS = ["a", "lighthouse", "at", "dusk", "cat", "lowres", "blurry", ",", "[UNK]"]
VIS0, CODES, VOCAB = 192, 64, 256


def vocabulary() -> dict[str, int]:
    vocab = dict(SPECIALS)
    vocab.update({str(d): 10 + d for d in range(10)})
    vocab["*"] = 20
    vocab.update({w: 21 + i for i, w in enumerate(WORDS)})
    vocab.update({f"<|visual token {i:06d}|>": VIS0 + i for i in range(CODES)})
    return vocab


def write_tokenizer(folder, vocab: dict[str, int]) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(s, special=True) for s in vocab if s.startswith("<|")])
    tok.save(str(folder / "tokenizer.json"))


def make_emu3(seed: int = 0):
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3VQVAEConfig
    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, rope_theta=1e6)
    vq = Emu3VQVAEConfig(codebook_size=CODES, embed_dim=4, latent_channels=4, base_channels=32,
                         channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[1], hidden_size=64,
                         num_attention_heads=2)
    model = Emu3ForConditionalGeneration(Emu3Config(vq_config=vq.to_dict(), text_config=text,
                                                    vocabulary_map=vocabulary())).eval()
    with torch.no_grad():   # informative values everywhere (random init leaves norms at 1, BN stats at 0/1)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p) if n.endswith("weight") else 0.1 * torch.randn_like(p))
            elif "text_model" in n and p.dim() == 2:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif n.endswith("running_var"):
                b.copy_(1 + 0.5 * torch.rand_like(b))
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def emu3(tmp_path_factory):
    from ardeploy.export.bundle import export_path
    d = tmp_path_factory.mktemp("emu3")
    model = make_emu3()
    model.save_pretrained(d / "hf")
    write_tokenizer(d / "hf", vocabulary())
    export_path(d / "hf", d / "bundle", quiet=True, score_graph=False, max_seq=128)
    return model, d / "hf", d / "bundle"


@pytest.fixture(scope="module")
def generator(emu3):
    from ardeploy.runtime.image import ImageGenerator
    return ImageGenerator.load(emu3[2], threads=threads())


def test_manifest_layout(emu3):
    m = json.loads((emu3[2] / "manifest.json").read_text())
    img = m["image"]
    assert m["family"] == "emu3" and img["layout"] == "emu3"
    assert img["visual_tokens"] == {"start": VIS0, "count": CODES}
    assert {k: img["special"][k] for k in ("boi", "img", "eoi", "eol", "eof", "bos", "eos")} == \
        {"boi": BOI, "img": IMG, "eoi": EOI, "eol": EOL, "eof": EOF, "bos": BOS, "eos": EOS}
    assert img["header_ids"]["*"] == 20 and img["vq"]["downsample"] == 2
    assert set(m["graphs"]) == {"prefill", "decode", "decode_ort", "vq_decoder"}


def test_lm_matches_transformers(emu3):
    from ardeploy.export.verify import run_bundle_greedy
    from ardeploy.runtime.backends.ort import OrtBackend
    from ardeploy.runtime.bundle import Bundle
    model, _, bundle = emu3
    prompt = [BOS, 21, 22, 23, 24, BOI, 12, 20, 13, IMG]
    b = Bundle.load(bundle)
    tokens, logits = run_bundle_greedy(OrtBackend(b, threads=threads()), b, prompt, 24)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0].float().numpy()
    ref_steps = [ref[len(prompt) - 1 + i] for i in range(len(tokens))]
    deltas = [float(np.abs(a - r).max()) for a, r in zip(logits, ref_steps)]
    print(f"Emu3 LM: max |dlogits| {max(deltas):.3g}")
    assert max(deltas) <= ATOL
    assert tokens == [int(np.argmax(r)) for r in ref_steps]


def test_vq_decoder_matches_emu3vqvae(emu3, generator):
    vq = emu3[0].model.vqmodel
    rng = np.random.default_rng(0)
    for B, h, w in ((2, 4, 4), (1, 3, 5)):
        codes = rng.integers(0, CODES, (B, h, w))
        with torch.no_grad():
            want = vq.decode(torch.tensor(codes)).numpy()
        got = generator.decode_codes(codes)
        assert got.shape == want.shape == (B, 3, 2 * h, 2 * w)
        err = float(np.abs(got - want).max())
        print(f"Emu3 VQ {B}x{h}x{w}: max |dpixels| {err:.3g}")
        assert err <= ATOL


def emu3_constraint(H: int, W: int):
    """Emu3's layout as a prefix_allowed_tokens_fn (offset counted from the last IMG)."""
    def allowed(batch_id, ids):
        ids = ids.tolist()
        offset = len(ids) - (len(ids) - 1 - ids[::-1].index(IMG))
        if offset <= H * (W + 1):
            return [EOL] if offset % (W + 1) == 0 else list(range(VIS0, VIS0 + CODES))
        return [EOF] if offset == H * (W + 1) + 1 else [EOI] if offset == H * (W + 1) + 2 else [EOS]
    return allowed


def test_guided_greedy_layout_matches_transformers(emu3, generator):
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageRequest, ImageSettings
    model = emu3[0]
    H, W = 3, 4
    prompt, negative = [BOS, 21, 22, 23, 24], [BOS, 26, 27, 28]
    header = [BOI, 10 + H, 20, 10 + W, IMG]
    settings = ImageSettings(guidance=Guidance(3.0), visual=SamplingConfig(greedy=True), size=(2 * W, 2 * H),
                             negative_ids=negative)
    res = generator.generate([ImageRequest(prompt_ids=prompt)], settings, decode=True)[0]
    expected_layout = ([None] * W + [EOL]) * H + [EOF, EOI]
    assert len(res.token_ids) == len(expected_layout)
    for tok, slot in zip(res.token_ids, expected_layout):
        assert (VIS0 <= tok < VIS0 + CODES) if slot is None else tok == slot
    assert res.codes.shape == (H, W) and res.image.shape == (2 * H, 2 * W, 3) and res.image.dtype == np.uint8
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt + header]), negative_prompt_ids=torch.tensor([negative + header]),
                             guidance_scale=3.0, prefix_allowed_tokens_fn=emu3_constraint(H, W), do_sample=False,
                             max_new_tokens=len(expected_layout), pad_token_id=PAD)
    assert res.token_ids == out[0, len(prompt) + len(header):].tolist()


def test_emu35_layout_and_unified_text_phase(emu3, generator):
    """Emu3.5's layout (no EOL after the last row, no EOF) and free text before the image: the text is
    never shown to the unconditional row, which sees its prompt, BOI and the header only."""
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageRequest, ImageSettings
    model = emu3[0]
    gen = ImageGenerator(generator.bundle, generator.backend)
    gen.layout = dataclasses.replace(gen.layout, kind="emu3.5")
    H, W = 2, 3
    prompt, negative = [BOS, 21, 25], [BOS, 26]
    trace: list = []
    settings = ImageSettings(guidance=Guidance(2.0), visual=SamplingConfig(greedy=True),
                             text=SamplingConfig(greedy=True), size=(2 * W, 2 * H), negative_ids=negative,
                             max_text_tokens=2)
    res = gen.generate([ImageRequest(prompt_ids=prompt)], settings, trace=trace, decode=False)[0]
    text, rest = res.token_ids[:2], res.token_ids[2:]
    header = [BOI, 10 + H, 20, 10 + W, IMG]
    assert all(not VIS0 <= t < VIS0 + CODES and t not in (IMG, EOI, EOL, EOF, BOI) for t in text)
    layout = [None] * W + [EOL] + [None] * W + [EOI]
    assert rest[:len(header)] == header and len(rest) == len(header) + len(layout)
    for tok, slot in zip(rest[len(header):], layout):
        assert (VIS0 <= tok < VIS0 + CODES) if slot is None else tok == slot
    # trace: prefill, 2 text steps, the header step -> logits of the first code for both rows
    first_code = trace[3]
    with torch.no_grad():
        cond = model(input_ids=torch.tensor([prompt + text + header])).logits[0, -1].numpy()
        uncond = model(input_ids=torch.tensor([negative + header])).logits[0, -1].numpy()
    assert float(np.abs(first_code[0] - cond).max()) <= ATOL
    assert float(np.abs(first_code[1] - uncond).max()) <= ATOL


def test_both_graph_flavors_draw_the_same_codes(emu3, generator):
    """The ONNX Runtime graph (GroupQueryAttention, rows at their own lengths: a cond prompt and a shorter
    negative prompt, the waiting unconditional row of the unified text phase) and the portable graph give
    the same tokens for a seed, and logits that agree to float32 rounding, in both layouts."""
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageRequest, ImageSettings
    assert generator.backend.flavor == "ort"
    portable = ImageGenerator.load(emu3[2], threads=threads(), flavor="portable")
    assert portable.backend.flavor == "portable"
    for kind, text_tokens in (("emu3", 0), ("emu3.5", 3)):
        runs = []
        for gen in (generator, portable):
            gen = ImageGenerator(gen.bundle, gen.backend)
            gen.layout = dataclasses.replace(gen.layout, kind=kind)
            settings = ImageSettings(guidance=Guidance(3.0), visual=SamplingConfig(temperature=1.0, top_k=16),
                                     text=SamplingConfig(temperature=1.0, top_k=8), size=(8, 6), seed=7,
                                     negative_ids=[BOS, 26], max_text_tokens=text_tokens)
            trace: list = []
            runs.append((gen.generate([ImageRequest(prompt_ids=[BOS, 21, 22, 23, 24])], settings, trace=trace,
                                      decode=False)[0].token_ids, trace))
        (ort_tokens, ort_trace), (portable_tokens, portable_trace) = runs
        assert ort_tokens == portable_tokens and len(ort_trace) == len(portable_trace)
        for step, (a, b) in enumerate(zip(ort_trace, portable_trace)):
            rows = [0] if 0 < step <= text_tokens else [0, 1]     # a waiting row's logits mean nothing
            assert float(np.abs(a[rows] - b[rows]).max()) <= ATOL, (kind, step)


def test_codes_drawn_inside_the_replayed_step(emu3, generator):
    """Emu3's layout (EOL after each row: the step after a row's last code takes two tokens, one position at
    a time, and the second one draws) with the sampler appended to the captured step, on the CPU stand-in:
    every code after the first is drawn inside the step, and the tokens are the host sampler's."""
    from test_image_device_sampler import drawing_in_the_step

    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageRequest, ImageSettings
    requests = [ImageRequest(prompt_ids=[BOS, 21, 22]), ImageRequest(prompt_ids=[BOS, 25, 23, 24, 22])]
    settings = dict(guidance=Guidance(3.0), visual=SamplingConfig(temperature=1.0, top_k=16), size=(8, 6), seed=3,
                    negative_ids=[BOS, 26])
    host = generator.generate(requests, ImageSettings(**settings, sampler="host"), decode=False)
    fused = drawing_in_the_step(emu3[2]).generate(requests, ImageSettings(**settings, sampler="device"), decode=False)
    assert [r.token_ids for r in fused] == [r.token_ids for r in host]
    assert [r.timings["codes_drawn_in_step"] for r in fused] == [3 * 4 - 1] * 2


def test_generate_image_cli_writes_png(emu3, tmp_path, capsys):
    from PIL import Image

    from ardeploy.cli import main
    out = tmp_path / "img.png"
    code = main(["generate-image", str(emu3[2]), "--prompt", "a lighthouse at dusk", "--cfg", "3.0", "--size", "8x6",
                 "--seed", "0", "--top-k", "8", "--negative-prompt", "lowres , blurry", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as im:
        im.load()
        assert im.size == (8, 6) and im.mode == "RGB"
    # a second run refuses to replace what is there (before generating), unless --force
    first = out.read_bytes()
    again = ["generate-image", str(emu3[2]), "--prompt", "a cat", "--size", "8x6", "--seed", "1", "--out", str(out)]
    one_line_error(main(again), capsys, f"{out}: already there (use --force")
    codes = tmp_path / "codes"                       # no .npy: written at exactly this name
    codes.write_text("mine")
    one_line_error(main([*again[:-1], str(tmp_path / "new.png"), "--save-tokens", str(codes)]), capsys,
                   f"{codes}: already there")
    assert out.read_bytes() == first and codes.read_text() == "mine" and not (tmp_path / "new.png").exists()
    assert main([*again, "--force", "--save-tokens", str(codes)]) == 0, capsys.readouterr().err
    assert out.read_bytes() != first and np.load(codes).shape == (1, 6 // 2, 8 // 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes", "img.png"]


def test_bad_input(emu3, tmp_path, capsys):
    from ardeploy.cli import main
    bundle, hf = str(emu3[2]), str(emu3[1])
    out = str(tmp_path / "x.png")
    one_line_error(main(["generate-image", bundle, "--prompt-ids", f"{BOS},21,{VIS0 + 5}", "--size", "8x8",
                         "--out", out]), capsys, "visual token")
    one_line_error(main(["generate-image", bundle, "--prompt", "a cat <|image start|>", "--size", "8x8",
                         "--out", out]), capsys, "image layout token")
    one_line_error(main(["generate-image", bundle, "--prompt", "a cat", "--size", "7x8", "--out", out]),
                   capsys, "not a multiple")
    one_line_error(main(["generate-image", bundle, "--prompt", "a cat", "--size", "64x64", "--out", out]),
                   capsys, "max_seq")
    one_line_error(main(["generate-image", bundle, "--class-id", "3", "--out", out]), capsys, "text prompt")
    one_line_error(main(["export", hf, "--family", "llamagen-c2i", "--image-size", "16", "--out",
                         str(tmp_path / "b")]), capsys, "not a folder")
    one_line_error(main(["export", hf, "--image-size", "256", "--out", str(tmp_path / "b")]), capsys,
                   "does not apply")
    assert not any(tmp_path.iterdir())
    # an output path that cannot be written fails before any token is generated
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for flags in (["--out", str(blocker / "x.png")], ["--out", str(blocker / "dir")],
                  ["--out", out, "--save-tokens", str(blocker / "codes.npy")]):
        one_line_error(main(["generate-image", bundle, "--prompt", "a cat", "--size", "8x8", *flags]), capsys,
                       f"{blocker} is not a writable folder")
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_emu35_loader(tiny_hf, tmp_path):
    """An Emu3.5-style folder (Qwen3 LM, visual tokens in tokenizer.json) loads with its layout."""
    from ardeploy.export.checkpoint import CheckpointError
    from ardeploy.export.registry import load_checkpoint
    folder, _ = tiny_hf("qwen3_qknorm")
    d = tmp_path / "emu35"
    shutil.copytree(folder, d)
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_checkpoint(d, family="emu3.5")
    write_tokenizer(d, vocabulary())
    ck = load_checkpoint(d, family="emu3.5")
    assert ck.spec.qk_norm and ck.family == "emu3.5"
    assert ck.image["layout"] == "emu3.5" and ck.image["special"]["eof"] is None
    assert ck.image["visual_tokens"] == {"start": VIS0, "count": CODES}
    assert ck.image["defaults"]["visual"]["top_k"] == 5120 and ck.image["defaults"]["text"]["top_p"] == 0.9
    with pytest.raises(CheckpointError, match="not an Emu3 checkpoint"):
        load_checkpoint(d, family="emu3")


def test_vq_decoder_builds_with_trt_rtx_fp16(emu3, tmp_path):
    """Emu3's frame-0 VQ decoder (BatchNorm, SpatialNorm with a resize to a dynamic size, Linear attention)
    as an FP16 graph, parsed and built by TensorRT-RTX for SM89 on this CPU."""
    import onnx

    import test_image_llamagen as llamagen
    from ardeploy.export.families.image_export import export_vq_graph
    from ardeploy.export.registry import load_checkpoint
    pytest.importorskip("tensorrt_rtx_libs")
    model, _ = export_vq_graph(load_checkpoint(emu3[1]).vq, torch.float16, 21)
    onnx.save_model(model, str(tmp_path / "vq16.onnx"))
    size = llamagen.trt_build(tmp_path / "vq16.onnx", {"batch": (1, 1, 2), "height": (1, 4, 16), "width": (1, 4, 16)})
    print(f"Emu3 VQ decoder FP16 plan: {size} bytes")


def test_verify_compares_with_the_unified_transformers_model(emu3):
    from ardeploy.export.verify import verify_bundle
    rep = verify_bundle(emu3[2], steps=6, threads=threads())
    names = [c["reference"] for c in rep["comparisons"]]
    assert names == ["ardeploy-pytorch-fp32", "transformers-fp32"]
    assert all(c["greedy_agree"] and c["max_abs_dlogits"] < 1e-4 for c in rep["comparisons"])
