"""LlamaGen: tiny random GPTs in LlamaGen's own layout (.pt state dicts), exported and run by our runtime.

`RefLlamaGen` / `ref_generate` (scripts/llamagen_reference.py) are a plain PyTorch rendering of
LlamaGen's cached generation loop (autoregressive/models/gpt.py + generate.py): fused wqkv, interleaved-pair 2D rotary table with
zero rows for the prefix, gpt-fast style KV cache and boolean mask, CFG on raw logits
(`uncond + (cond - uncond) * s`, cond rows first), temperature, top-k, top-p (HF v3 style), softmax.
Its only departure: the categorical draw uses the same per-image numpy generators as our runtime
(inverse CDF) instead of torch.multinomial, so that tokens can be compared one for one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error, threads
from llamagen_reference import RefLlamaGen, ref_generate

V, DIM, LAYERS, HEADS, CLASSES = 64, 64, 2, 4, 10
IMAGE, GRID = 16, 8               # tiny VQ: 2 pixels per token -> 8x8 tokens
CAPTION_DIM, CAPTION_T = 32, 120
ATOL = 1e-4


# -- fixtures ----------------------------------------------------------------------------------------
def janus_vq(seed: int = 0):
    from transformers import JanusVQVAE, JanusVQVAEConfig
    torch.manual_seed(seed)
    cfg = JanusVQVAEConfig(embed_dim=8, num_embeddings=V, latent_channels=32, base_channels=32,
                           channel_multiplier=[1, 2], num_res_blocks=1, num_patches=GRID)
    model = JanusVQVAE(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p) if n.endswith("weight") else 0.1 * torch.randn_like(p))
    return model


def janus_to_llamagen(sd: dict) -> dict:
    """transformers' JanusVQVAE names -> LlamaGen vq_model.py names (the same architecture)."""
    out = {}
    for k, v in sd.items():
        k = (k.replace("decoder.mid.block_1.", "decoder.mid.0.").replace("decoder.mid.attn_1.", "decoder.mid.1.")
              .replace("decoder.mid.block_2.", "decoder.mid.2.").replace("decoder.up.", "decoder.conv_blocks."))
        if k.startswith("decoder.conv_blocks."):
            k = k.replace(".block.", ".res.")
        out[k] = v.clone()
    out["quantize.codebook_used"] = torch.zeros(65536)
    return out


@pytest.fixture(scope="module")
def c2i(tmp_path_factory):
    """(reference GPT, JanusVQVAE, bundle folder, gpt .pt, vq .pt)."""
    import argparse

    from ardeploy.export.bundle import export_path
    d = tmp_path_factory.mktemp("llamagen_c2i")
    torch.manual_seed(1)
    ref = RefLlamaGen("c2i").eval()
    vq = janus_vq()
    # Training-checkpoint containers, argparse args included (as LlamaGen's train scripts save them).
    torch.save({"model": ref.gpt_state_dict(), "steps": 5, "args": argparse.Namespace(gpt_model="tiny")}, d / "gpt.pt")
    torch.save({"model": janus_to_llamagen(vq.state_dict())}, d / "vq.pt")
    export_path(d / "gpt.pt", d / "bundle", family="llamagen-c2i", quiet=True, score_graph=False, max_batch=4,
                family_options={"image_size": IMAGE, "vq": str(d / "vq.pt"), "n_head": HEADS})
    return ref, vq, d / "bundle", d / "gpt.pt", d / "vq.pt"


@pytest.fixture(scope="module", params=["ort", "portable"])
def generator(c2i, request):
    """Both graph flavors of the bundle: the ONNX Runtime graph (GroupQueryAttention, the 2D rotary as
    its cos/sin tables; the runtime's default) and the portable one."""
    from ardeploy.runtime.image import ImageGenerator
    gen = ImageGenerator.load(c2i[2], threads=threads(), flavor=request.param)
    assert gen.backend.flavor == request.param
    return gen


def has_cuda() -> bool:
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


