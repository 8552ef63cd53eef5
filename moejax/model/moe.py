"""Routing and routed-expert compute.

Routing is split from expert compute so that the offloaded engine can run the router,
decide which expert weights to use (and where they live), then call `experts_indexed`
(decode) or `experts_ordered` (prefill) on its device pool with slot ids. The resident model
calls the same functions on its full expert stack with expert ids, so offloading changes no
arithmetic. Quantized experts (`moejax.quant`) are dequantized in `block`, the one place every
path reads an expert, so all of them compute with the same dequantized weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.model.layers import linear, swiglu


def router_scores(x, w_router, kind: str = "softmax", fp32: bool = False):
    """x [N, H], w_router [H, E] -> float32 scores [N, E]: softmax over ALL routed experts,
    or an independent sigmoid per expert (deepseek_v3). fp32: the matmul in float32 too
    (transformers keeps DeepSeek-V2/V3 routers in float32); else in the model dtype."""
    logits = linear(x.astype(jnp.float32), w_router) if fp32 else linear(x, w_router)
    logits = logits.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1) if kind == "softmax" else jax.nn.sigmoid(logits)


def importance(scores, kind: str = "softmax"):
    """Router scores [N, E] -> the importance window of docs/method.md (1-2) compares: a probability
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


def block(stack, row, dtype, quant=None):
    """One expert [3, H, I] of a stack [S, 3, H, I] in the compute dtype (an offloaded pool
    may hold bfloat16 experts as their uint16 bits, see `offload.cache.storage_dtype`), or
    (quant: a `moejax.quant.Quant`) of packed rows [S, B] uint8, dequantized here."""
    b = jax.lax.dynamic_index_in_dim(stack, row, 0, keepdims=False)
    if quant is not None:
        from moejax.quant import dequantize

        return dequantize(b, quant, dtype)
    return b if b.dtype == dtype else jax.lax.bitcast_convert_type(b, dtype)


def _kernel(x, stack, quant) -> bool:
    """Whether the CPU expert kernel (moejax.kernels) computes these experts: float32 or
    bfloat16 experts, or int8/int4 packed rows, where it could be built."""
    from moejax import kernels

    return kernels.usable(x, stack, quant is not None)


def _layout(quant) -> dict:
    """The kernel's attributes for an expert layout (moejax.kernels, cpu_experts.cc)."""
    import numpy as np

    if quant is None:
        return dict(bits=np.int64(0), group_h=np.int64(0), group_i=np.int64(0), inter=np.int64(0))
    gH, gI = quant.groups
    return dict(bits=np.int64(8 if quant.scheme == "int8" else 4), group_h=np.int64(gH), group_i=np.int64(gI),
                inter=np.int64(quant.inter))


def experts_indexed(x, stack, ids, weights, quant=None):
    """Few tokens (decode): x [N, H]; stack [S, 3, H, I] (the expert stack, or the engine's
    device pool; [S, B] packed rows with quant); ids [N, k] rows of stack; weights [N, k] -> [N, H].
    Token n's experts are summed in the order of ids[n], from zero.

    On the CPU, the expert kernel reads the k blocks in place (XLA:CPU would copy each dynamic
    slice first); elsewhere one dynamic slice per (token, expert), unrolled, which XLA:GPU
    reads in place (a gather `stack[ids]` would copy them)."""
    if _kernel(x, stack, quant):
        out = jax.ShapeDtypeStruct(x.shape, x.dtype)
        call = lambda: jax.ffi.ffi_call("moejax_experts_decode", out)(  # noqa: E731
            x, stack, ids.astype(jnp.int32), weights.astype(jnp.float32), **_layout(quant))
        return jax.lax.platform_dependent(cpu=call, default=lambda: _indexed_jnp(x, stack, ids, weights, quant))
    return _indexed_jnp(x, stack, ids, weights, quant)


