"""Optimization profiles: the two shape ranges one engine, built from the decode graph, serves.

The decode graph takes `past` K/V of P positions and S new tokens; with P = 0 it computes exactly
what the prefill graph does (checked in tests), so one engine holds the weights once and covers
both phases through two profiles:

    prefill   P = 0,       S 1..max_seq (opt --opt-seq), total = S
    decode    P 1..max-1   (opt --opt-seq), S 1..2 (opt 1), total = P + S

Every profile is self-consistent at min, opt and max (total_seq = past_seq + seq), because
TensorRT evaluates the graph's shape arithmetic at those points and rejects or warns about
combinations that cannot occur. The decode profile allows S = 2 although the runtime decodes one
token at a time: with S fixed at exactly 1, TensorRT-RTX specialises every GEMM for one row and
stores a second, differently laid-out copy of each linear weight (SmolLM2 FP16: plan 1.77x the
weight bytes instead of 1.03x). Its total_seq therefore reaches max_seq + 1, a shape the runtime
never uses. A new chat turn (P > 0, S > 1) runs as S one-token decode steps.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..runtime.engine_record import DECODE, PREFILL
from ..runtime.errors import EngineError

Range = tuple[int, int, int]        # (min, opt, max)


@dataclass(frozen=True)
class Profile:
    name: str
    dims: dict[str, Range]          # symbolic dim of the graph I/O contract -> range

    def shapes(self, inputs: list[dict]) -> dict[str, tuple[tuple, tuple, tuple]]:
        """(min, opt, max) shape of each graph input (manifest `graphs.decode.inputs`)."""
        out = {}
        for x in inputs:
            dims = [self.dims[d] if isinstance(d, str) else (d, d, d) for d in x["shape"]]
            out[x["name"]] = tuple(tuple(r[k] for r in dims) for k in range(3))
        return out

    def to_json(self, inputs: list[dict]) -> dict:
        return {"name": self.name, "dims": {k: list(v) for k, v in self.dims.items()},
                "shapes": {n: [list(s) for s in v] for n, v in self.shapes(inputs).items()}}


def optimization_profiles(max_seq: int, max_batch: int, opt_seq: int) -> list[Profile]:
    """The prefill and decode profiles (in that order) of an engine for these limits."""
    if max_seq < 2:
        raise EngineError(f"max_seq must be at least 2 (got {max_seq})")
    if max_batch < 1:
        raise EngineError(f"max_batch must be at least 1 (got {max_batch})")
    if not 1 <= opt_seq <= max_seq:
        raise EngineError(f"--opt-seq must be between 1 and the engine's max_seq {max_seq} (got {opt_seq})")
    batch = (1, 1, max_batch)
    p_opt = min(opt_seq, max_seq - 1)
    return [Profile(PREFILL, {"batch": batch, "seq": (1, opt_seq, max_seq), "past_seq": (0, 0, 0),
                              "total_seq": (1, opt_seq, max_seq)}),
            Profile(DECODE, {"batch": batch, "seq": (1, 1, 2), "past_seq": (1, p_opt, max_seq - 1),
                             "total_seq": (2, p_opt + 1, max_seq + 1)})]


def inconsistencies(profile: Profile) -> list[str]:
    """Points (min/opt/max) where total_seq != past_seq + seq."""
    d = profile.dims
    return [f"{profile.name} {point}: total_seq {d['total_seq'][k]} != past_seq {d['past_seq'][k]} + seq {d['seq'][k]}"
            for k, point in enumerate(("min", "opt", "max"))
            if d["total_seq"][k] != d["past_seq"][k] + d["seq"][k]]