# -- tests -------------------------------------------------------------------------------------------
def test_manifest_describes_the_image_model(c2i):
    m = json.loads((c2i[2] / "manifest.json").read_text())
    img = m["image"]
    assert m["family"] == "llamagen-c2i" and m["spec"]["architecture"] == "LlamaGen"
    assert img["grid"] == [GRID, GRID] and img["class_conditional"] == {"num_classes": CLASSES, "token_offset": V,
                                                                       "null_class": CLASSES}
    assert m["max_seq"] == 1 + GRID * GRID and m["max_batch"] >= 2
    assert set(m["graphs"]) == {"prefill", "decode", "decode_ort", "vq_decoder"}
    assert m["graphs"]["decode_ort"]["flavor"] == "ort"
    assert m["graphs"]["decode_ort"]["kv_layout"]["order"] == ["batch", "kv_head", "time", "head_dim"]
    assert img["vq"]["downsample"] == 2 and img["vq"]["config"]["level_channels"] == [32, 64]
    # one shared weights file: no graph carries large inline initializers
    assert sum(p.stat().st_size for p in c2i[2].glob("*.onnx")) < 2_000_000


@pytest.mark.parametrize("cfg_scale,cfg_interval,top_k,top_p,temperature", [
    (4.0, -1, 20, 1.0, 1.0),      # LlamaGen's sample_c2i defaults, scaled to a 64-code vocabulary
    (2.0, 3, 0, 0.9, 0.8),        # cfg_interval, top-p and a temperature
])
def test_tokens_equal_reference_loop(c2i, generator, cfg_scale, cfg_interval, top_k, top_p, temperature):
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageRequest, ImageSettings
    ref = c2i[0]
    classes = [3, 7]
    ref_codes, ref_logits = ref_generate(ref, torch.tensor(classes), cfg_scale, cfg_interval, temperature, top_k,
                                         top_p, seed=11)
    trace: list = []
    settings = ImageSettings(guidance=Guidance(cfg_scale, cfg_interval),
                             visual=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p), seed=11)
    results = generator.generate([ImageRequest(class_id=c) for c in classes], settings, trace=trace, decode=False)
    ours = np.stack([r.codes.reshape(-1) for r in results])
    deltas = [float(np.abs(a - b).max()) for a, b in zip(ref_logits, trace)]
    print(f"cfg {cfg_scale}: {len(deltas)} steps, max |dlogits| {max(deltas):.3g}")
    assert len(trace) == len(ref_logits) == GRID * GRID
    assert max(deltas) <= ATOL
    assert ours.tolist() == ref_codes.tolist()


def test_no_guidance_runs_conditional_rows_only(c2i, generator):
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageRequest, ImageSettings
    ref_codes, _ = ref_generate(c2i[0], torch.tensor([5]), 1.0, top_k=10, seed=3)
    trace: list = []
    res = generator.generate([ImageRequest(class_id=5)], ImageSettings(Guidance(1.0), SamplingConfig(top_k=10), seed=3),
                             trace=trace, decode=False)
    assert trace[0].shape[0] == 1 and res[0].codes.reshape(-1).tolist() == ref_codes[0].tolist()