def _indexed_jnp(x, stack, ids, weights, quant):
    N, k = ids.shape
    rows = []
    for n in range(N):
        acc = jnp.zeros_like(x[n])  # [H]
        for j in range(k):
            blk = block(stack, ids[n, j], x.dtype, quant)  # [3, H, I]
            h = jax.nn.silu(x[n] @ blk[0]) * (x[n] @ blk[1])  # [I]
            acc = acc + weights[n, j].astype(x.dtype) * (blk[2] @ h)
        rows.append(acc)
    return jnp.stack(rows)


def experts_ordered(x, stack, rows, ids, ok, idx, weights, acc, quant=None):
    """Many tokens (prefill), one expert at a time in ascending id order: for each position p
    with ok[p], acc += weight of expert ids[p] per token * FFN(x) with the block stack[rows[p]].
    x, acc [N, H]; stack [S, 3, H, I] (or [S, B], quant); rows, ids, ok [G]; idx, weights [N, k]
    -> acc [N, H].

    The resident model calls it once with every expert (rows = ids = 0..E-1); the offloaded
    engines call it group by group with the experts they hold in their pool (a write into the
    pool after it is ordered after its reads with `cache.ordered_after` on the returned acc).
    Experts no token routes to add exactly zero, so both sum every token's experts in the same
    order with the same arithmetic: offloaded prefill is bit for bit the resident one. On the
    CPU the expert kernel computes the same sums in the same order, each expert only for its
    routed tokens."""
    if not _kernel(x, stack, quant):
        return _ordered_jnp(x, stack, rows, ids, ok, idx, weights, acc, quant)
    out = jax.ShapeDtypeStruct(acc.shape, acc.dtype)
    kernel = lambda: jax.ffi.ffi_call("moejax_experts_ordered", out, input_output_aliases={7: 0})(  # noqa: E731
        x, stack, rows.astype(jnp.int32), ids.astype(jnp.int32), ok.astype(bool), idx.astype(jnp.int32),
        weights.astype(jnp.float32), acc, **_layout(quant))
    return jax.lax.platform_dependent(
        cpu=kernel, default=lambda: _ordered_jnp(x, stack, rows, ids, ok, idx, weights, acc, quant))


def _ordered_jnp(x, stack, rows, ids, ok, idx, weights, acc, quant):
    def body(p, acc):
        e = ids[p]
        w = jnp.sum(jnp.where(idx == e, weights, 0.0), axis=-1)  # [N] float32: one term at most
        blk = block(stack, rows[p], x.dtype, quant)  # [3, H, I]
        y = jax.nn.silu(x @ blk[0]) * (x @ blk[1])  # [N, I]
        y = jnp.einsum("ni,hi->nh", y, blk[2])  # [N, H]
        return jnp.where(ok[p], acc + y * w[:, None].astype(y.dtype), acc)

    return jax.lax.fori_loop(0, ids.shape[0], body, acc)


def ffn(x, w):
    """An always-on SwiGLU FFN (a dense layer's MLP, a shared expert): x [N, H], w [3, H, I]
    -> [N, H]. On the CPU the expert kernel computes it as a one-expert stack, because
    XLA:CPU copies each of the static slices w[0], w[1], w[2] before its dot."""
    if _kernel(x, w, None):
        N = x.shape[0]
        return experts_indexed(x, w[None], jnp.zeros((N, 1), jnp.int32), jnp.ones((N, 1), jnp.float32))
    return swiglu(x, w)


def experts_resident(x, experts, idx, weights, decode: bool, quant=None):
    """All experts on the device: decode steps (one token per row) gather their k experts,
    prefill runs expert by expert; the offloaded engine uses the same two functions."""
    if decode:
        return experts_indexed(x, experts, idx, weights, quant)
    E = experts.shape[0]
    ids = jnp.arange(E, dtype=jnp.int32)
    return experts_ordered(x, experts, ids, ids, jnp.ones(E, bool), idx, weights, jnp.zeros_like(x), quant)
