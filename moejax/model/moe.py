"""Routing and routed-expert compute.

Routing is split from expert compute so that the offloaded engine can run the router,
decide on the host which expert weights to use (and where they live), then call
`experts_indexed` on its device pool with slot ids. The resident model calls the same
function on its full expert stack with expert ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def router_scores(x, w_router, kind: str = "softmax", fp32: bool = False):
    """x [N, H], w_router [H, E] -> float32 scores [N, E]: softmax over ALL routed experts,
    or an independent sigmoid per expert (deepseek_v3). fp32: the matmul in float32 too
    (transformers keeps DeepSeek-V2/V3 routers in float32); else in the model dtype."""
    logits = x.astype(jnp.float32) @ w_router.astype(jnp.float32) if fp32 else x @ w_router
    logits = logits.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1) if kind == "softmax" else jax.nn.sigmoid(logits)


def importance(scores, kind: str = "softmax"):
    """Router scores [N, E] -> the importance PAPER.md's window compares: a probability
    distribution over all routed experts. Softmax scores are one already; sigmoid scores
    (one independent gate per expert) are normalised by their sum over all experts, which
    keeps their order and makes the alpha window relative as it is for softmax routers.
    Works on numpy and jax arrays alike."""
    return scores if kind == "softmax" else scores / scores.sum(axis=-1, keepdims=True)


def select(cfg, scores, bias=None):
    """Top-k selection as the family routes: scores [N, E] float32 (router_scores), bias [E]
    (noaux_tc's e_score_correction_bias, selection only) -> (weights [N, k] float32, expert
    ids [N, k] int32). Group-limited methods first keep the best `topk_group` of `n_group`
    expert groups: group_limited_greedy ranks groups by their best score, noaux_tc by the
    sum of their two best (bias-corrected) scores."""
    N, E = scores.shape
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    if cfg.n_group > 1:
        grouped = choice.reshape(N, cfg.n_group, E // cfg.n_group)
        if cfg.topk_method == "noaux_tc":
            group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [N, n_group]
        else:
            group_score = jnp.max(grouped, axis=-1)
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)  # [N, topk_group]
        allowed = jnp.any(keep[:, :, None] == jnp.arange(cfg.n_group), axis=1)  # [N, n_group]
        choice = jnp.where(jnp.repeat(allowed, E // cfg.n_group, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, cfg.top_k)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx.astype(jnp.int32)


def route(cfg, x, w_router, bias=None):
    """x [N, H] -> (scores [N, E], weights [N, k], ids [N, k]) for one MoE layer."""
    scores = router_scores(x, w_router, cfg.router, cfg.router_fp32)
    return (scores, *select(cfg, scores, bias))


def experts_indexed(x, stack, ids, weights):
    """Few tokens (decode): x [N, H]; stack [S, 3, H, I] (the expert stack, or the engine's
    device pool); ids [N, k] rows of stack; weights [N, k] -> [N, H].

    One dynamic slice per (token, expert), unrolled: XLA reads the k blocks in place, where
    a gather `stack[ids]` would first copy them (measured 2.7x slower on CPU)."""
    N, k = ids.shape
    rows = []
    for n in range(N):
        acc = jnp.zeros_like(x[n])  # [H]
        for j in range(k):
            blk = jax.lax.dynamic_index_in_dim(stack, ids[n, j], 0, keepdims=False)  # [3, H, I]
            h = jax.nn.silu(x[n] @ blk[0]) * (x[n] @ blk[1])  # [I]
            acc = acc + weights[n, j].astype(x.dtype) * (blk[2] @ h)
        rows.append(acc)
    return jnp.stack(rows)


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
    if N * k <= min(experts.shape[0], 64):
        return experts_indexed(x, experts, idx, weights)
    return experts_grouped(x, experts, idx, weights)