def test_ort_graph_is_fused(c2i):
    """The ONNX Runtime graph: one GroupQueryAttention per layer over a batch-major cache, no portable
    attention left, and the rotary tables are LlamaGen's (prefix row zero, image token i at row 1 + i)."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(c2i[2] / "decode_ort.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == LAYERS and "Softmax" not in ops
    tables = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("rotary.")}
    cos, sin = tables["rotary.grid.cos"], tables["rotary.grid.sin"]
    hd = DIM // HEADS
    assert cos.shape == sin.shape == (1 + GRID * GRID, hd // 2)
    assert not cos[0].any() and not sin[0].any()                  # the class token: q = k = 0
    table = c2i[0].table                                          # LlamaGen's (pos, hd/2, [cos, sin])
    assert np.allclose(cos, table[..., 0].numpy(), atol=1e-6) and np.allclose(sin, table[..., 1].numpy(), atol=1e-6)


def test_flavors_agree(c2i):
    """The same seed through both flavors: the same codes, logits within 1e-5 at every step."""
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageRequest, ImageSettings
    settings = ImageSettings(Guidance(4.0), SamplingConfig(top_k=20), seed=5)
    runs = {}
    for flavor in ("ort", "portable"):
        trace: list = []
        gen = ImageGenerator.load(c2i[2], threads=threads(), flavor=flavor)
        res = gen.generate([ImageRequest(class_id=c) for c in (1, 2, 9)], ImageSettings(**vars(settings)), trace=trace,
                           decode=False)
        runs[flavor] = (np.stack([r.codes for r in res]), trace)
    deltas = [float(np.abs(a - b).max()) for a, b in zip(runs["ort"][1], runs["portable"][1])]
    print(f"ort vs portable graph: {len(deltas)} steps, max |dlogits| {max(deltas):.3g}")
    assert max(deltas) <= 1e-5 and np.array_equal(runs["ort"][0], runs["portable"][0])


def test_device_cuda_without_gpu_is_one_line(c2i, tmp_path, capsys):
    if has_cuda():
        pytest.skip("onnxruntime-gpu is installed: the missing-provider error cannot happen")
    from ardeploy.cli import main
    one_line_error(main(["generate-image", str(c2i[2]), "--class-id", "1", "--device", "cuda",
                         "--out", str(tmp_path / "x")]), capsys, "onnxruntime-gpu")
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not has_cuda(), reason="needs an NVIDIA GPU with onnxruntime-gpu")
def test_cuda_gives_the_cpu_codes(c2i):
    """FP32 on ONNX Runtime CUDA (the CUDA-graph step, the sampler graph on the GPU) against the CPU's
    host sampler: the same codes for a fixed seed and logits within 1e-4 at every step. This needs
    the CUDA provider's TF32 matmuls off for FP32 (use_tf32=0): with them on, logits differ by ~3e-3
    and the draws part within a few dozen codes (measured on an H200)."""
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageRequest, ImageSettings
    runs = {}
    for device in ("cpu", "cuda"):
        trace: list = []
        gen = ImageGenerator.load(c2i[2], threads=threads(), device=device)
        res = gen.generate([ImageRequest(class_id=c) for c in (3, 7)],
                           ImageSettings(Guidance(4.0), SamplingConfig(top_k=20), seed=2), trace=trace)
        runs[device] = (np.stack([r.codes for r in res]), trace, np.stack([r.image for r in res]))
    same = runs["cpu"][0] == runs["cuda"][0]
    first = int(np.argmin(same.all(axis=0).reshape(-1))) if not same.all() else GRID * GRID
    deltas = [float(np.abs(a - b).max()) for a, b in zip(runs["cpu"][1][:first + 1], runs["cuda"][1][:first + 1])]
    print(f"cuda vs cpu: codes equal up to {first} of {GRID * GRID}, max |dlogits| there {max(deltas):.3g}")
    assert max(deltas) <= 1e-4 and same.all()
    assert np.abs(runs["cpu"][2].astype(int) - runs["cuda"][2].astype(int)).max() <= 1


@pytest.mark.skipif(not has_cuda(), reason="needs an NVIDIA GPU with onnxruntime-gpu")
def test_cuda_draws_codes_inside_the_captured_step(c2i, tmp_path):
    """FP16 on ONNX Runtime CUDA: the step graph ends in the sampler, so every code after an image's first is
    drawn by the replayed CUDA graph itself; the codes equal the host sampler's on the same GPU (both read
    the same logits), for CFG with top-k and for greedy, and the VQ decoder turns them into pixels there."""
    from ardeploy.export.bundle import export_path
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageRequest, ImageSettings
    export_path(c2i[3], tmp_path / "b16", family="llamagen-c2i", quiet=True, score_graph=False, max_batch=4,
                dtype="fp16", family_options={"image_size": IMAGE, "vq": str(c2i[4]), "n_head": HEADS})
    gen = ImageGenerator.load(tmp_path / "b16", device="cuda")
    assert gen.backend.cuda_graph and gen.backend.sampler_tail
    requests = [ImageRequest(class_id=c) for c in (3, 7)]
    for visual in (SamplingConfig(top_k=20), SamplingConfig(greedy=True)):
        runs = {sampler: gen.generate(requests, ImageSettings(Guidance(4.0), visual, seed=5, sampler=sampler))
                for sampler in ("host", "device")}
        assert [r.codes.tolist() for r in runs["device"]] == [r.codes.tolist() for r in runs["host"]]
        assert [r.timings["codes_drawn_in_step"] for r in runs["device"]] == [GRID * GRID - 1] * 2
        assert all(r.image is not None and r.image.std() > 0 for r in runs["device"])


def test_vq16_decoder_matches_janus(c2i, generator):
    vq = c2i[1]
    rng = np.random.default_rng(0)
    for B, h, w in ((2, GRID, GRID), (1, 3, 5)):              # dynamic batch and (non-square) size
        codes = rng.integers(0, V, (B, h, w))
        vq.quantize.quant_state_dims = [h, w]
        with torch.no_grad():
            want = vq.decode(torch.tensor(codes.reshape(B, -1))).numpy()
        got = generator.decode_codes(codes)
        assert got.shape == (B, 3, 2 * h, 2 * w)
        err = float(np.abs(got - want).max())
        print(f"VQ-16 {B}x{h}x{w}: max |dpixels| {err:.3g}")
        assert err <= ATOL


def test_images_made_in_the_decoder_graph_are_to_uint8s(generator):
    """The VQ decoder's session also gives the uint8 image (so only it crosses from a GPU): exactly to_uint8
    of the pixels, for float32 and float16 pixels (out-of-range values clipped)."""
    import onnx
    from onnx import TensorProto, helper

    from ardeploy.runtime.image import add_image_output, to_uint8
    from ardeploy.runtime.sessions import open_session, session_options
    codes = np.random.default_rng(4).integers(0, V, (2, 3, 5))
    np.testing.assert_array_equal(generator.decode_codes(codes, as_images=True),
                                  to_uint8(generator.decode_codes(codes)))
    for kind, dtype in ((TensorProto.FLOAT, np.float32), (TensorProto.FLOAT16, np.float16)):
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["pixels"])], "g",
                                  [helper.make_tensor_value_info("x", kind, ["batch", 3, "h", "w"])],
                                  [helper.make_tensor_value_info("pixels", kind, ["batch", 3, "h", "w"])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        add_image_output(model)
        onnx.checker.check_model(model)
        pixels = np.random.default_rng(5).uniform(-1.3, 1.3, (2, 3, 7, 9)).astype(dtype)
        got = open_session(model.SerializeToString(), session_options(1)).run(["image"], {"x": pixels})[0]
        assert got.dtype == np.uint8 and got.shape == (2, 7, 9, 3)
        np.testing.assert_array_equal(got, to_uint8(pixels))


def test_generate_image_writes_pngs(c2i, tmp_path, capsys):
    from PIL import Image

    from ardeploy.cli import main
    out = tmp_path / "imgs"
    code = main(["generate-image", str(c2i[2]), "--class-id", "3", "--class-id", "4", "-n", "2", "--cfg", "4.0",
                 "--top-k", "20", "--seed", "0", "--out", str(out), "--save-tokens", str(tmp_path / "t.npy"),
                 "--threads", str(threads()), "--device", "cpu", "--sampler", "device"])
    assert code == 0, capsys.readouterr().err
    files = sorted(out.glob("*.png"))
    assert len(files) == 4
    for f in files:
        with Image.open(f) as im:
            im.load()
            assert im.size == (IMAGE, IMAGE) and im.mode == "RGB"
    assert np.load(tmp_path / "t.npy").shape == (4, GRID, GRID)
    single = tmp_path / "one.png"
    capsys.readouterr()
    assert main(["generate-image", str(c2i[2]), "--class-id", "1", "--class-id", "2", "--out", str(tmp_path / "two"),
                 "--greedy", "--size", f"{IMAGE}x{IMAGE}", "--json", "--threads", str(threads())]) == 0
    report = json.loads(capsys.readouterr().out)["images"]          # seconds per image, split
    assert [Path(r["file"]).name for r in report] == ["000.png", "001.png"]
    for r in report:
        assert r["tokens"] == [GRID, GRID] and r["tokens_s"] > 0 and r["decode_s"] > 0 and r["png_s"] > 0
        assert r["seconds_per_image"] == pytest.approx(r["tokens_s"] + r["decode_s"] + r["png_s"], abs=1e-3)
    assert main(["generate-image", str(c2i[2]), "--class-id", "1", "--out", str(single), "--greedy",
                 "--size", f"{IMAGE}x{IMAGE}"]) == 0
    with Image.open(single) as im:
        assert im.size == (IMAGE, IMAGE) and im.mode == "RGB"


def test_bad_input(c2i, tmp_path, capsys):
    from ardeploy.cli import main
    bundle, gpt, vqf = str(c2i[2]), c2i[3], c2i[4]
    one_line_error(main(["generate-image", bundle, "--class-id", str(CLASSES), "--out", str(tmp_path / "a")]),
                   capsys, "class id 10 is out of range")
    one_line_error(main(["generate-image", bundle, "--class-id", "1", "--size", "32x32", "--out", str(tmp_path / "b")]),
                   capsys, "16x16 images only")
    one_line_error(main(["generate-image", bundle, "--class-id", "1", "--size", "15x16", "--out", str(tmp_path / "c")]),
                   capsys, "not a multiple")
    one_line_error(main(["generate-image", bundle, "--prompt", "a cat", "--out", str(tmp_path / "d")]),
                   capsys, "class-conditional")
    assert not any(tmp_path.iterdir())                  # nothing written on bad input
    # checkpoints of another family, or of no family named
    one_line_error(main(["export", str(gpt), "--out", str(tmp_path / "e")]), capsys, "--family")
    one_line_error(main(["export", str(gpt), "--family", "llamagen-t2i", "--image-size", "16", "--out",
                         str(tmp_path / "f")]), capsys, "a LlamaGen c2i checkpoint")
    one_line_error(main(["export", str(vqf), "--family", "llamagen-c2i", "--image-size", "16", "--out",
                         str(tmp_path / "g")]), capsys, "not a LlamaGen GPT checkpoint")
    one_line_error(main(["export", str(gpt), "--family", "llamagen-c2i", "--out", str(tmp_path / "h")]),
                   capsys, "--image-size")
    one_line_error(main(["export", str(gpt), "--family", "llamagen-c2i", "--image-size", "15", "--vq", str(vqf),
                         "--out", str(tmp_path / "i")]), capsys, "not a positive multiple")
    one_line_error(main(["export", str(gpt), "--family", "emu3", "--out", str(tmp_path / "j")]), capsys,
                   "Hugging Face checkpoint folder")
    assert not any(tmp_path.iterdir())


# -- text-conditional (t2i), FP16, TensorRT-RTX ------------------------------------------------------------
@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    """(reference t2i GPT, FP16 bundle folder, gpt .pt): caption-feature prefill graph, VQ-16 in FP16."""
    from ardeploy.export.bundle import export_path
    d = tmp_path_factory.mktemp("llamagen_t2i")
    torch.manual_seed(2)
    ref = RefLlamaGen("t2i").eval()
    torch.save({"model": ref.gpt_state_dict()}, d / "gpt.pt")
    torch.save({"model": janus_to_llamagen(janus_vq(seed=1).state_dict())}, d / "vq.pt")
    export_path(d / "gpt.pt", d / "bundle", family="llamagen-t2i", dtype="fp16", quiet=True, score_graph=False,
                max_batch=4, family_options={"image_size": IMAGE, "vq": str(d / "vq.pt"), "n_head": HEADS})
    return ref, d / "bundle", d / "gpt.pt"


def captions(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (n, CAPTION_DIM)).astype(np.float32) for n in lengths]


def padded(feats):
    """LlamaGen's sample_t2i.py layout: valid tokens at the end (left padding), padded rows zero."""
    x = torch.zeros(len(feats), CAPTION_T, CAPTION_DIM)
    m = torch.zeros(len(feats), CAPTION_T)
    for b, f in enumerate(feats):
        x[b, CAPTION_T - len(f):] = torch.from_numpy(f)
        m[b, CAPTION_T - len(f):] = 1
    return x, m


