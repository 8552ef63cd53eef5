"""The model configuration: one frozen dataclass, built from a Hugging Face `config.json`.

`MoEConfig.from_hf` is the one place that decides whether a checkpoint is supported. Each
HF `model_type` has a module in `moejax.families` that maps its fields; anything we do not
implement (a rope scaling, a sliding window, an unknown family) raises `UnsupportedConfig`
naming the field, instead of silently computing something else.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from moejax.errors import CheckpointError, UnsupportedConfig

__all__ = ["MoEConfig", "UnsupportedConfig", "read_hf_config"]


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    # Routed experts.
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    # Which layers have a routed MoE block; the others have a dense SwiGLU MLP.
    moe_layers: tuple[bool, ...]
    dense_intermediate_size: int = 0
    # Shared expert (qwen2_moe): width 0 means none; its output is scaled by
    # sigmoid(x @ shared_gate) when shared_expert_gate is set.
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    # Attention quirks.
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (qwen3_moe, per head) | "proj" (olmoe, whole projection)
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if len(self.moe_layers) != self.num_layers:
            raise UnsupportedConfig("moe_layers must have one entry per layer")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfig(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if not 0 < self.top_k <= self.num_experts:
            raise UnsupportedConfig(f"num_experts_per_tok={self.top_k} must be in [1, {self.num_experts}]")
        if self.qk_norm not in ("none", "head", "proj"):
            raise UnsupportedConfig(f"qk_norm={self.qk_norm!r}")

    # ---- derived sizes ------------------------------------------------------------------
    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.moe_layers) if m)

    @property
    def expert_shape(self) -> tuple[int, int, int]:
        """One routed expert as stored: [3, H, I] = (gate, up, down transposed)."""
        return (3, self.hidden_size, self.moe_intermediate_size)

    def expert_bytes(self, itemsize: int) -> int:
        s = self.expert_shape
        return s[0] * s[1] * s[2] * itemsize

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | Path) -> "MoEConfig":
        """Build from an HF config dict, a config.json path, or a checkpoint directory."""
        if not isinstance(hf, dict):
            hf = read_hf_config(hf)
        from moejax import families

        model_type = hf.get("model_type")
        family = families.get(model_type)
        return family.config_from_hf(hf)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "MoEConfig":
        d = json.loads(text)
        d["moe_layers"] = tuple(d["moe_layers"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedConfig(f"{path} is not valid JSON: {e}") from None
