"""Eviction policies: one small class each. A policy sees expert uses and picks victims;
the pool and the engine do the rest.

Keys are (layer, expert). Flags tell the engine what to run around a policy:
`reuse=False`: cached experts are never used again (on-demand loading); `prefetch`: which
speculative prefetch ("next-layer-gate" or "top-score"); `substitute`: importance-driven
substitution (moejax.offload.importance); `needs_probs`: the full router probabilities
come to the host every decode layer.
"""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np


class Policy:
    name = "base"
    reuse = True
    prefetch: str | None = None
    substitute = False
    needs_probs = False

    def __init__(self, alpha: float = 0.0, mode: str = "window", score_window: int = 16):
        self.alpha, self.mode, self.score_window = alpha, mode, score_window
        self.clock = 0
        self.last_use: dict[tuple[int, int], int] = {}

    def observe(self, layer: int, probs: np.ndarray) -> None:
        """Router probabilities [N, E] of one decode step at one layer (all experts)."""

    def touch(self, keys) -> None:
        """Record a use of each key (experts a layer computed, in order)."""
        for k in keys:
            self.clock += 1
            self.last_use[k] = self.clock

    def victim(self, candidates: list[tuple[int, int]]) -> tuple[int, int]:
        raise NotImplementedError


class LRU(Policy):
    """Evict the least recently used expert."""

    name = "lru"

    def victim(self, candidates):
        return min(candidates, key=lambda k: self.last_use.get(k, 0))


class LFU(LRU):
    """Evict the least frequently used expert; ties go to the least recently used."""

    name = "lfu"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.count: dict[tuple[int, int], int] = defaultdict(int)

    def touch(self, keys):
        super().touch(keys)
        for k in keys:
            self.count[k] += 1

    def victim(self, candidates):
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last_use.get(k, 0)))


class OnDemand(LRU):
    """No reuse: every routed expert is fetched every time it is computed."""

    name = "ondemand"
    reuse = False


class LRUPrefetch(LRU):
    """LRU plus mixtral-offloading's speculative loading: the next layer's router applied to
    the current hidden state predicts its top-k, which start loading early."""

    name = "lru-prefetch"
    prefetch = "next-layer-gate"


class ScoreEviction(LRU):
    """PAPER.md 3: evict the resident expert with the lowest mean router probability over
    the last `score_window` decode steps, tracking ALL experts (selected or not), so likely
    substitutes stay. Ties (e.g. never observed) go to the least recently used."""

    name = "score"
    needs_probs = True

    def __init__(self, **kw):
        super().__init__(**kw)
        self.history: dict[int, deque] = {}
        self.sums: dict[int, np.ndarray] = {}  # running sum of the window, per layer [E]

    def observe(self, layer, probs):
        p = np.asarray(probs, np.float64).mean(axis=0)  # [E], batch mean of this step
        h = self.history.setdefault(layer, deque())
        self.sums[layer] = self.sums.get(layer, 0.0) + p
        h.append(p)
        if len(h) > self.score_window:
            self.sums[layer] = self.sums[layer] - h.popleft()

    def score(self, key) -> float:
        h = self.history.get(key[0])
        return float(self.sums[key[0]][key[1]] / len(h)) if h else 0.0

    def victim(self, candidates):
        return min(candidates, key=lambda k: (self.score(k), self.last_use.get(k, 0)))


class ScoreSubstitution(ScoreEviction):
    """Score eviction + importance-driven substitution (PAPER.md 2)."""

    name = "score-sub"
    substitute = True


class SMoE(ScoreSubstitution):
    """The full method: score eviction, substitution, and prefetch of the next layer's
    predicted top-score experts (PAPER.md 4)."""

    name = "smoe"
    prefetch = "top-score"


POLICIES = {p.name: p for p in (OnDemand, LRU, LFU, LRUPrefetch, ScoreEviction, ScoreSubstitution, SMoE)}
ALL_NAMES = ("resident", *POLICIES)
ABLATION = ("lru", "score", "score-sub", "smoe")  # the paper's ladder, one step at a time


def make_policy(name: str, **settings) -> Policy:
    return POLICIES[name](**settings)
