"""Policies and the scheduler on hand-built inputs (no model)."""

import numpy as np
import pytest

from moejax.offload.policies import LFU, LRU, OnDemand, make_policy
from moejax.offload.scheduler import choose_victims, plan_layer, plan_prefetch, unique_in_order


def test_lru_evicts_least_recently_used():
    p = LRU()
    p.touch([(0, 1), (0, 2), (0, 3)])
    p.touch([(0, 1)])
    assert p.victim([(0, 1), (0, 2), (0, 3)]) == (0, 2)
    assert choose_victims(2, 0, [(0, 1), (0, 2), (0, 3)], set(), p) == [(0, 2), (0, 3)]


def test_lfu_evicts_least_frequent_then_least_recent():
    p = LFU()
    p.touch([(0, 1), (0, 2), (0, 3)])
    p.touch([(0, 1), (0, 3)])
    p.touch([(0, 3)])
    assert p.victim([(0, 1), (0, 2), (0, 3)]) == (0, 2)
    p.touch([(0, 2)])  # now 1 and 2 both used twice; 1 less recently
    assert p.victim([(0, 1), (0, 2), (0, 3)]) == (0, 1)


def test_plan_layer_hits_fetches_and_shield():
    p = LRU()
    p.touch([(1, 5), (0, 0), (0, 1)])  # (1, 5) oldest, but the layer needs it: shielded
    routed = np.array([[0, 5], [2, 0]])
    plan = plan_layer(1, routed, resident={0, 5}, pending=set(), policy=p, free=0,
                      candidates=[(1, 5), (1, 0), (0, 0), (0, 1)])
    assert plan.needed == [0, 5, 2] and plan.hits == [0, 5] and plan.fetch == [2]
    assert plan.evict == [(0, 0)]  # (1, 0) and (1, 5) are used by this layer


def test_plan_layer_uses_free_slots_before_evicting():
    plan = plan_layer(0, np.array([[1, 2, 3]]), set(), set(), LRU(), free=3, candidates=[(0, 7)])
    assert plan.fetch == [1, 2, 3] and plan.evict == []


def test_pending_prefetch_is_waited_for_not_fetched_and_not_a_hit():
    plan = plan_layer(2, np.array([[4, 6]]), resident={6}, pending={4}, policy=LRU(), free=0, candidates=[])
    assert plan.wait == [4] and plan.fetch == [] and plan.hits == [6]


def test_wrong_prefetch_is_ignored_and_evictable():
    """Experts prefetched for a layer that then routes elsewhere: no hit, no compute, and
    the first to go when room is needed."""
    p = LRU()
    p.touch([(3, 1), (3, 2)])  # used earlier
    want, evict = plan_prefetch(3, np.array([[7, 8]]), resident={1, 2}, pending=set(), policy=p, free=2,
                                candidates=[(3, 1), (3, 2)], shield=set())
    assert want == [7, 8] and evict == []
    # the real scores pick 1 and 9: 7 and 8 (prefetched, never used) are not hits
    plan = plan_layer(3, np.array([[1, 9]]), resident={1, 2, 7, 8}, pending=set(), policy=p, free=0,
                      candidates=[(3, 1), (3, 2), (3, 7), (3, 8)])
    assert plan.hits == [1] and plan.fetch == [9]
    assert plan.evict[0] in {(3, 7), (3, 8)}  # never touched: least recently used


def test_prefetch_never_evicts_shielded_and_shrinks_instead():
    want, evict = plan_prefetch(1, np.array([[4, 5, 6]]), set(), set(), LRU(), free=0,
                                candidates=[(0, 1), (0, 2)], shield={(0, 1)})
    assert want == [4] and evict == [(0, 2)]


def test_shielded_pool_too_small_is_an_error():
    with pytest.raises(RuntimeError):
        choose_victims(1, 0, [(0, 1)], {(0, 1)}, LRU())


def test_registry_and_ondemand_flags():
    assert make_policy("ondemand").reuse is False and isinstance(make_policy("ondemand"), OnDemand)
    assert make_policy("lru-prefetch").prefetch == "next-layer-gate"
    assert unique_in_order(np.array([[3, 1], [1, 2]])) == [3, 1, 2]


def _transfer(t, nbytes=1000):
    import jax.numpy as jnp

    from moejax.offload.store import Transfer

    return Transfer((0, 0), jnp.zeros(1), nbytes, t, "prefetch")


def test_emulated_link_is_serial_and_cancels_only_queued_transfers():
    import time

    from moejax.offload.store import Link, parse_link

    link = parse_link("emulated:1kB/s,1ms")  # 1000 bytes take 1 s + 1 ms latency
    assert link.bandwidth == 1e3 and link.latency == 1e-3
    now = time.perf_counter()
    a, b, c = _transfer(now), _transfer(now), _transfer(now)
    for tr in (a, b, c):
        link.schedule(tr)
    assert a.link_start == now and a.link_end == pytest.approx(now + 1.001)
    assert b.link_start == pytest.approx(a.link_end) and c.link_start == pytest.approx(b.link_end)
    assert not link.cancel(a)  # already moving
    old_c_start = c.link_start
    assert link.cancel(b)  # queued: dropped, and c moves up
    assert c.link_start < old_c_start and b not in link.queue
    assert not Link().cancel(c)  # a real link has no queue to drop from
    with pytest.raises(Exception, match="expected 'real' or 'emulated"):
        parse_link("emulated:fast")
