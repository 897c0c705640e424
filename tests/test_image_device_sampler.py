"""The image sampler graph (runtime/device_sampler.py) against the host path (guidance.py + sampling.py):
the same ids from the same logits and seeds, on ONNX Runtime's CPU provider standing in for the GPU."""
from __future__ import annotations

import numpy as np
import pytest

from ardeploy.runtime.device_sampler import DeviceSampler, device_supports, sampler_feeds
from ardeploy.runtime.errors import UserError
from ardeploy.runtime.guidance import RangeSampler, guide
from ardeploy.runtime.sampling import SamplingConfig


def host_ids(cfg, logits, images, lo, hi, scale, guided, rngs):
    cond = logits[:images, lo:hi]
    uncond = logits[images:2 * images, lo:hi] if guided else None
    return RangeSampler(cfg, lo, hi, rngs)(guide(cond, uncond, scale))


@pytest.mark.parametrize("cfg,lo,hi,vocab,guided,scales", [
    (SamplingConfig(top_k=2000), 0, 16384, 16384, True, [4.0]),              # LlamaGen c2i's defaults, real size
    (SamplingConfig(top_k=20, temperature=0.7), 0, 300, 300, True, [4.0, 1.0]),   # cfg_interval: scale 1 = cond rows
    (SamplingConfig(), 40, 290, 300, True, [2.5]),                             # a visual range inside the vocabulary
    (SamplingConfig(top_k=5), 0, 128, 128, False, [1.0]),                      # no guidance, one block exactly
    (SamplingConfig(greedy=True), 10, 200, 256, True, [3.0, 1.0]),
])
def test_same_ids_as_the_host_sampler(cfg, lo, hi, vocab, guided, scales):
    images, steps = 3, 40
    rng = np.random.default_rng(0)
    host_rngs = [np.random.default_rng(7 + i) for i in range(images)]
    dev_rngs = [np.random.default_rng(7 + i) for i in range(images)]
    sampler = DeviceSampler(lo, hi, vocab)
    agree = 0
    for step in range(steps):
        logits = (rng.standard_normal((2 * images if guided else images, vocab)) * 3).astype(np.float32)
        if step % 5 == 0:
            logits = np.round(logits, 1)           # ties, at the top-k boundary too
        scale = scales[step % len(scales)]
        want = host_ids(cfg, logits, images, lo, hi, scale, guided, host_rngs)
        got = sampler(logits, sampler_feeds(cfg, images, guided, scale, dev_rngs, hi - lo))
        assert got.dtype == np.int64 and got.shape == (images,)
        assert got.tolist() == want.tolist(), f"step {step}"
        agree += 1
    assert agree == steps


def test_unexpressed_settings_stay_on_the_host():
    assert device_supports(SamplingConfig(top_k=10, temperature=0.5)) is None
    assert device_supports(SamplingConfig(top_p=0.9)) == "top-p"
    assert device_supports(SamplingConfig(min_p=0.1)) == "min-p"
    assert device_supports(SamplingConfig(greedy=True, top_p=0.9)) is None     # greedy ignores the filters


@pytest.fixture(scope="module")
def llamagen_c2i(tmp_path_factory):
    """A tiny LlamaGen c2i bundle (4x4 codes) with room for 2 guided images, or 4 unguided."""
    torch = pytest.importorskip("torch")
    from llamagen_reference import RefLlamaGen

    from ardeploy.export.bundle import export_path
    folder = tmp_path_factory.mktemp("llamagen")
    torch.manual_seed(3)
    torch.save({"model": RefLlamaGen("c2i", grid=4).gpt_state_dict()}, folder / "gpt.pt")
    export_path(folder / "gpt.pt", folder / "b", family="llamagen-c2i", quiet=True, score_graph=False,
                max_batch=4, family_options={"image_size": 64, "n_head": 4})
    return folder / "b"


def test_generator_device_sampler_matches_host(llamagen_c2i):
    """A tiny LlamaGen c2i bundle: the codes drawn by the sampler graph equal the host sampler's."""
    from conftest import threads

    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageRequest, ImageSettings
    gen = ImageGenerator.load(llamagen_c2i, threads=threads())
    requests = [ImageRequest(class_id=c) for c in (1, 8, 4)]
    codes = {}
    for sampler in ("host", "device"):
        settings = ImageSettings(Guidance(4.0, interval=5), SamplingConfig(top_k=20, temperature=0.9), seed=4,
                                 sampler=sampler)
        codes[sampler] = np.stack([r.codes for r in gen.generate(requests, settings, decode=False)])
    assert np.array_equal(codes["host"], codes["device"])
    with pytest.raises(UserError, match="top-p"):
        gen.generate(requests[:1], ImageSettings(Guidance(4.0), SamplingConfig(top_p=0.5), sampler="device"),
                     decode=False)