def test_t2i_module_matches_reference_fp32(t2i):
    """Our PyTorch LlamaGen module (caption MLP, left-padded caption mask, forced diagonal, zero prefix
    rotary) against the reference, in FP32: prefill and teacher-forced steps, both CFG rows."""
    from ardeploy.export.model import build_model
    from ardeploy.export.registry import family_of, load_checkpoint
    ref, _, gpt = t2i
    ck = load_checkpoint(gpt, family="llamagen-t2i", image_size=IMAGE, n_head=HEADS)
    ck.spec.extra["llamagen"]["grid"] = GRID          # no --vq here: keep the reference's grid
    model = build_model(ck.spec, ck.state_dict(), torch.float32, family_of(ck).decoder)
    feats, mask = padded(captions([5, 9]))
    codes = torch.randint(0, V, (2, GRID * GRID))
    _, ref_logits = ref_generate(ref, feats, 7.5, emb_masks=mask, forced=codes)
    codes = codes[:, :6]                                # our module: the prefill and 6 decode steps
    x = torch.cat([feats, ref.cls_embedding.uncond_embedding.expand(2, -1, -1)])
    m = torch.cat([mask, mask]).long()
    with torch.no_grad():
        h, cos, sin, amask = model.prologue_caption(x, m)
        cos, sin, amask = model.block_inputs(cos, sin, amask)
        past = []
        for layer in model.layers:
            h, k, v = layer(h, cos, sin, amask)
            past.append((k, v))
        ours = [model.head(h[:, -1]).numpy()]
        for t in range(codes.shape[1]):
            m = torch.cat([m, torch.ones(4, 1, dtype=torch.long)], 1)
            logits, new = model(torch.cat([codes[:, t], codes[:, t]])[:, None], m, past)
            past = [(torch.cat([pk, k]), torch.cat([pv, v])) for (pk, pv), (k, v) in zip(past, new)]
            ours.append(logits.numpy())
    deltas = [float(np.abs(a - b).max()) for a, b in zip(ours, ref_logits)]
    print(f"t2i module fp32: max |dlogits| {max(deltas):.3g}")
    assert max(deltas) <= ATOL


