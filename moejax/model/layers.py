"""Functional building blocks shared by every family: RMSNorm, RoPE, attention, SwiGLU.

Shapes: B batch, T new tokens, S cache length, N tokens flattened (B*T), H hidden,
Q query heads, K kv heads, G = Q // K, D head dim, I intermediate width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, w, eps: float):
    """As transformers: normalise in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """positions [B, T] -> cos, sin [B, T, D] (the two halves repeated, as in HF)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [D/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, D]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, heads, D]; HF's rotate_half convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attend(q, k_cache, v_cache, q_pos):
    """Causal grouped-query attention over a static-size cache.

    q [B, T, Q, D]; k_cache, v_cache [B, S, K, D]; q_pos [T] absolute positions of the
    queries. A key at cache position s is visible to a query at position p iff s <= p, so
    cache slots past the current position (stale or padding) never contribute.
    """
    B, T, Q, D = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(B, T, K, Q // K, D)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache).astype(jnp.float32) * (D**-0.5)
    visible = jnp.arange(S)[None, :] <= q_pos[:, None]  # [T, S]
    scores = jnp.where(visible, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache)  # [B, T, K, G, D]
    return out.reshape(B, T, Q * D)


def swiglu(x, w):
    """x [N, H]; w [3, H, I] = (gate, up, down^T) -> [N, H]."""
    h = jax.nn.silu(x @ w[0]) * (x @ w[1])  # [N, I]
    return jnp.einsum("ni,hi->nh", h, w[2])
