"""Parameter shapes, declared once.

The converter checks every tensor against these shapes, the random initialiser builds
from them, and the offloading budget counts bytes from them. Naming convention: a linear
map is stored [in, out]; a SwiGLU block is stored as one [3, H, I] array (gate, up, down
transposed), so one routed expert is one contiguous block and a fetch is one copy.
"""

from __future__ import annotations

import math

import numpy as np

from moejax.config import MoEConfig

Shapes = dict[str, tuple[int, ...]]

# Parameters that only some configurations have (DecoderLayer sets the absent ones to None).
OPTIONAL = ("wk", "wv", "bq", "bk", "bv", "bo", "q_norm", "k_norm", "wq_a", "q_a_norm", "wkv_a", "kv_a_norm",
            "wkv_b", "router", "router_bias", "experts", "shared", "shared_gate", "mlp")


def global_shapes(cfg: MoEConfig) -> Shapes:
    s = {"embed": (cfg.vocab_size, cfg.hidden_size), "final_norm": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        s["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
    return s


def _mla_shapes(cfg: MoEConfig) -> Shapes:
    """Multi-head latent attention: q [H or q_lora_rank -> Q*(Dn+Dr)], kv_a [H -> R+Dr],
    kv_b [R -> Q*(Dn+Dv)], o [Q*Dv -> H]."""
    H, Q, R, Ql = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.q_lora_rank
    Dn, Dr, Dv = cfg.qk_nope_head_dim, cfg.head_dim, cfg.v_head_dim
    s: Shapes = {"wkv_a": (H, R + Dr), "kv_a_norm": (R,), "wkv_b": (R, Q * (Dn + Dv)), "wo": (Q * Dv, H)}
    if Ql:
        s.update(wq_a=(H, Ql), q_a_norm=(Ql,), wq=(Ql, Q * (Dn + Dr)))
    else:
        s["wq"] = (H, Q * (Dn + Dr))
    return s


def layer_shapes(cfg: MoEConfig, layer: int) -> Shapes:
    H, D = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * D, cfg.num_kv_heads * D
    s: Shapes = {"attn_norm": (H,), "mlp_norm": (H,)}
    if cfg.attention == "mla":
        s.update(_mla_shapes(cfg))
    else:
        s.update(wq=(H, q), wk=(H, kv), wv=(H, kv), wo=(q, H))
    if cfg.qkv_bias:
        s.update(bq=(q,), bk=(kv,), bv=(kv,))
    if cfg.o_bias:
        s["bo"] = (H,)
    if cfg.qk_norm == "head":
        s.update(q_norm=(D,), k_norm=(D,))
    elif cfg.qk_norm == "proj":
        s.update(q_norm=(q,), k_norm=(kv,))
    if cfg.moe_layers[layer]:
        s["router"] = (H, cfg.num_experts)
        if cfg.topk_method == "noaux_tc":
            s["router_bias"] = (cfg.num_experts,)
        s["experts"] = (cfg.num_experts, *cfg.expert_shape)  # [E, 3, H, I], or packed rows [E, B] uint8
        if cfg.shared_intermediate_size:
            s["shared"] = (3, H, cfg.shared_intermediate_size)
            if cfg.shared_expert_gate:
                s["shared_gate"] = (H, 1)
    else:
        s["mlp"] = (3, H, cfg.dense_intermediate_size)
    return s


def keeps_f32(cfg: MoEConfig, name: str) -> bool:
    """Parameters stored in float32 whatever the checkpoint dtype: the selection bias (added
    to float32 scores), and the router where the family routes in float32 (transformers keeps
    DeepSeek-V2/V3's `gate.weight` in float32: rounding it would move routing decisions)."""
    return name == "router_bias" or (name == "router" and cfg.router_fp32)


def dtype_of(cfg: MoEConfig, name: str, dtype) -> np.dtype:
    if name == "experts" and cfg.quant is not None:
        return np.dtype(np.uint8)  # packed rows (moejax/quant.py)
    return np.dtype(np.float32) if keeps_f32(cfg, name) else np.dtype(dtype)


def nbytes(cfg: MoEConfig, shapes: Shapes, itemsize: int) -> int:
    return sum(math.prod(v) * (4 if keeps_f32(cfg, k) else itemsize) for k, v in shapes.items())


def random_params(cfg: MoEConfig, seed: int = 0, dtype=np.float32) -> tuple[dict, list[dict]]:
    """Random weights of the right shapes (norm weights = 1), for tests and benchmarks."""
    rng = np.random.default_rng(seed)

    def make(name, shape):
        if name.endswith("norm"):
            return np.ones(shape, dtype)
        if name == "experts" and cfg.quant is not None:
            from moejax.quant import quantize

            q = cfg.quant
            return quantize(rng.standard_normal((shape[0], 3, q.hidden, q.inter), np.float32) * 0.02, q)
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype_of(cfg, name, dtype))

    glob = {k: make(k, v) for k, v in global_shapes(cfg).items()}
    layers = [{k: make(k, v) for k, v in layer_shapes(cfg, i).items()} for i in range(cfg.num_layers)]
    return glob, layers
