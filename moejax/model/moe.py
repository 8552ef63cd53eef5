"""Routing and routed-expert compute.

Routing is split from expert compute so that the offloaded engine can run the router,
decide on the host which expert weights to use (and where they live), then call
`experts_gathered` with weights gathered from its device pool. The resident model calls
the same functions with weights gathered from its full expert stack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def router_probs(x, w_router):
    """x [N, H], w_router [H, E] -> softmax over ALL routed experts, float32 [N, E]."""
    return jax.nn.softmax((x @ w_router).astype(jnp.float32), axis=-1)


def top_k(probs, k: int, renormalise: bool):
    """probs [N, E] -> (weights [N, k] float32, expert ids [N, k] int32)."""
    weights, idx = jax.lax.top_k(probs, k)
    if renormalise:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, idx.astype(jnp.int32)


def experts_gathered(x, w, weights):
    """Few tokens (decode): x [N, H]; w [N, k, 3, H, I] already gathered per token; weights [N, k]."""
    g = jnp.einsum("nh,nkhi->nki", x, w[:, :, 0])
    u = jnp.einsum("nh,nkhi->nki", x, w[:, :, 1])
    h = jax.nn.silu(g) * u  # [N, k, I]
    y = jnp.einsum("nki,nkhi->nkh", h, w[:, :, 2])  # [N, k, H]
    return jnp.einsum("nkh,nk->nh", y, weights.astype(x.dtype))


def experts_grouped(x, experts, idx, weights):
    """Many tokens (prefill): sort (token, expert) pairs by expert, one ragged matmul per
    projection. x [N, H]; experts [E, 3, H, I]; idx, weights [N, k] -> [N, H]."""
    N, k = idx.shape
    E = experts.shape[0]
    flat = idx.reshape(-1)  # [N*k]
    order = jnp.argsort(flat)
    tokens = order // k
    xs = x[tokens]  # [N*k, H] sorted by expert
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # [E]
    g = jax.lax.ragged_dot(xs, experts[:, 0], sizes)  # [N*k, I]
    u = jax.lax.ragged_dot(xs, experts[:, 1], sizes)
    h = jax.nn.silu(g) * u
    y = jax.lax.ragged_dot(h, jnp.swapaxes(experts[:, 2], 1, 2), sizes)  # [N*k, H]
    y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
    return jnp.zeros_like(x).at[tokens].add(y)


def experts_resident(x, experts, idx, weights):
    """Computes only the selected experts, choosing the cheaper way for the token count."""
    N, k = idx.shape
    if N * k <= experts.shape[0]:
        return experts_gathered(x, experts[idx], weights)  # [N, k, 3, H, I]
    return experts_grouped(x, experts, idx, weights)
