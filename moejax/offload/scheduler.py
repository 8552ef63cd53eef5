"""Pure planning: (routed experts, residency, policy) -> what to compute, fetch and evict.

No arrays move here; the engine carries plans out. Unit-testable with hand-built inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moejax.offload.policies import Policy


@dataclass
class Plan:
    layer: int
    needed: list[int]  # unique experts the layer computes, in first-use order
    hits: list[int]  # needed and resident (landed) when the plan was made
    fetch: list[int]  # needed, not on the device and not on the way: load now
    wait: list[int]  # needed and already on the way (an earlier prefetch): wait for it
    evict: list[tuple[int, int]] = field(default_factory=list)  # keys whose slots the fetches take


def unique_in_order(ids: np.ndarray) -> list[int]:
    seen: dict[int, None] = {}
    for e in np.asarray(ids).reshape(-1).tolist():
        seen.setdefault(int(e), None)
    return list(seen)


def choose_victims(n: int, free: int, candidates: list[tuple[int, int]], shield: set[tuple[int, int]],
                   policy: Policy) -> list[tuple[int, int]]:
    """Keys to evict so that n new experts fit, given `free` empty slots. Shielded keys (the
    experts the current layer uses) are never chosen."""
    pool = [k for k in candidates if k not in shield]
    victims = []
    for _ in range(max(0, n - free)):
        if not pool:
            raise RuntimeError("expert pool too small for this step (every slot is shielded)")
        v = policy.victim(pool)
        pool.remove(v)
        victims.append(v)
    return victims


def plan_layer(layer: int, routed: np.ndarray, resident: set[int], pending: set[int], policy: Policy,
               free: int, candidates: list[tuple[int, int]]) -> Plan:
    """routed [N, k] expert ids the layer computes; resident = landed experts of this layer;
    pending = experts of this layer whose transfer is in flight."""
    needed = unique_in_order(routed)
    hits = [e for e in needed if e in resident]
    wait = [e for e in needed if e in pending and e not in resident]
    fetch = [e for e in needed if e not in resident and e not in pending]
    shield = {(layer, e) for e in needed}
    evict = choose_victims(len(fetch), free, candidates, shield, policy)
    return Plan(layer, needed, hits, fetch, wait, evict)


def plan_prefetch(layer: int, predicted: np.ndarray, resident: set[int], pending: set[int], policy: Policy,
                  free: int, candidates: list[tuple[int, int]], shield: set[tuple[int, int]]
                  ) -> tuple[list[int], list[tuple[int, int]]]:
    """Experts of `layer` to load speculatively and the keys to evict for them. Prefetching
    never evicts shielded keys; it loads fewer experts rather than fail."""
    want = [e for e in unique_in_order(predicted) if e not in resident and e not in pending]
    room = free + len([k for k in candidates if k not in shield])
    want = want[:room]
    return want, choose_victims(len(want), free, candidates, shield | {(layer, e) for e in want}, policy)
