"""Importance-driven substitution (docs/method.md sections 1-2), as pure jnp functions: the one
definition that the fused program runs on the device and the stepwise engine and trace
replay run through jit on their inputs (numpy arrays are accepted too).

Per token and MoE layer, with p = router probabilities over ALL routed experts
(`moe.importance`: the softmax, or sigmoid scores normalised by their sum) and S the
probability of the best expert that was not selected (the (k+1)-th highest for a plain
top-k router; group-limited routers may leave a better one out):
  * a selected expert is top-score if p >= (1 + alpha) * S, else low-score;
  * top-score experts are always computed as routed;
  * a low-score expert that is on the device, or is some batch token's top-score expert
    (computed anyway), is kept;
  * any other low-score expert is replaced by an unselected expert that is on the device
    (or batch top-score), chosen by `mode`, each substitute used once per token; if none
    is left, the expert is kept and fetched.
Modes: "window" (the paper): candidates with p in ((1 - alpha) S, S], best p first;
"hybrid": the same window, ranked by the precomputed similarity to the replaced expert;
"similarity": any unselected candidate on the device, ranked by similarity (no window).
Every token still computes exactly k experts. Low-score experts are handled in order of
decreasing probability, so the more important one gets the better substitute.

"skip" (the paper's comparison, no substitute): a low-score expert that is neither on the
device nor batch top-score is dropped, and the token's kept experts are reweighed to carry
the selected experts' total weight (`skip_weights`). A token keeps at least its most probable
expert. The dropped entry names the token's most probable kept expert with weight 0, so the
id lists keep their shape and nothing is fetched for it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from moejax.offload.decisions import member

MODES = ("window", "similarity", "hybrid", "skip")
SIMILARITY_MODES = ("similarity", "hybrid")  # the modes that read a similarity table


def selected_mask(idx, E: int):
    """idx [N, k] -> bool [N, E]: the experts each token selected."""
    return (jnp.asarray(idx)[:, :, None] == jnp.arange(E)).any(axis=1)


def threshold_s(probs, idx):
    """probs [N, E], selected idx [N, k] -> S [N], the highest probability of an expert
    each token did not select."""
    probs = jnp.asarray(probs)
    return jnp.where(selected_mask(idx, probs.shape[-1]), -jnp.inf, probs).max(axis=-1)


def classify(probs, idx, alpha: float):
    """-> (S [N], top-score mask [N, k]) for the selected experts idx [N, k]."""
    S = threshold_s(probs, idx)
    p_sel = jnp.take_along_axis(jnp.asarray(probs), jnp.asarray(idx), axis=-1)
    return S, p_sel >= (1.0 + alpha) * S[:, None]


def _mask(available, E: int):
    """A set of expert ids, or a bool mask [E] -> bool mask [E]."""
    if isinstance(available, (set, frozenset, list, tuple)):
        m = np.zeros(E, bool)
        m[list(available)] = True
        return jnp.asarray(m)
    return jnp.asarray(available, bool)


def substitute(probs, idx, alpha: float, available, mode: str = "window", similarity=None):
    """-> (experts [N, k] to compute, substituted mask [N, k]).

    available: experts on the device (landed) for this layer, a bool mask [E] or a set. The
    batch's top-score set is added here. alpha = 0 returns idx unchanged. Traceable: alpha
    and mode are Python values, everything else may be traced. mode "skip": the mask is of
    the dropped experts instead (see `skip`)."""
    probs, idx = jnp.asarray(probs), jnp.asarray(idx, jnp.int32)
    N, k = idx.shape
    E = probs.shape[-1]
    if alpha <= 0:
        return idx, jnp.zeros(idx.shape, bool)
    S, top = classify(probs, idx, alpha)
    p_sel = jnp.take_along_axis(probs, idx, axis=-1)  # [N, k]
    batch_top = member(idx, top, E)
    usable = _mask(available, E) | batch_top  # on the device, or computed anyway
    if mode == "skip":
        return skip(p_sel, idx, top, usable)
    # Tokens are independent: all N rows advance together, one low-score rank r per round, so
    # the program has k rounds of [N, E] ops whatever the batch (not N * k rounds of [E] ops).
    rows = jnp.arange(N)
    order = jnp.argsort(-p_sel, axis=-1, stable=True)  # [N, k]: more important low-score experts first
    cands = usable[None, :] & ~selected_mask(idx, E)  # [N, E]: unselected, usable
    if mode != "similarity":  # unselected experts have p <= S; the window bounds them below
        cands = cands & (probs > (1.0 - alpha) * S[:, None])
    out, changed, taken = idx, jnp.zeros(idx.shape, bool), jnp.zeros((N, E), bool)
    similarity = None if similarity is None else jnp.asarray(similarity)
    for r in range(k):
        j = order[:, r]  # [N]
        e = idx[rows, j]  # [N]
        free = cands & ~taken  # [N, E]
        if mode == "window":
            rank = jnp.where(free, probs, -jnp.inf)
        else:  # most similar, then most probable; argmax takes the lowest id of ties
            sim = jnp.where(free, similarity[e], -jnp.inf)
            rank = jnp.where(free & (sim == sim.max(axis=-1, keepdims=True)), probs, -jnp.inf)
        best = jnp.argmax(rank, axis=-1).astype(jnp.int32)  # [N]
        do = ~top[rows, j] & ~usable[e] & free.any(axis=-1)  # [N]
        at_j = jnp.arange(k)[None, :] == j[:, None]  # [N, k]
        out = jnp.where(at_j, jnp.where(do, best, e)[:, None], out)
        changed = changed | (at_j & do[:, None])
        taken = taken | ((jnp.arange(E)[None, :] == best[:, None]) & do[:, None])
    return out, changed


def skip(p_sel, idx, top, usable):
    """The skip baseline: selected experts idx [N, k] with probabilities p_sel [N, k], top-score
    mask top [N, k], usable [E] (on the device or batch top-score) -> (experts [N, k], dropped
    [N, k]). Dropped: low-score and not usable, except that a token whose every expert would be
    dropped keeps its most probable one (fetched). A dropped entry names the token's most
    probable kept expert (computed anyway, given weight 0 by `skip_weights`)."""
    k = idx.shape[1]
    drop = ~top & ~usable[idx]
    best = jnp.argmax(p_sel, axis=-1)  # the first of ties
    drop = drop & ~(drop.all(axis=-1, keepdims=True) & (jnp.arange(k) == best[:, None]))
    kept_best = jnp.argmax(jnp.where(drop, -jnp.inf, p_sel), axis=-1)
    placeholder = jnp.take_along_axis(idx, kept_best[:, None], axis=-1)  # [N, 1]
    return jnp.where(drop, placeholder, idx), drop


def skip_weights(weights, dropped):
    """Router weights [N, k] with the dropped experts' set to 0 and the kept ones scaled to carry
    the selected experts' total weight: for families that renormalise the top-k
    (norm_topk_prob) this is their own renormalisation over the kept experts. Rows where nothing
    was dropped keep the router's weights bit for bit."""
    weights = jnp.asarray(weights)
    kept = jnp.where(dropped, 0.0, weights)
    scaled = kept * (jnp.sum(weights, axis=-1, keepdims=True) / (jnp.sum(kept, axis=-1, keepdims=True) + 1e-20))
    return jnp.where(dropped.any(axis=-1, keepdims=True), scaled, weights)


def gate_weights(scores, experts, renormalise: bool, scale: float = 1.0):
    """Weights of the computed experts, as the router would weigh them had it selected them
    (docs/method.md 2): each one's own router score (a substitute's too), renormalised over the k
    computed experts where the family does, times its routed_scaling_factor. Bit for bit the
    router's own weights (`moe.select`) when experts are the routed ones."""
    w = jnp.take_along_axis(jnp.asarray(scores), jnp.asarray(experts), axis=-1).astype(jnp.float32)
    if renormalise:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return w * scale
