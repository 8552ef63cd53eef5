"""Eviction policies: one small class each. A policy says which resident expert goes first
(its eviction keys) and which stages run around it; `moejax.offload.decisions` does the rest,
the same way for every driver (the fused program, the stepwise engine, trace replay).

Flags: `reuse=False`: cached experts are never used again (on-demand loading); `prefetch`:
which speculative prefetch ("next-layer-gate" or "top-score"); `prefetch_width` (a setting):
0 prefetches what the prediction selects (the paper's rule, any number per layer), P > 0
exactly the P most probable missing experts of the next layer, a fixed number, so that the
fused engine can issue them as unconditional copies that overlap compute; `substitute`:
importance-driven substitution (moejax.offload.importance); `needs_probs`: the policy
observes every decode layer's router probabilities (score-aware eviction).

A policy is a frozen value (its settings are part of it), so jitted programs can take it as
a static argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp


@dataclass(frozen=True)
class Policy:
    alpha: float = 0.0
    mode: str = "window"
    score_window: int = 16
    prefetch_width: int = 0
    name = "base"
    reuse = True
    prefetch = None  # "next-layer-gate" | "top-score"
    substitute = False
    needs_probs = False

    def eviction_keys(self, state) -> tuple:
        """Arrays [L, E] over (MoE layer, expert), most significant first: the resident
        expert with the smallest keys is evicted first; ties go to the lowest slot."""
        raise NotImplementedError


class LRU(Policy):
    """Evict the least recently used expert."""

    name = "lru"

    def eviction_keys(self, state):
        return (state["last_use"],)


class LFU(Policy):
    """Evict the least frequently used expert; ties go to the least recently used."""

    name = "lfu"

    def eviction_keys(self, state):
        return state["count"], state["last_use"]


class OnDemand(LRU):
    """No reuse: every routed expert is fetched every time it is computed."""

    name = "ondemand"
    reuse = False


class LRUPrefetch(LRU):
    """LRU plus mixtral-offloading's speculative loading: the next layer's router applied to
    the current hidden state predicts its top-k, which start loading early."""

    name = "lru-prefetch"
    prefetch = "next-layer-gate"


def mean_score(state):
    """[L, E] mean router probability of every expert over the last `score_window` observed
    decode steps (0 for a layer never observed)."""
    n = jnp.minimum(state["hist_n"], state["hist"].shape[1])  # [L]
    return jnp.sum(state["hist"], axis=1) / jnp.maximum(n, 1)[:, None].astype(jnp.float32)


class ScoreEviction(Policy):
    """docs/method.md 3: evict the resident expert with the lowest mean router probability over
    the last `score_window` decode steps, tracking ALL experts (selected or not), so likely
    substitutes stay. Ties (e.g. never observed) go to the least recently used."""

    name = "score"
    needs_probs = True

    def eviction_keys(self, state):
        return mean_score(state), state["last_use"]


class ScoreSubstitution(ScoreEviction):
    """Score eviction + importance-driven substitution (docs/method.md 2)."""

    name = "score-sub"
    substitute = True


class SMoE(ScoreSubstitution):
    """The full method: score eviction, substitution, and prefetch of the next layer's
    predicted top-score experts (docs/method.md 4)."""

    name = "smoe"
    prefetch = "top-score"


class Belady(LRU):
    """Offline optimum without substitution (trace replay only): evict the expert used again
    furthest in the future; the replay driver keeps `state["next_use"]` [L, E] current."""

    name = "belady"

    def eviction_keys(self, state):
        return -state["next_use"], state["last_use"]


POLICIES = {p.name: p for p in (OnDemand, LRU, LFU, LRUPrefetch, ScoreEviction, ScoreSubstitution, SMoE)}
ALL_NAMES = ("resident", *POLICIES)
ABLATION = ("lru", "score", "score-sub", "smoe")  # the paper's ladder, one step at a time


def check_width(width: int, cfg) -> int:
    """--prefetch-width, validated against the model: 0 (the paper's rule) up to its experts."""
    if not 0 <= int(width) <= cfg.num_experts:
        from moejax.errors import MoejaxError

        raise MoejaxError(f"--prefetch-width {width} must be between 0 and the model's {cfg.num_experts} experts")
    return int(width)


def make_policy(name: str, alpha: float = 0.0, mode: str = "window", score_window: int = 16,
                prefetch_width: int = 0) -> Policy:
    cls = Belady if name == "belady" else POLICIES[name]
    return cls(alpha=float(alpha), mode=mode, score_window=int(score_window),
               prefetch_width=int(prefetch_width) if cls.prefetch else 0)