def test_t2i_fp16_bundle_generates(t2i, tmp_path):
    """The FP16 bundle's caption prefill and decode steps (ONNX Runtime) against the FP32 reference,
    teacher-forced on the codes our runtime chose; then the CLI writes a PNG."""
    from PIL import Image

    from ardeploy.cli import main
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageRequest, ImageSettings
    ref, bundle, _ = t2i
    gen = ImageGenerator.load(bundle, threads=threads())
    feats = captions([5, 9], seed=1)
    trace: list = []
    res = gen.generate([ImageRequest(caption=f) for f in feats],
                       ImageSettings(Guidance(7.5), SamplingConfig(top_k=16), seed=0), trace=trace, decode=False)
    codes = torch.tensor(np.stack([r.codes.reshape(-1) for r in res]))
    x, mask = padded(feats)
    _, ref_logits = ref_generate(ref, x, 7.5, emb_masks=mask, forced=codes)
    deltas = [float(np.abs(a - b).max()) for a, b in zip(ref_logits, trace)]
    scale = max(float(np.abs(r).max()) for r in ref_logits)
    print(f"t2i fp16 bundle: max |dlogits| {max(deltas):.3g} (logits up to {scale:.3g})")
    assert len(trace) == GRID * GRID and max(deltas) <= 0.05
    np.save(tmp_path / "cap.npy", feats[0])
    out = tmp_path / "t2i.png"
    assert main(["generate-image", str(bundle), "--caption-features", str(tmp_path / "cap.npy"), "--seed", "1",
                 "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (IMAGE, IMAGE) and im.mode == "RGB"


def trt_build(path, ranges: dict) -> int:
    """Parse an ONNX graph with TensorRT-RTX and build an FP16-typed engine for SM89 on this CPU.
    ranges: dim name -> (min, opt, max). Returns the plan size."""
    import onnx
    pytest.importorskip("tensorrt_rtx_libs")
    import tensorrt_rtx_bindings as trt
    errors = []

    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity <= trt.Logger.ERROR:
                errors.append(msg)

    logger = Log()
    builder = trt.Builder(logger)
    net = builder.create_network(0)                      # TensorRT-RTX networks are strongly typed
    parser = trt.OnnxParser(net, logger)
    assert parser.parse_from_file(str(path)), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    cfg = builder.create_builder_config()
    cfg.num_compute_capabilities = 1
    cfg.set_compute_capability(trt.ComputeCapability.SM89, 0)
    profile = builder.create_optimization_profile()
    for inp in onnx.load(str(path), load_external_data=False).graph.input:
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        profile.set_shape(inp.name, *([ranges[d][k] if isinstance(d, str) else d for d in dims] for k in range(3)))
    cfg.add_optimization_profile(profile)
    plan = builder.build_serialized_network(net, cfg)
    assert plan is not None, errors
    return plan.nbytes


def test_trt_rtx_builds_fp16_graphs(t2i):
    bundle = t2i[1]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["dtype"] == "fp16"
    common = {"batch": (1, 2, 4), "height": (1, GRID, 2 * GRID), "width": (1, GRID, 2 * GRID)}
    sizes = {"prefill": trt_build(bundle / "prefill.onnx", {**common, "seq": (CAPTION_T,) * 3}),
             "decode": trt_build(bundle / "decode.onnx", {**common, "seq": (1, 1, 4), "past_seq": (1, 64, 128),
                                                          "total_seq": (2, 65, 132)}),
             "vq_decoder": trt_build(bundle / "vq_decoder.onnx", common)}
    print("TensorRT-RTX plans (SM89, FP16):", sizes)


def test_verify_reads_the_llamagen_source_again(c2i):
    """`ardeploy verify` re-reads a bare .pt with the family options recorded in the manifest."""
    from ardeploy.export.verify import verify_bundle
    rep = verify_bundle(c2i[2], steps=6, threads=threads())
    (ours,) = rep["comparisons"]
    assert ours["greedy_agree"] and ours["max_abs_dlogits"] < 1e-4
