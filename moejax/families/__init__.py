"""One module per Hugging Face `model_type`.

A family module states only what differs between families: how its config.json maps onto
`MoEConfig`'s keyword arguments (`fields(hf) -> dict`; `MoEConfig.from_hf` builds the
config, so no family imports moejax.config), how its routed experts are named on disk
(`EXPERTS`), and optionally which on-disk tensors it knows and does not use
(`ignored(key, cfg)`, e.g. deepseek_v3's multi-token-prediction layers). Everything else
(attention, routing, key tables) is shared and driven by config flags.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

from moejax.errors import UnsupportedConfig

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek", "deepseek_v2", "deepseek_v3")


@dataclasses.dataclass(frozen=True)
class ExpertNames:
    """On-disk names of a family's routed experts in the per-expert hub layout."""

    block: str  # the MoE block's attribute, e.g. "mlp" or "block_sparse_moe"
    gate: str
    up: str
    down: str
    shared: str = "shared_expert"  # the shared expert's attribute inside the block


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
    _reject(hf, "use_sliding_window", lambda v: not v)
    if hf.get("model_type") == "mixtral":
        _reject(hf, "sliding_window", lambda v: v is None)
    _reject(hf, "partial_rotary_factor", lambda v: v == 1.0)
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise UnsupportedConfig(f"quantization_config (quant_method={method!r}) is not supported: "
                                "convert a bfloat16 copy of the checkpoint")

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
        **rope_fields(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
    )


def rope_fields(hf: dict) -> dict:
    """rope_theta and, for YaRN, the parameters transformers' `_compute_yarn_parameters`
    reads (from transformers 5's `rope_parameters` or the hub's older `rope_scaling`)."""
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return dict(rope_theta=theta)
    if kind != "yarn":
        raise UnsupportedConfig(f"rope type {kind!r} is not supported (default, yarn)")
    original = rope.get("original_max_position_embeddings")
    if not original:
        raise UnsupportedConfig("yarn rope needs original_max_position_embeddings")
    factor = rope.get("factor") or hf.get("max_position_embeddings", 4096) / original

    def mscale(m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = mscale(m) / mscale(m_all) if m and m_all else mscale()
    yarn = (float(factor), float(original), float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1),
            float(bool(rope.get("truncate", True))), float(attention_factor))
    # DeepSeek's MLA also scales its softmax by mscale(mscale_all_dim)^2
    return dict(rope_theta=theta, rope_yarn=yarn, softmax_mscale=mscale(m_all) ** 2 if m_all else 1.0)


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