def test_logits_left_on_the_device_are_read_there():
    """An OrtValue (what the CUDA-graph step leaves on the GPU) gives the ids a host array gives."""
    import onnxruntime as ort
    cfg = SamplingConfig(top_k=50)
    logits = np.random.default_rng(1).standard_normal((4, 1000)).astype(np.float32)
    ids = [DeviceSampler(0, 1000, 1000)(x, sampler_feeds(cfg, 2, True, 3.0, [np.random.default_rng(5),
                                                                           np.random.default_rng(6)], 1000))
           for x in (logits, ort.OrtValue.ortvalue_from_numpy(logits))]
    assert ids[0].tolist() == ids[1].tolist()


def test_fixed_buffers_path_matches_host():
    """The captured path's bindings (fixed buffers; staging for host logits, the given buffer for
    device ones), run on the CPU without a CUDA graph: the host sampler's ids at every step."""
    import onnxruntime as ort
    cfg = SamplingConfig(top_k=30, temperature=1.3)
    images, vocab = 2, 700
    host_rngs = [np.random.default_rng(20 + i) for i in range(images)]
    dev_rngs = [np.random.default_rng(20 + i) for i in range(images)]
    sampler = DeviceSampler(0, vocab, vocab, capture=True)
    device_logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((2 * images, vocab), np.float32))
    rng = np.random.default_rng(2)
    for step in range(12):
        logits = rng.standard_normal((2 * images, vocab)).astype(np.float32)
        scale = 1.0 if step % 4 == 3 else 4.0
        given = logits
        if step % 2:                                   # a device buffer at one address, updated in place
            device_logits.update_inplace(logits)
            given = device_logits
        got = sampler(given, sampler_feeds(cfg, images, True, scale, dev_rngs, vocab))
        assert got.tolist() == host_ids(cfg, logits, images, 0, vocab, scale, True, host_rngs).tolist()
    assert sampler.captured and len(sampler._graphs) == 2


def drawing_in_the_step(bundle_path):
    """An ImageGenerator whose step graph ends in the sampler and whose one-token steps take the GPU's
    captured-step path, on the CPU (the stand-in: the same bindings without a CUDA graph)."""
    from conftest import threads

    from ardeploy.runtime.backends.ort import OrtBackend
    from ardeploy.runtime.bundle import Bundle
    from ardeploy.runtime.image import ImageGenerator
    from ardeploy.runtime.image_layout import ImageLayout
    from ardeploy.runtime.run_options import RunOptions
    bundle, options = Bundle.load(bundle_path), RunOptions(threads=threads(), flavor="ort")
    layout = ImageLayout.from_manifest(bundle.manifest["image"])
    backend = OrtBackend(bundle, options, sampler_range=(layout.lo, layout.hi))
    backend.cuda_graph = True
    return ImageGenerator(bundle, backend, options)


@pytest.mark.parametrize("guidance,visual,count", [
    ((4.0, 5), SamplingConfig(top_k=20, temperature=0.9), 3),        # 2 images a batch, cfg_interval, then 1
    ((3.0, -1), SamplingConfig(greedy=True), 2),
    ((1.0, -1), SamplingConfig(top_k=7), 4),                          # no guidance: 4 images in one batch
    ((2.0, -1), SamplingConfig(), 2),                                 # no top-k: k is the whole range
])
def test_codes_drawn_inside_the_replayed_step_equal_the_host_sampler(llamagen_c2i, guidance, visual, count):
    """The captured step with the sampler appended draws every code after the first itself (one replay per
    code on a GPU), and they are the host sampler's codes for the seed."""
    from conftest import threads

    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageRequest, ImageSettings
    requests = [ImageRequest(class_id=c) for c in (1, 8, 4, 2)[:count]]
    settings = ImageSettings(Guidance(*guidance), visual, seed=11, sampler="host")
    host = ImageGenerator.load(llamagen_c2i, threads=threads()).generate(requests, settings, decode=False)
    fused = drawing_in_the_step(llamagen_c2i)
    got = fused.generate(requests, ImageSettings(Guidance(*guidance), visual, seed=11, sampler="device"),
                         decode=False)
    assert [r.codes.tolist() for r in got] == [r.codes.tolist() for r in host]
    assert all(r.timings["codes_drawn_in_step"] == 15 for r in got)       # 4x4 codes, the first from the prompt
    assert fused.backend._captured and fused.sampler_seconds() > 0        # the first codes: the sampler graph


