"""Importance-driven substitution (PAPER.md sections 1-2), as pure functions on host arrays.

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
"""

from __future__ import annotations

import numpy as np

MODES = ("window", "similarity", "hybrid")


def threshold_s(probs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """probs [N, E], selected idx [N, k] -> S [N], the highest probability of an expert
    each token did not select."""
    unselected = probs.copy()
    np.put_along_axis(unselected, idx, -np.inf, axis=-1)
    return unselected.max(axis=-1)


def classify(probs: np.ndarray, idx: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """-> (S [N], top-score mask [N, k]) for the selected experts idx [N, k]."""
    S = threshold_s(probs, idx)
    p_sel = np.take_along_axis(probs, idx, axis=-1)
    return S, p_sel >= (1.0 + alpha) * S[:, None]


def substitute(probs: np.ndarray, idx: np.ndarray, alpha: float, available: set[int], mode: str = "window",
               similarity: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (experts [N, k] to compute, substituted mask [N, k]).

    available: experts on the device (landed) for this layer. The batch's top-score set is
    added here. alpha = 0 returns idx unchanged."""
    out = idx.copy()
    changed = np.zeros(idx.shape, bool)
    if alpha <= 0:
        return out, changed
    S, top = classify(probs, idx, alpha)
    usable = set(available) | set(idx[top].tolist())  # on device, or computed anyway
    N, k = idx.shape
    for n in range(N):
        low = [j for j in np.argsort(-probs[n, idx[n]]) if not top[n, j] and int(idx[n, j]) not in usable]
        if not low:
            continue
        selected = set(idx[n].tolist())
        cands = [c for c in usable if c not in selected]
        if mode != "similarity":  # unselected experts have p <= S; the window bounds them below
            cands = [c for c in cands if probs[n, c] > (1.0 - alpha) * S[n]]
        taken: set[int] = set()
        for j in low:
            e = int(idx[n, j])
            free = [c for c in cands if c not in taken]
            if not free:
                break
            if mode == "window":
                best = max(free, key=lambda c: (probs[n, c], -c))
            else:
                best = max(free, key=lambda c: (similarity[e, c], probs[n, c], -c))
            taken.add(best)
            out[n, j] = best
            changed[n, j] = True
    return out, changed


def gate_weights(scores: np.ndarray, experts: np.ndarray, renormalise: bool, scale: float = 1.0) -> np.ndarray:
    """Weights of the computed experts, as the router would weigh them had it selected them
    (PAPER.md 2): each one's own router score (a substitute's too), renormalised over the k
    computed experts where the family does, times its routed_scaling_factor."""
    w = np.take_along_axis(scores, experts, axis=-1).astype(np.float32)
    if renormalise:
        w = w / (w.sum(axis=-1, keepdims=True) + np.float32(1e-20))
    return w * np.float32(scale)
