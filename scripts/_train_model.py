"""A qwen2_moe decoder in plain JAX, for training the bundled model.

Computes the same function as `transformers.Qwen2MoeForCausalLM` (checked on every
export by `_train_export.py`):

* RMSNorm in float32, `weight * x * rsqrt(mean(x^2) + eps)`;
* RoPE with the HF `rotate_half` layout (cos/sin of `concat(freqs, freqs)`);
* GQA attention, q/k/v with bias, o_proj without bias, scale `head_dim ** -0.5`;
* MoE block: router logits `x @ gate.T`, float32 softmax over all experts, top-k of
  the probabilities (renormalised only if `norm_topk_prob`), SwiGLU experts
  `down(silu(gate(x)) * up(x))`, plus a shared SwiGLU expert scaled by
  `sigmoid(x @ shared_expert_gate.T)`;
* untied lm_head.

Parameters use HF orientation (`[out, in]`, `y = x @ W.T`); experts are stacked:
gate/up `[E, I, D]`, down `[E, D, I]`.

Two routed-expert paths share the parameters:
* `moe="capacity"` (training): scatter the token copies into `[E, C, D]` (C = capacity
  factor * N * k / E, first choices first), batched einsum, gather back; copies over
  capacity are dropped.
* `moe="dense"` (evaluation / reference): every expert on every token, weighted by the
  top-k gate scattered to `[N, E]`; exact, nothing dropped.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    vocab_size: int = 4096
    hidden_size: int = 192
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    num_experts: int = 32
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 256
    norm_topk_prob: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        assert self.hidden_size % self.num_attention_heads == 0
        assert self.num_attention_heads % self.num_key_value_heads == 0
        assert self.head_dim % 2 == 0
        # Issue 5 constraints on the bundled model.
        assert self.num_experts >= 16 and self.num_experts_per_tok >= 4
        assert self.num_hidden_layers >= 4 and self.shared_expert_intermediate_size > 0


def param_shapes(cfg: MoeConfig) -> dict:
    """The parameter tree's shapes, declared once (init and export derive from it)."""
    D, V, I, S, E = (cfg.hidden_size, cfg.vocab_size, cfg.moe_intermediate_size,
                     cfg.shared_expert_intermediate_size, cfg.num_experts)
    Hq = cfg.num_attention_heads * cfg.head_dim
    Hkv = cfg.num_key_value_heads * cfg.head_dim
    layer = {
        "input_layernorm": (D,), "post_attention_layernorm": (D,),
        "q_proj.weight": (Hq, D), "q_proj.bias": (Hq,),
        "k_proj.weight": (Hkv, D), "k_proj.bias": (Hkv,),
        "v_proj.weight": (Hkv, D), "v_proj.bias": (Hkv,),
        "o_proj.weight": (D, Hq),
        "gate.weight": (E, D),
        "experts.gate": (E, I, D), "experts.up": (E, I, D), "experts.down": (E, D, I),
        "shared_expert.gate_proj": (S, D), "shared_expert.up_proj": (S, D),
        "shared_expert.down_proj": (D, S),
        "shared_expert_gate.weight": (1, D),
    }
    return {"embed_tokens": (V, D), "norm": (D,), "lm_head": (V, D),
            "layers": [dict(layer) for _ in range(cfg.num_hidden_layers)]}


def init_params(cfg: MoeConfig, key: jax.Array) -> dict:
    """Normal(0, 0.02) weights (residual outputs scaled by 1/sqrt(2L)), zero biases,
    unit norms."""
    shapes = param_shapes(cfg)
    std = cfg.initializer_range
    out_std = std / math.sqrt(2 * cfg.num_hidden_layers)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    vals = []
    for (path, shape), k in zip(leaves, keys):
        name = str(path[-1].key)
        if name.endswith("layernorm") or name == "norm":
            vals.append(jnp.ones(shape, jnp.float32))
        elif name.endswith("bias"):
            vals.append(jnp.zeros(shape, jnp.float32))
        else:
            s = out_std if name in ("o_proj.weight", "experts.down",
                                    "shared_expert.down_proj") else std
            vals.append(s * jax.random.normal(k, shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, vals)


def rms_norm(x, w, eps):
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return w * (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rope_cos_sin(cfg: MoeConfig, positions):
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32)
                                          / cfg.head_dim))
    freqs = positions[:, None].astype(jnp.float32) * inv_freq[None, :]  # [T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, hd]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    # x: [B, T, H, hd]; HF rotate_half: (-x2, x1)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