def test_a_step_graph_that_cannot_take_the_sampler_draws_after_the_step(llamagen_c2i, monkeypatch):
    """Where ONNX Runtime refuses the step graph with the sampler appended, the backend opens the plain one
    (one note) and the codes, the same, are drawn after each step."""
    import onnx

    from ardeploy.runtime import device_sampler
    from ardeploy.runtime.backends.ort import OrtBackend
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageRequest, ImageSettings
    real = OrtBackend._append_sampler

    def unloadable(self, model):
        real(self, model)
        model.graph.node.append(onnx.helper.make_node("NoSuchOperator", [device_sampler.OUTPUT], ["x"],
                                                      domain="nowhere"))
    monkeypatch.setattr(OrtBackend, "_append_sampler", unloadable)
    gen = drawing_in_the_step(llamagen_c2i)
    assert not gen.backend.sampler_tail
    requests = [ImageRequest(class_id=c) for c in (3, 5)]
    got = {sampler: gen.generate(requests, ImageSettings(Guidance(4.0), SamplingConfig(top_k=9), seed=2,
                                                          sampler=sampler), decode=False)
           for sampler in ("host", "device")}
    assert [r.codes.tolist() for r in got["device"]] == [r.codes.tolist() for r in got["host"]]
    assert all(r.timings["codes_drawn_in_step"] == 0 for r in got["device"])


def test_a_captured_step_with_the_sampler_that_fails_to_replay_falls_back(llamagen_c2i, monkeypatch):
    """Where the first replay of the step with the sampler appended fails (a GPU that cannot capture those
    nodes), the backend reopens the plain step graph and the generation goes on, with the same codes."""
    from ardeploy.runtime.backends import cuda_graph
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageRequest, ImageSettings
    run = cuda_graph.CapturedStep.run

    def refuses_the_sampler(self, input_ids, seqlens_k, extra=None):
        if self.extra is not None:
            raise RuntimeError("CUDA graph capture failed\nmore lines")
        return run(self, input_ids, seqlens_k, extra)
    monkeypatch.setattr(cuda_graph.CapturedStep, "run", refuses_the_sampler)
    gen = drawing_in_the_step(llamagen_c2i)
    requests = [ImageRequest(class_id=c) for c in (3, 5)]
    settings = {sampler: ImageSettings(Guidance(4.0), SamplingConfig(top_k=9), seed=2, sampler=sampler)
                for sampler in ("host", "device")}
    got = gen.generate(requests, settings["device"], decode=False)
    assert not gen.backend.sampler_tail and gen.backend._captured
    want = gen.generate(requests, settings["host"], decode=False)
    assert [r.codes.tolist() for r in got] == [r.codes.tolist() for r in want]
    assert all(r.timings["codes_drawn_in_step"] == 0 for r in got)


def test_fixed_inputs_copy_what_changed_and_compare_an_array_once(monkeypatch):
    """A captured step's extra inputs: a changed value is copied into its buffer; an equal value in a new
    array is compared once, then that array is known (the sampler settings come as new arrays after the
    buffers were made from copies: comparing them again every step cost ~35 us a code)."""
    from ardeploy.runtime.backends import cuda_graph
    compared = []
    real = np.array_equal
    monkeypatch.setattr(cuda_graph.np, "array_equal", lambda a, b: compared.append(1) or real(a, b))
    fixed = cuda_graph.FixedInputs({"rows": np.arange(3), "u": np.zeros(2)}, "cpu")
    rows = np.arange(3)                                   # equal to what the buffer holds, a new array
    for step in range(5):
        u = np.full(2, step + 1.0)
        fixed.update({"rows": rows, "u": u})
        assert fixed.buffers["u"].numpy().tolist() == u.tolist()
    assert fixed.buffers["rows"].numpy().tolist() == [0, 1, 2]
    assert len(compared) == 1 + 5                         # rows once; each new uniform once
