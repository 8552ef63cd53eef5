"""The model configuration: one frozen dataclass, built from a Hugging Face `config.json`.

`MoEConfig.from_hf` is the one place that decides whether a checkpoint is supported. Each
HF `model_type` has a module in `moejax.families` that maps its fields onto this class's
keyword arguments (a dict: the families never import this module); anything we do not
implement (a rope scaling, a sliding window, an unknown family) raises `UnsupportedConfig`
naming the field, instead of silently computing something else.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from moejax import families
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
    # Shared expert (qwen2_moe, deepseek*): width 0 means none; its output is scaled by
    # sigmoid(x @ shared_gate) when shared_expert_gate is set.
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    # Router (moejax/model/moe.py): "softmax" over all routed experts, or per-expert
    # "sigmoid" (deepseek_v3); topk_method "greedy", "group_limited_greedy" (deepseek_v2:
    # best expert per group ranks the groups) or "noaux_tc" (deepseek_v3: a per-expert
    # correction bias, used only to select, and the top-2 sum ranks the groups); the top
    # `topk_group` of `n_group` groups are eligible. Weights are scaled by
    # routed_scaling_factor; router_fp32 computes the router matmul in float32.
    router: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_fp32: bool = False
    # Attention: "gqa" (q/k/v projections, K heads of head_dim) or "mla" (multi-head latent
    # attention, deepseek_v2/v3): queries directly (q_lora_rank 0) or through a rank
    # q_lora_rank bottleneck; keys and values from a kv_lora_rank latent that the KV cache
    # stores with one shared rope key of head_dim (= qk_rope_head_dim) per position.
    attention: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # RoPE: YaRN parameters (factor, original_max_position_embeddings, beta_fast, beta_slow,
    # truncate, attention_factor), empty for plain RoPE; softmax_mscale multiplies MLA's
    # softmax scale (YaRN's mscale_all_dim). rope_interleave: the checkpoint pairs rope dims
    # as (0, 1), (2, 3), ...; the converter permutes them to HF's half split, so the model
    # only ever sees the half split.
    rope_yarn: tuple[float, ...] = ()
    softmax_mscale: float = 1.0
    rope_interleave: bool = False
    # Attention quirks.
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (qwen3_moe, per head) | "proj" (olmoe, whole projection)
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # How the checkpoint stores routed experts (moejax/quant.py): "none" (the checkpoint's
    # dtype, [3, H, I]), or "int8" / "int4" (one packed byte row each); expert_group: int4's
    # group size along the contraction axis. Set by `moejax convert --experts`, never by HF.
    expert_quant: str = "none"
    expert_group: int = 0

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
        if self.router not in ("softmax", "sigmoid"):
            raise UnsupportedConfig(f"router scoring {self.router!r} is not supported (softmax, sigmoid)")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise UnsupportedConfig(f"topk_method={self.topk_method!r} is not supported "
                                    "(greedy, group_limited_greedy, noaux_tc)")
        if self.n_group < 1 or self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise UnsupportedConfig(f"n_group={self.n_group}, topk_group={self.topk_group} do not divide "
                                    f"{self.num_experts} experts into groups")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise UnsupportedConfig(f"num_experts_per_tok={self.top_k} exceeds the experts of "
                                    f"topk_group={self.topk_group} groups")
        if self.topk_method == "noaux_tc" and self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise UnsupportedConfig("topk_method noaux_tc ranks groups by their top-2 experts: "
                                    "groups need at least 2 experts")
        if self.attention not in ("gqa", "mla"):
            raise UnsupportedConfig(f"attention={self.attention!r}")
        if self.attention == "mla" and min(self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim) <= 0:
            raise UnsupportedConfig("multi-head latent attention needs positive kv_lora_rank, "
                                    "qk_nope_head_dim and v_head_dim")
        if self.head_dim % 2:
            raise UnsupportedConfig(f"rotary head dim {self.head_dim} must be even")
        if self.expert_quant != "none":
            from moejax.quant import check

            check(self.expert_quant, self.expert_group, self.hidden_size, self.moe_intermediate_size)

    # ---- derived sizes ------------------------------------------------------------------
    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.moe_layers) if m)

    @property
    def kv_cache_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Per-position (heads, dim) of the two arrays a layer's KV cache holds: keys and
        values, or for MLA the normalised latent and the shared rope key."""
        if self.attention == "mla":
            return (1, self.kv_lora_rank), (1, self.head_dim)
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)

    @property
    def softmax_scale(self) -> float:
        """MLA's attention scale: 1/sqrt(query-key dim), times YaRN's mscale correction."""
        return (self.qk_nope_head_dim + self.head_dim) ** -0.5 * self.softmax_mscale

    @property
    def quant(self):
        """The quantized expert layout (`moejax.quant.Quant`), or None for plain experts."""
        if self.expert_quant == "none":
            return None
        from moejax.quant import Quant

        return Quant(self.expert_quant, self.expert_group, self.hidden_size, self.moe_intermediate_size)

    @property
    def expert_shape(self) -> tuple[int, ...]:
        """One routed expert as stored: [3, H, I] = (gate, up, down transposed), or a
        quantized expert's packed row [B] (uint8)."""
        q = self.quant
        return (3, self.hidden_size, self.moe_intermediate_size) if q is None else (q.nbytes,)

    def expert_bytes(self, itemsize: int) -> int:
        """One routed expert's bytes: itemsize (the checkpoint dtype's) applies to plain experts."""
        q = self.quant
        return 3 * self.hidden_size * self.moe_intermediate_size * itemsize if q is None else q.nbytes

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | Path) -> "MoEConfig":
        """Build from an HF config dict, a config.json path, or a checkpoint directory."""
        if not isinstance(hf, dict):
            hf = read_hf_config(hf)
        return cls(**families.get(hf.get("model_type")).fields(hf))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "MoEConfig":
        d = json.loads(text)
        d["moe_layers"] = tuple(d["moe_layers"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        d["rope_yarn"] = tuple(d.get("rope_yarn", ()))
        return cls(**d)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """A config.json (or a directory's) as a dict; CheckpointError unless it is a JSON object."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {path.parent}")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} is not a JSON object (it holds a {type(hf).__name__})")
    return hf