def attention(p, x, cfg: MoeConfig, cos, sin):
    B, T, D = x.shape
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = (x @ p["q_proj.weight"].T + p["q_proj.bias"]).reshape(B, T, H, hd)
    k = (x @ p["k_proj.weight"].T + p["k_proj.bias"]).reshape(B, T, KV, hd)
    v = (x @ p["v_proj.weight"].T + p["v_proj.bias"]).reshape(B, T, KV, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # HF repeat_kv: query head h reads kv head h // (H // KV).
    q = q.reshape(B, T, KV, H // KV, hd)  # [B, T, KV, R, hd]
    scores = jnp.einsum("btgrd,bsgd->bgrts", q, k) * hd ** -0.5  # [B, KV, R, T, T]
    causal = jnp.tril(jnp.ones((T, T), bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v).reshape(B, T, H * hd)  # [B, T, H*hd]
    return out @ p["o_proj.weight"].T


def route(p, x, cfg: MoeConfig):
    """x: [N, D] -> (router logits [N, E], top-k weights [N, k], top-k ids [N, k])."""
    logits = x @ p["gate.weight"].T  # [N, E]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_p, top_i = jax.lax.top_k(probs, cfg.num_experts_per_tok)  # [N, k]
    if cfg.norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return logits, top_p.astype(x.dtype), top_i


def routed_dense(p, x, top_p, top_i, cfg: MoeConfig):
    E = cfg.num_experts
    w = jnp.sum(jax.nn.one_hot(top_i, E, dtype=x.dtype) * top_p[..., None], axis=1)  # [N, E]
    g = jnp.einsum("nd,eid->nei", x, p["experts.gate"])  # [N, E, I]
    u = jnp.einsum("nd,eid->nei", x, p["experts.up"])
    y = jnp.einsum("nei,edi->ned", jax.nn.silu(g) * u, p["experts.down"])  # [N, E, D]
    return jnp.einsum("ned,ne->nd", y, w)


def routed_capacity(p, x, top_p, top_i, cfg: MoeConfig, capacity_factor: float):
    N, D = x.shape
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    C = max(1, int(math.ceil(capacity_factor * N * k / E)))
    # Flatten the token copies choice-major so that first choices claim slots first.
    e_flat = top_i.T.reshape(-1)  # [k*N]
    onehot = jax.nn.one_hot(e_flat, E, dtype=jnp.int32)  # [k*N, E]
    slot = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # [k*N]
    keep = slot < C
    slot = jnp.where(keep, slot, C)  # out of bounds -> dropped by mode="drop"
    x_rep = jnp.tile(x, (k, 1))  # [k*N, D]
    buf = jnp.zeros((E, C, D), x.dtype).at[e_flat, slot].set(x_rep, mode="drop")  # [E, C, D]
    g = jnp.einsum("ecd,eid->eci", buf, p["experts.gate"])  # [E, C, I]
    u = jnp.einsum("ecd,eid->eci", buf, p["experts.up"])
    y = jnp.einsum("eci,edi->ecd", jax.nn.silu(g) * u, p["experts.down"])  # [E, C, D]
    out = y.at[e_flat, slot].get(mode="fill", fill_value=0)  # [k*N, D]
    out = out * top_p.T.reshape(-1)[:, None]
    return jnp.sum(out.reshape(k, N, D), axis=0), jnp.mean(keep.astype(jnp.float32))


def moe_block(p, x, cfg: MoeConfig, moe: str, capacity_factor: float):
    B, T, D = x.shape
    xf = x.reshape(B * T, D)  # [N, D]
    logits, top_p, top_i = route(p, xf, cfg)
    if moe == "dense":
        routed, kept = routed_dense(p, xf, top_p, top_i, cfg), jnp.float32(1.0)
    elif moe == "capacity":
        routed, kept = routed_capacity(p, xf, top_p, top_i, cfg, capacity_factor)
    else:
        raise ValueError(f"unknown moe path {moe!r}")
    sh = (jax.nn.silu(xf @ p["shared_expert.gate_proj"].T) * (xf @ p["shared_expert.up_proj"].T)
          ) @ p["shared_expert.down_proj"].T
    sh = jax.nn.sigmoid(xf @ p["shared_expert_gate.weight"].T) * sh
    return (routed + sh).reshape(B, T, D), (logits, top_i, kept)


def forward(params, ids, cfg: MoeConfig, moe: str = "dense", capacity_factor: float = 1.5):
    """ids [B, T] -> (logits [B, T, V] float32, per-layer (router logits, top-k ids, kept))."""
    x = params["embed_tokens"][ids]  # [B, T, D]
    cos, sin = rope_cos_sin(cfg, jnp.arange(ids.shape[1]))
    router = []
    for p in params["layers"]:
        x = x + attention(p, rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps), cfg, cos, sin)
        h, r = moe_block(p, rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps), cfg,
                         moe, capacity_factor)
        x = x + h
        router.append(r)
    x = rms_norm(x, params["norm"], cfg.rms_norm_eps)
    return (x @ params["lm_head"].T).astype(jnp.float32), router


def load_balance_loss(logits, top_i, num_experts: int):
    """Switch-style E * sum_e f_e * P_e (1.0 when uniform); f over all k assignments."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [N, E]
    f = jnp.mean(jax.nn.one_hot(top_i, num_experts, dtype=jnp.float32), axis=(0, 1))  # [E]
    return num_experts * jnp.sum(f * jnp.mean(probs, axis=0))


def z_loss(logits):
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


def token_nll(logits, targets):
    """Per-token negative log-likelihood, [B, T]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
