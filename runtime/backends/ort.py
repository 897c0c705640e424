"""ONNX Runtime backend: IOBinding with addresses into the KV arena, so the runtime copies no KV byte.

Two graph flavors (export --target): a bundle's ONNX Runtime graph (`decode_ort`: fused attention
that reads and writes a batch-major cache in place, see export/ort_graph.py) when it has one, else
the portable decode graph (time-major cache: past bound at [0, P), present at [P, P+S)).
`flavor="portable"` picks the portable graph even when the other is there.

Weights are held once: one session, on the decode graph, runs both phases. With an empty past
(P = 0) the decode graph computes exactly what the prefill graph computes (bit-identical, tested),
so the prompt goes through it too. That leaves ONNX Runtime free to pre-pack the MatMul weights
(its faster kernel layout: measured 3x faster at batch 2 and about 20 % faster at batch 1 on
SmolLM2) without a second packed copy for a second session.

`prepack=False` trades that speed for memory: the backend then maps weights.bin once and hands the
session read-only views of it (`add_initializer`), so no private copy exists at all.

The prefill graph gets a session of its own only where the prompt is not token ids: LlamaGen t2i's
caption features (`prefill_features`).

On an NVIDIA GPU (`device="cuda"`, onnxruntime-gpu) the cache is device memory, prompts go in one
piece, and the ONNX Runtime graph's one-token step is replayed as a captured CUDA graph with its
inputs and logits in device memory (cuda_graph.py); only the logits cross to the host.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..bundle import Bundle, BundleError
from ..errors import UserError
from ..device_sampler import OUTPUT as SAMPLED, add_sampler, default_feeds, fixed_feeds
from ..kv_arena import KVArena
from ..log import log
from ..run_options import RunOptions
from ..sessions import check_io, graph_run_options, open_session, providers, session_options, uses_shared_pool
from .base import Backend, check_step
from .cuda_graph import CapturedStep


class SharedWeights:
    """One read-only mapping of weights.bin, viewed as the OrtValues the graphs' initializers name."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.file = np.memmap(bundle.weights_path, dtype=np.uint8, mode="r")
        self.values: dict = {}

    def add_to(self, options, graph_path) -> None:
        import onnx
        import onnxruntime as ort
        from onnx.helper import tensor_dtype_to_np_dtype
        try:
            model = onnx.load(str(graph_path), load_external_data=False)
        except Exception as e:
            raise BundleError(f"{graph_path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            if tensor.name not in self.values:
                where = {entry.key: entry.value for entry in tensor.external_data}
                start, length = int(where.get("offset", 0)), int(where["length"])
                raw = self.file[start: start + length]
                array = raw.view(tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tuple(tensor.dims))
                self.values[tensor.name] = ort.OrtValue.ortvalue_from_numpy(array)
            options.add_initializer(tensor.name, self.values[tensor.name])


def gqa_inputs(input_ids: np.ndarray, attention_mask: np.ndarray, past: int,
               all_positions: bool = False) -> dict[str, np.ndarray]:
    """The ONNX Runtime graph's inputs for one step, from the runtime's contract (rows left-padded,
    attention_mask [B, past + S]). That graph keeps each row at its own length with no padding in the
    cache, so a padded row's real tokens move to the front of its S slots, and the graph is told each
    row's length and where its last token is (all_positions, batch 1: every token's index, so the graph
    gives every position's logits). Its attention takes a step's S tokens as the last S of every row
    once the cache holds tokens: after a first step (which may carry padding) a row takes all S tokens,
    or none (a row that waits, e.g. an image's unconditional row while the model writes text): that row
    runs its S padding tokens just past its length, where its next real tokens will overwrite them, and
    its logits are meaningless."""
    batch, n_new = input_ids.shape
    lengths = attention_mask.sum(axis=1)
    new = attention_mask[:, past:].sum(axis=1)
    if past and ((new != n_new) & (new != 0)).any():
        raise ValueError("with tokens in the cache every row must take all its new tokens in this step, or none "
                         "(feed padded prompts in one piece)")
    if not past and new.max() != n_new:
        raise ValueError("a first step needs at least one row without padding")
    ids = np.array(input_ids, dtype=np.int64)
    waiting = (new == 0) if past else np.zeros(batch, bool)
    for row in np.nonzero((new != n_new) & ~waiting)[0]:
        ids[row] = np.roll(ids[row], -(n_new - new[row]))       # real tokens first, padding after
    ends = np.where(waiting, lengths + n_new, lengths)           # where each row's written tokens end
    last = np.arange(n_new) if all_positions else np.arange(batch) * n_new + np.where(waiting, n_new, new) - 1
    return {"input_ids": ids, "seqlens_k": (ends - 1).astype(np.int32),
            "total_seq_len": np.array(ends.max(), dtype=np.int32), "last_token": last.astype(np.int64)}


def _sampler_io() -> dict:
    """What the sampler tail adds to a step graph's declared I/O (check_io's `extra`)."""
    return {"inputs": [{"name": name} for name in default_feeds()], "outputs": [{"name": SAMPLED}]}


def _decode_graph(bundle: Bundle, flavor: str, device: str = "cpu") -> str:
    """The graph that runs both phases for `flavor` (see the module docstring). On the GPU the ONNX
    Runtime graph runs for fp16/bf16 bundles only: GroupQueryAttention has no fp32 CUDA kernel, and ONNX
    Runtime would run it on the CPU on copies of the cache, so the device cache is never updated and the
    tokens go wrong from the second one. "auto" then takes the portable graph (and says so); "ort" is refused."""
    if flavor not in ("auto", "ort", "portable"):
        raise UserError(f"unknown graph flavor {flavor!r} (auto, ort or portable)")
    fp32_on_gpu = device == "cuda" and np.dtype(bundle.kv_dtype) == np.float32
    if flavor == "ort" and fp32_on_gpu and bundle.ort_graph is not None:
        raise UserError(f"{bundle.path}: an fp32 bundle's ONNX Runtime graph does not run on CUDA "
                        f"(GroupQueryAttention has no fp32 CUDA kernel): use --flavor portable, or export --dtype fp16")
    if flavor == "auto" and fp32_on_gpu and bundle.ort_graph is not None:
        log.info("note: fp32 bundle on CUDA: running the portable graph (GroupQueryAttention has no fp32 CUDA "
                 "kernel; export --dtype fp16 for the faster ONNX Runtime graph)")
    if flavor == "portable" or (flavor == "auto" and (bundle.ort_graph is None or fp32_on_gpu)):
        return "decode"
    if bundle.ort_graph is None:
        raise BundleError(f"{bundle.path}: the bundle has no ONNX Runtime graph (export with --target ort)")
    return bundle.ort_graph


# The check's regular run is given the replay's shapes (total_seq_len = max_seq), so both execute the same
# kernels on the same inputs: they agree to rounding, which in fp16 is not nothing (SmolLM2 fp16 on an
# H100: 0.039 at logits of magnitude 35, one check in ~800 replays; bit-equal otherwise). A wrong replay
# (stale inputs, a graph recorded on other buffers) is off by whole units, or NaN.
REPLAY_TOLERANCE = {4: (1e-3, 1e-3), 2: (0.05, 0.005)}        # cache itemsize -> (atol, rtol)
MAX_VERIFY_WIDTH = 32           # tokens of a speculative verify step (the last sampled one and up to 31 drafted)


class ReplayMismatch(RuntimeError):
    """A replayed CUDA graph step gave other logits than a regular run of the same step."""


@dataclass
class _Binding:
    """A batch-major cache's IOBinding for one graph and batch size, made once and reused every step
    (only the small inputs change): rebinding every layer's K and V each step costs runtime overhead."""
    arena: KVArena
    key: tuple
    io: object
    present: list


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, bundle: Bundle, options: RunOptions | None = None, sampler_range: tuple[int, int] | None = None,
                 **changes):
        """options (runtime/run_options.py; keywords override single fields): flavor picks the graph
        ("auto": the ONNX Runtime graph when the bundle has one and the device runs it); device "cpu" or
        "cuda" (see the module docstring); cuda_graph=False runs every GPU step plainly; audit counts K/V
        bytes written anywhere but their bound arena address; check_replay_every: a captured step's first
        replay and every Nth are run again as a regular step and compared (ReplayMismatch when they
        disagree; 0: never); prefill_chunk: prompts are fed in pieces of this many tokens on the CPU
        (bounds the activation memory ONNX Runtime keeps); prepack=False maps the weights instead of
        letting ONNX Runtime make packed copies. sampler_range (lo, hi): the ONNX Runtime graph's session
        runs it with the image sampler appended (device_sampler.add_sampler over the visual ids [lo, hi)),
        so that a replayed step also draws the codes (`step(..., sample=...)`)."""
        super().__init__()
        options = (options or RunOptions()).replace(**changes)
        self.options, self.bundle, self.device = options, bundle, options.where
        self.own_threads = self.device == "cpu" and not (options.shared_threads or uses_shared_pool())
        self.graph = _decode_graph(bundle, options.flavor, self.device)
        self.flavor = "portable" if self.graph == "decode" else "ort"
        # Pieces bound the host memory ONNX Runtime keeps on the CPU; on the GPU one piece is fastest.
        self.prefill_chunk = options.prefill_chunk if self.device == "cpu" else None
        self.pieces_may_pad = self.flavor == "portable"     # see gqa_inputs
        self.all_positions = self.flavor == "ort"           # the graph gathers any token positions' logits
        self.rows_own_lengths = self.flavor == "ort"        # its cache keeps each row at its own length
        self.features_prefill = bundle.has_graph("prefill") and "caption_features" in bundle.graph("prefill").inputs
        # The portable graph has shape nodes ONNX Runtime places on the CPU: it cannot be captured.
        # A session made for CUDA graphs must name a graph id in every run (None would record graph 0),
        # so this is fixed here, before the session exists.
        self.cuda_graph = (options.cuda_graph and self.device == "cuda" and self.flavor == "ort"
                           and np.dtype(bundle.kv_dtype) != np.float32)
        self._captured: dict = {}       # (arena, batch) -> CapturedStep (its graph reads that arena's buffers)
        self._c_device = None
        providers(self.device)               # fail now, not at the first session, without onnxruntime-gpu
        # Host weights are shared through one mapping; a CUDA session copies them to the device anyway.
        self.weights = SharedWeights(bundle) if self.device == "cpu" and not options.prepack else None
        self.sessions = {}
        self._reusable: _Binding | None = None
        self.sampler_range = sampler_range if self.flavor == "ort" else None
        self.sampler_tail = self.sampler_range is not None
        self.session(self.graph)
        rows_out = max(bundle.max_batch, MAX_VERIFY_WIDTH)   # logits of a batch's rows, or of a verify step's tokens
        self._logits = np.zeros((rows_out, bundle.vocab_size), np.float32)
        self.has_next_token = "next_token" in bundle.graph(self.graph).outputs   # its argmax (format version 2)
        self._next_token = np.zeros(rows_out, np.int64)

    def close(self) -> None:
        """Free what this backend holds: captured graphs, bindings and sessions (their device memory and
        the weights go with them). Arenas are their owners' to drop; the backend is unusable after."""
        self._captured.clear()
        self._reusable = None
        self.sessions.clear()
        self.weights = None

    def session(self, kind: str):
        """Sessions are created on first use (the score graph only when evaluating)."""
        if kind not in self.sessions:
            path = self.bundle.graph_path(kind)
            options = session_options(self.options.threads, self.options.prepack, shared=self.options.shared_threads)
            if self.weights is not None:
                self.weights.add_to(options, path)
            edit = self._append_sampler if self.sampler_tail and kind == self.graph else None
            try:
                self.sessions[kind] = open_session(path, options, self.device, edit=edit,
                                                   cuda_graph=self.cuda_graph and kind == self.graph)
            except BundleError as e:
                if self.device == "cpu" and self.bundle.manifest.get("dtype") == "bf16":
                    raise BundleError(f"{path}: a bf16 bundle; ONNX Runtime's CPU provider does not run bfloat16 "
                                      f"graphs: export fp32 or fp16, or run it with --backend trt") from e
                if edit is None:
                    raise
                self._drop_sampler(str(e))
                return self.session(kind)
            check_io(self.sessions[kind], self.bundle.graph(kind).raw, path, extra=_sampler_io() if edit else None)
        return self.sessions[kind]

    def _drop_sampler(self, why: str) -> None:
        """Run the plain step graph from now on (the image codes are then drawn after each step)."""
        log.info(f"note: the image sampler could not join the step graph ({why}); it runs after each step")
        self.sampler_range, self.sampler_tail = None, False
        self.sessions.pop(self.graph, None)
        self._captured.clear()
        self._reusable = None

    def _append_sampler(self, model) -> None:
        add_sampler(model.graph, *self.sampler_range, self.bundle.vocab_size)

    def new_arena(self, max_batch: int | None = None, max_seq: int | None = None) -> KVArena:
        bundle = self.bundle
        n_kv, head_dim = bundle.kv_shape
        allocate = None
        if self.device == "cuda":
            import onnxruntime as ort

            def allocate(count, dtype):
                # Zeroed, as host arenas are. ONNX Runtime's allocator hands back freed blocks as they
                # were, so a generator loaded after another one would start with that one's bytes;
                # GroupQueryAttention reads cache positions past each row's length (weighted 0, but
                # 0 x NaN is NaN), and stale bytes read as fp16 hold NaNs: every logit became NaN.
                value = ort.OrtValue.ortvalue_from_numpy(np.zeros(count, dtype), "cuda", 0)
                return value, value.data_ptr()
        return KVArena(bundle.n_layers, max_seq or bundle.max_seq, max_batch or bundle.max_batch, n_kv, head_dim,
                       bundle.kv_dtype, allocate, layout=bundle.kv_layout(self.graph))

    def _step(self, input_ids: np.ndarray, attention_mask: np.ndarray, arena: KVArena, all_positions: bool = False,
              sample: dict | None = None):
        batch, n_new = input_ids.shape
        if self.flavor == "ort":
            return self._step_in_place(np.asarray(input_ids), np.asarray(attention_mask), arena, all_positions,
                                       sample if self.sampler_tail else None)
        # The decode graph also runs the prompt: with an empty arena its past is 0 positions long.
        inputs = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                  "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        return self._run("decode", inputs, arena, batch, n_new, bind_past=True)

    def _step_in_place(self, input_ids: np.ndarray, attention_mask: np.ndarray, arena: KVArena,
                       all_positions: bool = False, sample: dict | None = None) -> np.ndarray:
        """The ONNX Runtime graph's step. GroupQueryAttention takes several new tokens after a past only
        for a batch of one, so a larger batch continuing with several tokens goes one position at a time
        (the last one draws the sample). On the GPU the one-token step, and a batch of one's verify step of
        each width, are replayed as captured CUDA graphs."""
        batch, n_new = input_ids.shape
        past = arena.length
        if batch > 1 and past and n_new > 1:
            for i in range(n_new):
                logits = self._step_in_place(input_ids[:, i:i + 1], attention_mask[:, :past + i + 1], arena,
                                             sample=sample if i == n_new - 1 else None)
            return logits
        inputs = gqa_inputs(input_ids, attention_mask, past, all_positions)
        if self.cuda_graph and past and (n_new == 1 or all_positions) and n_new <= MAX_VERIFY_WIDTH:
            logits = self._replay(inputs, arena, batch, n_new, sample)
            arena.advance(n_new)
            return logits
        return self._run(self.graph, inputs, arena, batch, n_new, bind_past=True, all_positions=all_positions)

    def _step_rows(self, ids: np.ndarray, lengths: np.ndarray, arena: KVArena, row: int | None):
        batch, n_new = ids.shape
        inputs = {"input_ids": ids, "seqlens_k": (lengths + n_new - 1).astype(np.int32),
                  "total_seq_len": np.array((lengths + n_new).max(), dtype=np.int32),
                  "last_token": (np.arange(batch) * n_new + n_new - 1).astype(np.int64)}
        if row is None and self.cuda_graph:
            return self._replay(inputs, arena, batch, 1)
        return self._execute(self.graph, inputs, arena, batch, n_new, bind_past=True, row=row)

    def _replay(self, inputs: dict, arena: KVArena, batch: int, width: int = 1, sample: dict | None = None):
        """A step of `width` tokens per row as this arena's captured CUDA graph for (batch, width),
        recorded on first use (width > 1: a batch of one's verify step, logits of every position).
        With the sampler tail, one graph per number of images and top-k (a step without a sample binds
        the tail's defaults). The arena is not advanced here."""
        feeds = tail_key = None
        if self.sampler_tail:
            feeds = sample or default_feeds()
            tail_key = (len(feeds["sample_cond_rows"]), int(feeds["sample_top_k"][0]))
        key = (arena, batch, width, tail_key)
        step = self._captured.get(key)
        if step is None:
            step = CapturedStep(self.session(self.graph), arena, batch, self.bundle.vocab_size,
                                graph_id=len(self._captured) + 1,       # entries are never replaced or removed
                                bind_cache=lambda io: self._bind_cache(io, arena, arena.length, width, True),
                                device=self.device, next_token=self.has_next_token, width=width,
                                extra=None if feeds is None else fixed_feeds(feeds, self.device))
            self._captured[key] = step
        started = time.perf_counter()
        try:
            logits = step.run(inputs["input_ids"], inputs["seqlens_k"], sample)
        except Exception as e:          # noqa: BLE001 - e.g. a provider that cannot capture the appended nodes
            if feeds is None or step.runs:
                raise
            self._drop_sampler(f"its first replay failed: {str(e).splitlines()[0]}")
            return self._replay(inputs, arena, batch, width)
        self._run_s += time.perf_counter() - started
        step.runs += 1
        if self.options.audit and step.runs % 64 == 1:
            # Reading back every output costs about a tenth of a small model's replayed step: check the
            # recorded run and every 64th (a replay cannot move them; a re-recording would show).
            self._count_copies(arena, step.io.get_outputs()[1:], step.present)
        every = self.options.check_replay_every
        if every and (step.runs == 1 or step.runs % every == 0):
            self._check_replay(logits, inputs, arena, batch, width, step.runs)
        return logits

    def _check_replay(self, replayed, inputs: dict, arena: KVArena, batch: int, width: int, runs: int) -> None:
        """Run the step just replayed again as a regular run (it writes the same K/V at the same cache
        positions) and compare the logits: a replay that went wrong stops here, never as wrong tokens."""
        same_shapes = {**inputs, "total_seq_len": np.array(arena.max_seq, np.int32)}
        regular = self._execute(self.graph, same_shapes, arena, batch, width, bind_past=True,
                                all_positions=width > 1)
        got = np.asarray(replayed, np.float32)[:len(regular)]
        worst = float(np.max(np.abs(got - regular))) if np.isfinite(got).all() else float("inf")
        atol, rtol = REPLAY_TOLERANCE[arena.dtype.itemsize]
        bound = atol + rtol * float(np.max(np.abs(regular)))
        if not worst <= bound:
            raise ReplayMismatch(f"the captured CUDA graph of the decode step (batch {batch}, width {width}, replay {runs}) "
                                 f"disagrees with a regular run of the same step (max |dlogits| {worst:.3g} > "
                                 f"{bound:.3g}); stopped rather than return wrong tokens. Load with "
                                 f"cuda_graph=False (--no-cuda-graph) and report this")

    def prefill_features(self, features: np.ndarray, attention_mask: np.ndarray, arena: KVArena) -> np.ndarray:
        """The prefill graph on input features instead of token ids (LlamaGen t2i: `caption_features`
        [B, S, dim]) into an empty arena; K/V and logits as from `step`."""
        if not self.features_prefill:
            return super().prefill_features(features, attention_mask, arena)
        batch, n_new = check_step(features, attention_mask, arena)
        if arena.length:
            raise ValueError(f"a features prefill needs an empty arena (it holds {arena.length} positions)")
        inputs = {"caption_features": np.ascontiguousarray(features, dtype=np.float32),
                  "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        return self._run("prefill", inputs, arena, batch, n_new, bind_past=False)

    def _run(self, kind: str, inputs: dict, arena: KVArena, batch: int, n_new: int, bind_past: bool,
             all_positions: bool = False) -> np.ndarray:
        """Run one graph (see _execute) and advance the arena by n_new."""
        logits = self._execute(kind, inputs, arena, batch, n_new, bind_past, all_positions)
        arena.advance(n_new)
        return logits

    def _execute(self, kind: str, inputs: dict, arena: KVArena, batch: int, n_new: int, bind_past: bool,
                 all_positions: bool = False, row: int | None = None) -> np.ndarray:
        """Run one graph: host inputs, logits into this backend's buffer (each row's last token's, or with
        all_positions every token's), the new positions' K/V bound into the arena after its `length`
        cached ones (and those bound as the past when the graph takes one), or the batch-major cache of
        one arena row alone (`row`). The arena's length is left as it was."""
        past = arena.length
        session = self.session(kind)
        n_out = n_new if all_positions else batch
        io, present = self._binding(session, kind, arena, batch, past, n_new, bind_past, n_out, row)
        if self.sampler_tail and kind == self.graph:      # its codes are not read: a step that draws nothing
            inputs = {**default_feeds(), **inputs}
        for name, value in inputs.items():
            io.bind_cpu_input(name, value)
        logits = self._logits[:n_out]
        started = time.perf_counter()
        # A session that may record CUDA graphs records none here (-1): this run's shapes change.
        session.run_with_iobinding(io, graph_run_options(-1) if self.cuda_graph and kind == self.graph else None)
        self._run_s += time.perf_counter() - started
        if self.options.audit:
            self._count_copies(arena, io.get_outputs()[1:], present)
        return logits

    def _count_copies(self, arena: KVArena, outputs, present: list[int]) -> None:
        """Outputs come back in binding order (logits first, left out here); any present.* output not
        at its bound arena address was copied: count its bytes."""
        for value, address in zip(outputs, present):
            if value.data_ptr() != address:
                self.kv_bytes_copied += int(np.prod(value.shape())) * arena.dtype.itemsize

    def _binding(self, session, kind: str, arena: KVArena, batch: int, past: int, n_new: int, bind_past: bool,
                 n_out: int, row: int | None = None):
        """An IOBinding with the logits buffer ([n_out, vocab]) and the cache bound, and the present
        addresses. A batch-major cache is bound whole, at the same addresses every step: its binding is
        made once per arena, batch and logits rows and reused (only the small inputs change), which
        saves rebinding every layer's K and V each step."""
        key = (kind, batch, n_out, row)
        reusable = self._reusable
        if arena.layout == "batch" and reusable is not None and reusable.arena is arena and reusable.key == key:
            return reusable.io, reusable.present
        io = session.io_binding()
        logits = self._logits[:n_out]
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        present = self._bind_cache(io, arena, past, n_new, bind_past, row)
        if self.has_next_token and kind == self.graph:    # bound last, after the present.* outputs
            next_token = self._next_token[:n_out]
            io.bind_output("next_token", "cpu", 0, np.int64, list(next_token.shape), next_token.ctypes.data)
        if arena.layout == "batch":           # holds the arena: its buffers stay alive while bound
            self._reusable = _Binding(arena, key, io, present)
        return io, present

    def _bind_cache(self, io, arena: KVArena, past: int, n_new: int, bind_past: bool,
                    row: int | None = None) -> list[int]:
        """past.* inputs at arena [0, past), present.* outputs at [past, past + n_new) (time-major), or
        both on the whole cache or one row of it (batch-major: the graph updates it in place); returns
        the present addresses in binding order."""
        bind_in, bind_out = self._binders(io)
        present = []
        for layer in range(self.bundle.n_layers):
            for kv, name in ((0, "key"), (1, "value")):
                if arena.layout == "batch":
                    address, shape = arena.cache(layer, kv, row)
                    bind_in(f"past.{layer}.{name}", arena.dtype, shape, address)
                    bind_out(f"present.{layer}.{name}", arena.dtype, shape, address)
                    present.append(address)
                    continue
                if bind_past:
                    address, shape = arena.region(layer, kv, 0, past)
                    bind_in(f"past.{layer}.{name}", arena.dtype, shape, address)
                address, shape = arena.region(layer, kv, past, past + n_new)
                bind_out(f"present.{layer}.{name}", arena.dtype, shape, address)
                present.append(address)
        return present

    def _binders(self, io):
        """bind(name, dtype, shape, address) for inputs and outputs on this backend's device.
        ONNX Runtime's Python wrapper builds a new device object on every call, which was half of
        the runtime's per-step overhead (2 binds per layer); where its binding object exposes the
        underlying calls, bind through them with one device object made once."""
        raw = getattr(io, "_iobinding", None)
        if self._c_device is None:
            import onnxruntime as ort
            try:
                self._c_device = ort.OrtDevice.make(self.device, 0)._get_c_device()
            except (AttributeError, TypeError):
                self._c_device = False
        if raw is not None and self._c_device is not False:
            device = self._c_device
            return (lambda name, dtype, shape, address: raw.bind_input(name, device, dtype, shape, address),
                    lambda name, dtype, shape, address: raw.bind_output(name, device, dtype, shape, address))
        return (lambda name, dtype, shape, address: io.bind_input(name, self.device, 0, dtype, shape, address),
                lambda name, dtype, shape, address: io.bind_output(name, self.device, 0, dtype, shape, address))
