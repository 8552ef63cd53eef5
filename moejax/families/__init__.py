"""One module per Hugging Face `model_type`.

A family module states only what differs between families: how its config.json maps onto
`MoEConfig`, and how its routed experts are named on disk (`EXPERTS`). Everything else
(attention, routing, key tables) is shared and driven by config flags.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from moejax.config import UnsupportedConfig

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@dataclasses.dataclass(frozen=True)
class ExpertNames:
    """On-disk names of a family's routed experts in the per-expert hub layout."""

    block: str  # the MoE block's attribute, e.g. "mlp" or "block_sparse_moe"
    gate: str
    up: str
    down: str


def get(model_type: Any):
    if model_type not in SUPPORTED:
        raise UnsupportedConfig(
            f"model_type={model_type!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    return importlib.import_module(f"moejax.families.{model_type}")


def _reject(hf: dict, field: str, ok) -> None:
    if field in hf and not ok(hf[field]):
        raise UnsupportedConfig(f"{field}={hf[field]!r} is not supported")


def common_fields(hf: dict) -> dict:
    """The fields every supported family shares, with the options we reject checked."""
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(field), int) or hf[field] <= 0:
            raise UnsupportedConfig(f"config.json field {field} is missing or not a positive integer")
    _reject(hf, "hidden_act", lambda v: v == "silu")
    _reject(hf, "rope_scaling", lambda v: v is None or v.get("rope_type", v.get("type")) == "default")
    _reject(hf, "use_sliding_window", lambda v: not v)
    if hf.get("model_type") == "mixtral":
        _reject(hf, "sliding_window", lambda v: v is None)
    _reject(hf, "partial_rotary_factor", lambda v: v == 1.0)

    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedConfig(f"rope_parameters.rope_type={rope['rope_type']!r} is not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))

    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
    return dict(
        model_type=hf["model_type"],
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
    )


def num_experts(hf: dict, default: int) -> int:
    """transformers 5 writes `num_local_experts` for some families that the hub calls
    `num_experts` (and the reverse); accept either."""
    return int(hf.get("num_experts") or hf.get("num_local_experts") or default)


def sparse_layers(hf: dict) -> tuple[bool, ...]:
    """Qwen-style layer selection: `mlp_only_layers`, else every `decoder_sparse_step`-th."""
    n = hf["num_hidden_layers"]
    only_mlp = set(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step") or 1
    return tuple(i not in only_mlp and (i + 1) % step == 0 for i in range(n))
