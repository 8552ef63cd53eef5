"""Functional building blocks shared by every family: RMSNorm, RoPE, attention, SwiGLU.

Shapes: B batch, T new tokens, S cache length, N tokens flattened (B*T), H hidden,
Q query heads, K kv heads, G = Q // K, D head dim, I intermediate width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rms_norm(x, w, eps: float):
    """As transformers: normalise in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, yarn: tuple = ()) -> tuple[np.ndarray, float]:
    """-> (inverse frequencies [D/2] float32, scale of cos and sin), as transformers computes
    them: plain RoPE, or YaRN when yarn = (factor, original_max_positions, beta_fast,
    beta_slow, truncate, attention_factor) (see families.rope_fields)."""
    dims = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    pos_freqs = np.float32(theta) ** dims  # [D/2]
    if not yarn:
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    factor, original, beta_fast, beta_slow, truncate, attention_factor = yarn

    def dim_of(rotations):  # the dimension that turns `rotations` times over the original context
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by factor
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions, inv_freq, scale: float, dtype):
    """positions [B, T], inv_freq [D/2] -> cos, sin [B, T, D] (the two halves repeated, as in HF)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, D]
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, heads, D]; HF's rotate_half convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def kv_dtype(cache):
    """The compute dtype of a KV cache: bfloat16 caches are held as their uint16 bits."""
    return jnp.dtype(jnp.bfloat16) if cache.dtype == jnp.uint16 else cache.dtype


def kv_view(cache):
    """A cache [B, S, K, D] in its compute dtype (a bitcast, no arithmetic)."""
    return jax.lax.bitcast_convert_type(cache, jnp.bfloat16) if cache.dtype == jnp.uint16 else cache


def attend(q, k_cache, v_cache, q_pos):
    """Causal grouped-query attention over a static-size cache.

    q [B, T, Q, D]; k_cache, v_cache [B, S, K, D] (bfloat16 ones may be held as their uint16
    bits); q_pos [T] absolute positions of the queries. A key at cache position s is visible to
    a query at position p iff s <= p, so cache slots past the current position (stale or
    padding) never contribute.
    """
    from moejax import kernels

    B, T, Q, D = q.shape
    if T == 1 and D <= 512 and q.dtype == kv_dtype(k_cache) and v_cache.dtype == k_cache.dtype and \
            kernels.usable(q, k_cache):
        # Decode on the CPU: one kernel call (moejax.kernels) where XLA:CPU ran ~12 thunks per
        # layer, each with its fixed cost (266M model: 348 -> 252 thunks per step). Given the
        # cache's bits, not a bitcast of them: through the bitcast XLA copied every cache first.
        out = jax.ShapeDtypeStruct((B, Q * D), q.dtype)
        call = jax.ffi.ffi_call("moejax_attend_decode", out)
        y = jax.lax.platform_dependent(q.reshape(B, Q, D), k_cache, v_cache, q_pos,
                                       cpu=lambda a, k, v, p: call(a, k, v, p, scale=np.float32(D**-0.5)),
                                       default=lambda a, k, v, p: _attend(a[:, None], k, v, p).reshape(B, Q * D))
        return y.reshape(B, T, Q * D)
    return _attend(q, k_cache, v_cache, q_pos)


def _attend(q, k_cache, v_cache, q_pos):
    k_cache, v_cache = kv_view(k_cache), kv_view(v_cache)
    B, T, Q, D = q.shape
    K = k_cache.shape[2]
    qg = q.reshape(B, T, K, Q // K, D)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache).astype(jnp.float32) * (D**-0.5)
    probs = _causal_softmax(scores, q_pos, v_cache.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache)  # [B, T, K, G, D]
    return out.reshape(B, T, Q * D)


def _causal_softmax(scores, q_pos, dtype):
    """scores [..., T, S] float32; a key at cache position s is visible to a query at
    position p iff s <= p, so stale or padding cache slots never contribute."""
    visible = jnp.arange(scores.shape[-1])[None, :] <= q_pos[:, None]  # [T, S]
    return jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(dtype)


def attend_latent(q_nope, q_rope, latent, k_rope, w_kv, q_pos, scale: float):
    """Multi-head latent attention over a cache of latents, with the key and value
    up-projections absorbed into the query and the output (never expanding the cache).

    q_nope [B, T, Q, Dn], q_rope [B, T, Q, Dr]; latent [B, S, R] (normalised), k_rope [B, S, Dr]
    (rotated, shared by all heads); w_kv [R, Q, Dn + Dv] (kv_b_proj) -> [B, T, Q * Dv].
    Per head: key = latent @ w_k (+ k_rope), value = latent @ w_v, so
    q . key = (q_nope @ w_k^T) . latent + q_rope . k_rope and out = (probs @ latent) @ w_v."""
    B, T, Q, Dn = q_nope.shape
    q_lat = jnp.einsum("btqd,rqd->btqr", q_nope, w_kv[..., :Dn])  # [B, T, Q, R]
    scores = jnp.einsum("btqr,bsr->bqts", q_lat, latent) + jnp.einsum("btqd,bsd->bqts", q_rope, k_rope)
    probs = _causal_softmax(scores.astype(jnp.float32) * scale, q_pos, latent.dtype)  # [B, Q, T, S]
    out_lat = jnp.einsum("bqts,bsr->btqr", probs, latent)  # [B, T, Q, R]
    out = jnp.einsum("btqr,rqd->btqd", out_lat, w_kv[..., Dn:])  # [B, T, Q, Dv]
    return out.reshape(B, T, -1)


def linear(x, w, transposed: bool = False):
    """x [..., H] @ w [H, O] (transposed: w stored [O, H], as a tied embedding) -> [..., O] in
    x's dtype. On the CPU through moejax's kernel (moejax.kernels), which reads bfloat16
    weights in place where XLA:CPU first converts the whole matrix to float32 (a 768 x 768
    projection: 2.7 ms of conversion for a 0.1 ms product, docs/benchmarks.md)."""
    from moejax import kernels

    if not kernels.usable(x, w):
        return x @ (w.T if transposed else w)
    lead, H = x.shape[:-1], x.shape[-1]
    O = w.shape[0] if transposed else w.shape[1]
    flat = x.reshape(-1, H)
    out = jax.ShapeDtypeStruct((flat.shape[0], O), x.dtype)
    target = "moejax_linear_t" if transposed else "moejax_linear"
    y = jax.lax.platform_dependent(flat, w, cpu=lambda a, b: jax.ffi.ffi_call(target, out)(a, b),
                                   default=lambda a, b: a @ (b.T if transposed else b))
    return y.reshape(*lead, O)


def lm_head(h, embed, head):
    """Normalised hidden states [..., H] -> float32 logits [..., V] through the LM head [H, V],
    or (head None) the tied embedding [V, H]. The resident model and the stepwise engine share it."""
    y = linear(h, embed, transposed=True) if head is None else linear(h, head)
    return y.astype(jnp.float32)


def swiglu(x, w):
    """x [N, H]; w [3, H, I] = (gate, up, down^T) -> [N, H]."""
    h = jax.nn.silu(x @ w[0]) * (x @ w[1])  # [N, I]
    return jnp.einsum("ni,hi->nh", h, w[2])
