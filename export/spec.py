"""ModelSpec: every dimension of a LLaMA-family decoder in one dataclass.

Loaders fill it from a checkpoint; the PyTorch modules are built from it; manifest.json records it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import CheckpointError

# Far beyond any released model: a config past them is damaged, and would otherwise have the exporter
# allocate for it (a table of 10**9 layers' tensor names) before any tensor could disagree.
LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "n_layers": 1024,
          "n_heads": 1024, "n_kv_heads": 1024, "head_dim": 4096}


@dataclass
class ModelSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"type": "linear", "factor": f} or {"type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False   # bias on q/k/v projections
    attention_out_bias: bool = False   # bias on o_proj (Llama's attention_bias sets both; Qwen has q/k/v only)
    qk_norm: bool = False          # per-head RMSNorm on q and k before RoPE (Qwen3, Emu3.5)
    architecture: str = "LlamaForCausalLM"
    extra: dict = field(default_factory=dict)  # family-specific facts (image layout, ...)

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
            elif int(getattr(self, name)) > LIMITS[name]:
                problems.append(f"{name}={getattr(self, name)} is beyond any model's (at most {LIMITS[name]})")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None and self.rope_scaling.get("type") not in ("linear", "llama3"):
            problems.append(f"unsupported rope_scaling type {self.rope_scaling.get('type')!r} (supported: linear, llama3)")
        if problems:
            raise CheckpointError("invalid model spec: " + "; ".join(problems))

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def n_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
        if self.attention_bias:
            per_layer += q + 2 * kv
        if self.attention_out_bias:
            per_layer += d
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        return v * d * (1 if self.tie_word_embeddings else 2) + self.n_layers * per_layer + d
