"""Eviction policies: one small class each. A policy sees expert uses and picks victims;
the pool and the engine do the rest.

Keys are (layer, expert). `reuse=False` means cached experts are never used again
(on-demand loading); `prefetch` names a speculative prefetch the engine should run.
"""

from __future__ import annotations

from collections import defaultdict


class Policy:
    name = "base"
    reuse = True
    prefetch: str | None = None

    def __init__(self):
        self.clock = 0
        self.last_use: dict[tuple[int, int], int] = {}

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

    def __init__(self):
        super().__init__()
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


POLICIES = {p.name: p for p in (OnDemand, LRU, LFU, LRUPrefetch)}
ALL_NAMES = ("resident", *POLICIES)


def make_policy(name: str) -> Policy:
    return POLICIES[name]()
