"""Policies and their decisions (moejax.offload.decisions) on hand-built inputs (no model).

Every plan is run eagerly on a small pool; the expected slots, experts and counters are
worked out by hand in the comments (the clock ticks once per expert use, in first-use order).
"""

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.offload import decisions as D
from moejax.offload.policies import LFU, LRU, OnDemand, make_policy


def _decode(state, layout, policy, m, experts, pending=None):
    """plan_decode on a nested list of expert ids [N, k] -> (state, fetched experts, their slots, needed)."""
    state, f, (uniq, ok) = D.plan_decode(state, layout, policy, m, jnp.asarray(experts, jnp.int32), pending)
    n = int(f.count)
    assert (np.asarray(f.slots)[n:] == layout.slots).all()  # entries past the count name no slot
    return state, np.asarray(f.experts)[:n].tolist(), np.asarray(f.slots)[:n].tolist(), (uniq, ok)


def _run(state, layout, policy, m, steps):
    """Several decode steps of MoE layer m, each [N, k]."""
    for experts in steps:
        state = _decode(state, layout, policy, m, experts)[0]
    return state


def _counters(state):
    return {k: int(v) for k, v in state["counters"].items()}


def _owner(state, layout):
    """Slot -> (layer, expert), None if free."""
    E = layout.experts
    return [None if o < 0 else (o // E, o % E) for o in np.asarray(state["owner"]).tolist()]


def _check_consistent(state, layout):
    """table and owner describe the same placement."""
    table, owner = np.asarray(state["table"]), np.asarray(state["owner"])
    for s, o in enumerate(owner.tolist()):
        if o >= 0:
            assert table[o // layout.experts, o % layout.experts] == s
    for (m, e), s in np.ndenumerate(table):
        if s >= 0:
            assert owner[s] == m * layout.experts + e
    assert (table >= 0).sum() == (owner >= 0).sum()


def _mask(E, ids):
    m = np.zeros(E, bool)
    m[list(ids)] = True
    return jnp.asarray(m)


def test_lru_evicts_least_recently_used():
    lay = D.Layout(1, 8, 3)
    # ticks: 1 -> 1, 2 -> 2, 3 -> 3 (slots 0, 1, 2); then 1 -> 4
    s = _run(D.init_state(lay), lay, LRU(), 0, [[[1, 2, 3]], [[1]]])
    assert np.asarray(s["last_use"])[0, 1:4].tolist() == [4, 2, 3] and int(s["clock"]) == 4
    s1, fetched, slots, _ = _decode(s, lay, LRU(), 0, [[4]])
    assert fetched == [4] and slots == [1]  # 2 (slot 1) is least recently used
    assert _owner(s1, lay) == [(0, 1), (0, 4), (0, 3)]
    # two at once: 2 then 3 go, in LRU order
    s2, fetched, slots, _ = _decode(s, lay, LRU(), 0, [[5, 4]])
    assert fetched == [5, 4] and slots == [1, 2]
    assert _owner(s2, lay) == [(0, 1), (0, 5), (0, 4)]
    assert np.asarray(s2["table"])[0].tolist() == [-1, 0, -1, -1, 2, 1, -1, -1]
    _check_consistent(s2, lay)


def test_lfu_evicts_least_frequent_then_least_recent():
    lay = D.Layout(1, 8, 3)
    # ticks 1: 1, 2: 2, 3: 3, 1: 4, 2: 5, 1: 6, 2: 7, 3: 8 -> counts 1: 3, 2: 3, 3: 2
    s = _run(D.init_state(lay), lay, LFU(), 0, [[[1, 2, 3]], [[1]], [[2]], [[1]], [[2]], [[3]]])
    assert np.asarray(s["count"])[0, 1:4].tolist() == [3, 3, 2]
    assert np.asarray(s["last_use"])[0, 1:4].tolist() == [6, 7, 8]
    # 3 is the most recently used but the least frequent: LFU evicts it, LRU would evict 1
    assert _decode(s, lay, LFU(), 0, [[4]])[1:3] == ([4], [2])
    assert _decode(s, lay, LRU(), 0, [[4]])[1:3] == ([4], [0])
    # 3 used twice more (count 4): 1 and 2 tie at 3 uses, 1 less recently -> 1 goes
    s = _run(s, lay, LFU(), 0, [[[3]], [[3]]])
    assert _decode(s, lay, LFU(), 0, [[4]])[1:3] == ([4], [0])


def test_lfu_and_lru_ties_go_to_the_lowest_slot():
    lay = D.Layout(1, 8, 4)
    # placed without a use: equal keys everywhere
    s = D.assign(D.init_state(lay), lay, 0, jnp.array([6, 5, 4, 3]), jnp.array([3, 1, 2, 0]), 4)
    for pol in (LRU(), LFU()):
        assert _decode(s, lay, pol, 0, [[7, 1]])[1:3] == ([7, 1], [0, 1])


def test_plan_decode_hits_fetches_and_shield():
    lay = D.Layout(2, 8, 4)  # one pool shared by both layers
    s = D.init_state(lay)
    s = _run(s, lay, LRU(), 1, [[[5]]])  # (1, 5) slot 0, tick 1: the oldest
    s = _run(s, lay, LRU(), 0, [[[0, 1]]])  # (0, 0) slot 1, (0, 1) slot 2
    s = _run(s, lay, LRU(), 1, [[[0]]])  # (1, 0) slot 3
    before = _counters(s)
    assert before["hits"] == 0 and before["unique"] == 4 and before["fetched"] == 4 and before["routed"] == 4
    s, fetched, slots, (uniq, ok) = _decode(s, lay, LRU(), 1, [[0, 5], [2, 0]])
    assert np.asarray(uniq)[np.asarray(ok)].tolist() == [0, 5, 2] and int(np.asarray(ok).sum()) == 3
    # 0 and 5 are hits; 2 is fetched. (1, 5) is the LRU but this layer uses it, (1, 0) too:
    # the oldest unshielded one, (0, 0) in slot 1, goes
    assert fetched == [2] and slots == [1]
    assert _owner(s, lay) == [(1, 5), (1, 2), (0, 1), (1, 0)]
    c = _counters(s)
    assert (c["hits"], c["unique"], c["fetched"], c["routed"]) == (2, 7, 5, 8)
    assert c["prefetch_issued"] == c["prefetch_used"] == c["prefill_fetched"] == c["substituted"] == 0
    # every use ticks once, in first-use order: 0 -> 5, 5 -> 6, 2 -> 7
    assert np.asarray(s["last_use"])[1, [0, 5, 2]].tolist() == [5, 6, 7] and int(s["clock"]) == 7
    assert np.asarray(s["count"])[1, [0, 5, 2]].tolist() == [2, 2, 1]
    _check_consistent(s, lay)


def test_shield_is_per_layer_in_a_global_pool():
    """A layer's use shields its own (layer, expert) only: another layer's copy of the same
    expert id is evicted like any other when it is the least recently used."""
    lay = D.Layout(2, 8, 3)
    s = _run(D.init_state(lay), lay, LRU(), 1, [[[3]]])  # (1, 3) slot 0, the oldest
    s = _run(s, lay, LRU(), 0, [[[1, 2]]])  # slots 1, 2
    s, fetched, slots, _ = _decode(s, lay, LRU(), 0, [[3, 1]])
    assert fetched == [3] and slots == [0]
    assert _owner(s, lay) == [(0, 3), (0, 1), (0, 2)]
    assert np.asarray(s["table"])[1, 3] == -1
    # layer 0's own experts are shielded from it even when the oldest: (0, 2) (tick 3) and
    # (0, 3) (tick 4) are used now, so (0, 1) (tick 5) goes
    s, fetched, slots, _ = _decode(s, lay, LRU(), 0, [[4, 2, 3]])
    assert fetched == [4] and slots == [1]
    assert _owner(s, lay) == [(0, 3), (0, 4), (0, 2)]
    _check_consistent(s, lay)


def test_free_slots_first_lowest_first_then_eviction_order():
    lay = D.Layout(1, 8, 4)
    s = D.assign(D.init_state(lay), lay, 0, jnp.array([1, 2]), jnp.array([1, 3]), 2)  # slots 0, 2 free
    s = D.touch(s, lay, 0, jnp.array([1]), jnp.array([True]), jnp.int32(1))  # 1 more recent than 2
    assert _decode(s, lay, LRU(), 0, [[5]])[1:3] == ([5], [0])  # a free slot, not an eviction
    # 3 fetches: the free slots 0 and 2, then the LRU 2 in slot 3; experts in first-use order
    s2, fetched, slots, _ = _decode(s, lay, LRU(), 0, [[7, 5], [6, 7]])
    assert fetched == [7, 5, 6] and slots == [0, 2, 3]
    assert _owner(s2, lay) == [(0, 7), (0, 1), (0, 5), (0, 6)]
    _check_consistent(s2, lay)


def test_fetches_take_ascending_slots_in_first_use_order():
    lay = D.Layout(1, 8, 6)
    s = _run(D.init_state(lay), lay, LRU(), 0, [[[0, 1, 2]], [[3, 4, 5]], [[2, 0, 5]]])
    # last uses: 0: 8, 1: 2, 2: 7, 3: 4, 4: 5, 5: 9 (slot = expert)
    s, fetched, slots, _ = _decode(s, lay, LRU(), 0, [[6, 7], [6, 2], [1, 5]])
    # 6 and 7 are fetched; 1, the LRU, is a hit and shielded; 3 and 4 go -> slots 3, 4
    assert fetched == [6, 7] and slots == [3, 4]
    assert _owner(s, lay) == [(0, 0), (0, 1), (0, 2), (0, 6), (0, 7), (0, 5)]
    s = _run(s, lay, LRU(), 0, [[[6, 0]]])
    # last uses: 7 (slot 4): 11, 2 (slot 2): 12, 1: 13, 5: 14, 6: 15, 0: 16. Eviction order:
    # slot 4, then slot 2; the fetches take them ascending, in first-use order: 4 -> 2, 3 -> 4
    s, fetched, slots, _ = _decode(s, lay, LRU(), 0, [[4, 3]])
    assert fetched == [4, 3] and slots == [2, 4]
    assert _owner(s, lay) == [(0, 0), (0, 1), (0, 4), (0, 6), (0, 3), (0, 5)]
    _check_consistent(s, lay)


def test_pending_experts_are_neither_hits_nor_fetched_again():
    lay = D.Layout(1, 8, 4)
    s = D.assign(D.init_state(lay), lay, 0, jnp.array([6, 4]), jnp.array([0, 1]), 2)  # 4 still in flight
    s, fetched, slots, _ = _decode(s, lay, LRU(), 0, [[4, 6]], pending=_mask(8, {4}))
    assert fetched == [] and slots == []
    c = _counters(s)
    assert (c["hits"], c["unique"], c["fetched"], c["routed"]) == (1, 2, 0, 2)  # 6 only is a hit
    assert _owner(s, lay) == [(0, 6), (0, 4), None, None]
    assert np.asarray(s["last_use"])[0, [4, 6]].tolist() == [1, 2]  # both used


def test_wrong_prefetch_is_no_hit_and_evicted_first():
    """Experts prefetched for a layer that then routes elsewhere: no hit, and the first to go
    when room is needed (never used)."""
    lay = D.Layout(4, 16, 5)
    s = _run(D.init_state(lay), lay, LRU(), 3, [[[1, 2, 3]]])  # slots 0, 1, 2, ticks 1, 2, 3
    no_shield = (2, jnp.array([0]), jnp.array([False]))
    s, f = D.plan_prefetch(s, lay, LRU(), 3, jnp.array([1, 7, 7, 9, 8]), jnp.array([True, True, True, False, True]),
                           no_shield)
    # unique valid predictions not resident: 7, 8 (1 is resident, 9 not valid) -> free slots 3, 4
    assert int(f.count) == 2
    assert np.asarray(f.experts)[:2].tolist() == [7, 8] and np.asarray(f.slots)[:2].tolist() == [3, 4]
    assert np.asarray(s["prefetched"])[3].nonzero()[0].tolist() == [7, 8] and np.asarray(s["prefetched"]).sum() == 2
    assert np.asarray(s["last_use"])[3, [7, 8]].tolist() == [0, 0]  # a prefetch is no use
    c = _counters(s)
    assert (c["prefetch_issued"], c["fetched"], c["prefetch_used"], c["unique"]) == (2, 5, 0, 3)
    # the real routing picks 1 and 9: 7 and 8 are not hits; 7 (never used, lowest slot) makes room
    s2, fetched, slots, _ = _decode(s, lay, LRU(), 3, [[1, 9]])
    assert fetched == [9] and slots == [3]
    assert _owner(s2, lay) == [(3, 1), (3, 2), (3, 3), (3, 9), (3, 8)]
    assert np.asarray(s2["prefetched"])[3].nonzero()[0].tolist() == [8]  # evicted: mark dropped
    c = _counters(s2)
    assert (c["hits"], c["unique"], c["fetched"], c["prefetch_used"]) == (1, 5, 6, 0)
    # a right prefetch: 7 is used, 1 is a plain hit (not prefetched): prefetch_used counts 7 only
    s3, fetched, _, _ = _decode(s, lay, LRU(), 3, [[7, 1]])
    assert fetched == []
    c = _counters(s3)
    assert (c["hits"], c["unique"], c["fetched"], c["prefetch_used"]) == (2, 5, 5, 1)
    assert np.asarray(s3["prefetched"])[3].nonzero()[0].tolist() == [8]  # used: no longer prefetched
    # used once more: prefetch_used does not count it again
    assert _counters(_decode(s3, lay, LRU(), 3, [[7]])[0])["prefetch_used"] == 1
    _check_consistent(s3, lay)


def test_prefetch_skips_pending_experts():
    lay = D.Layout(1, 8, 4)
    s, f = D.plan_prefetch(D.init_state(lay), lay, LRU(), 0, jnp.array([3, 4]), jnp.array([True, True]),
                           (0, jnp.array([0]), jnp.array([False])), pending=_mask(8, {3}))
    assert int(f.count) == 1 and int(f.experts[0]) == 4 and int(f.slots[0]) == 0


def test_prefetch_never_evicts_shielded_and_loads_fewer():
    lay = D.Layout(2, 8, 3)
    s = _run(D.init_state(lay), lay, LRU(), 0, [[[1, 2, 5]]])  # (0, 1), (0, 2), (0, 5): slots 0, 1, 2
    # layer 0 is computing 1 and 5: one slot only may be taken for layer 1's three predictions
    s1, f = D.plan_prefetch(s, lay, LRU(), 1, jnp.array([4, 5, 6]), jnp.array([True] * 3),
                            (0, jnp.array([1, 5, 0]), jnp.array([True, True, False])))
    assert int(f.count) == 1 and int(f.experts[0]) == 4 and int(f.slots[0]) == 1
    assert _owner(s1, lay) == [(0, 1), (1, 4), (0, 5)]
    assert _counters(s1)["prefetch_issued"] == 1 and _counters(s1)["fetched"] == 4
    assert np.asarray(s1["prefetched"]).nonzero()[0].tolist() == [1] and np.asarray(s1["prefetched"])[1, 4]
    # all shielded: nothing is loaded, nothing changes
    s2, f = D.plan_prefetch(s, lay, LRU(), 1, jnp.array([4, 5, 6]), jnp.array([True] * 3),
                            (0, jnp.array([1, 2, 5]), jnp.array([True, True, True])))
    assert int(f.count) == 0 and (np.asarray(f.slots) == 3).all()
    assert _owner(s2, lay) == [(0, 1), (0, 2), (0, 5)] and _counters(s2)["prefetch_issued"] == 0
    assert not np.asarray(s2["prefetched"]).any()


def test_fixed_width_prefetch_loads_the_first_missing_of_the_ranking():
    """prefetch_width P: the first P experts of the ranking that are not resident, a Fetches of
    size P whatever the count; slots left without an expert count as prefetch_idle."""
    lay = D.Layout(2, 8, 4)
    pol = LRU(prefetch_width=2)
    s = _run(D.init_state(lay), lay, LRU(), 1, [[[3, 6]]])  # (1, 3), (1, 6): slots 0, 1
    rank = jnp.array([6, 3, 0, 7, 1, 2, 4, 5])  # 6 and 3 are resident: 0 and 7 are loaded
    s1, f = D.plan_prefetch(s, lay, pol, 1, rank, jnp.ones(8, bool), (0, jnp.array([0]), jnp.array([False])))
    assert f.experts.shape == (2,) and int(f.count) == 2
    assert np.asarray(f.experts).tolist() == [0, 7] and np.asarray(f.slots).tolist() == [2, 3]
    c = _counters(s1)
    assert (c["prefetch_issued"], c["prefetch_idle"]) == (2, 0)
    # one free slot is left after layer 0 shields 3 of the 4: one expert loaded, one slot idle
    s = _run(D.init_state(lay), lay, LRU(), 0, [[[1, 2, 5]]])
    s2, f = D.plan_prefetch(s, lay, pol, 1, rank, jnp.ones(8, bool),
                            (0, jnp.array([1, 2, 5]), jnp.array([True] * 3)))
    assert int(f.count) == 1 and int(f.experts[0]) == 6 and f.experts.shape == (2,)
    c = _counters(s2)
    assert (c["prefetch_issued"], c["prefetch_idle"]) == (1, 1)
    assert _owner(s2, lay) == [(0, 1), (0, 2), (0, 5), (1, 6)]
    _check_consistent(s2, lay)


def test_ondemand_release_frees_slots():
    pol = OnDemand()
    assert pol.reuse is False
    lay = D.Layout(2, 8, 4)
    s = D.init_state(lay)
    s, fetched, slots, needed = _decode(s, lay, pol, 1, [[3, 5]])
    assert fetched == [3, 5] and slots == [0, 1]
    s = D.release(s, lay, 1, *needed)
    assert _owner(s, lay) == [None] * 4 and (np.asarray(s["table"]) == -1).all()
    s, fetched, slots, needed = _decode(s, lay, pol, 1, [[5, 3]])  # fetched again, no hit
    assert fetched == [5, 3] and slots == [0, 1]
    c = _counters(s)
    assert (c["hits"], c["unique"], c["fetched"]) == (0, 4, 4)
    # release touches only the given layer's experts
    s = _run(s, lay, pol, 0, [[[5]]])  # (0, 5) into slot 2
    s = D.release(s, lay, 1, *needed)
    assert _owner(s, lay) == [None, None, (0, 5), None]
    _check_consistent(s, lay)


def test_per_layer_layout_keeps_each_layer_in_its_range():
    lay = D.Layout(2, 8, 4, per_layer=True)
    assert lay.share == 2 and lay.range(0) == (0, 2) and lay.range(1) == (2, 4)
    s = _run(D.init_state(lay), lay, LRU(), 0, [[[1, 2]]])  # slots 0, 1
    s, fetched, slots, _ = _decode(s, lay, LRU(), 1, [[1]])
    assert slots == [2]  # layer 1's first free slot, not layer 0's
    # slot 3 is free but belongs to layer 1: layer 0 evicts its own LRU (1, slot 0)
    s, fetched, slots, _ = _decode(s, lay, LRU(), 0, [[5]])
    assert fetched == [5] and slots == [0]
    assert _owner(s, lay) == [(0, 5), (0, 2), (1, 1), None]
    # (1, 1) (tick 3) is older than (0, 5) (tick 4), yet layer 0 never evicts it
    s, fetched, slots, _ = _decode(s, lay, LRU(), 0, [[6, 7]])
    assert slots == [0, 1] and _owner(s, lay) == [(0, 6), (0, 7), (1, 1), None]
    s, _, slots, _ = _decode(s, lay, LRU(), 1, [[2, 3]])
    assert slots == [2, 3]  # the free slot 3 and (1, 1)'s slot 2, ascending
    assert _owner(s, lay)[2:] == [(1, 2), (1, 3)]
    _check_consistent(s, lay)


def test_prefill_group_is_shielded_and_counted_apart():
    lay = D.Layout(2, 8, 3)
    s = _run(D.init_state(lay), lay, LRU(), 1, [[[0]]])  # (1, 0) slot 0, the oldest
    s = _run(s, lay, LRU(), 0, [[[1, 2]]])  # slots 1, 2
    before = _counters(s)
    s, f = D.plan_prefill_group(s, lay, LRU(), 1, jnp.array([0, 4, 6]), jnp.array([True, True, False]))
    # 0 is resident and in the group: shielded though the oldest; 4 takes (0, 1)'s slot
    assert int(f.count) == 1 and int(f.experts[0]) == 4 and int(f.slots[0]) == 1
    assert _owner(s, lay) == [(1, 0), (1, 4), (0, 2)]
    c = _counters(s)
    assert c["prefill_fetched"] == 1 and {k: v for k, v in c.items() if k != "prefill_fetched"} == {
        k: v for k, v in before.items() if k != "prefill_fetched"}
    assert np.asarray(s["last_use"])[1, [0, 4, 6]].tolist() == [4, 5, 0]  # the group is used; 6 not ok
    # a group of missing experts takes the free slots, lowest first
    lay = D.Layout(1, 8, 3)
    s = D.assign(D.init_state(lay), lay, 0, jnp.array([5]), jnp.array([1]), 1)
    s, f = D.plan_prefill_group(s, lay, LRU(), 0, jnp.array([1, 2, 3]), jnp.array([True, True, False]))
    assert np.asarray(f.experts)[:2].tolist() == [1, 2] and np.asarray(f.slots)[:2].tolist() == [0, 2]
    assert _counters(s)["prefill_fetched"] == 2 and _counters(s)["fetched"] == 0


def test_prefill_groups_and_needed_sorted():
    assert D.prefill_groups(D.Layout(2, 8, 5)) == (5, 2)
    assert D.prefill_groups(D.Layout(2, 8, 6, per_layer=True)) == (3, 3)
    assert D.prefill_groups(D.Layout(1, 8, 20)) == (8, 1)
    ids, n = D.needed_sorted(jnp.array([[5, 1], [1, 3], [7, 6]]), jnp.array([True, True, False]), 8)
    assert int(n) == 3 and np.asarray(ids)[:3].tolist() == [1, 3, 5]


def test_unique_first_and_compact():
    uniq, ok, n = D.unique_first(jnp.array([3, 1, 3, 2, 1]))
    assert np.asarray(uniq).tolist() == [3, 1, 2, 0, 0] and np.asarray(ok).tolist() == [True] * 3 + [False] * 2
    assert int(n) == 3
    # invalid entries are skipped, and do not hide a later valid copy of the same id
    uniq, ok, n = D.unique_first(jnp.array([5, 3, 5, 7, 3]), jnp.array([False, True, True, True, True]), size=4)
    assert np.asarray(uniq).tolist() == [3, 5, 7, 0] and np.asarray(ok).tolist() == [True, True, True, False]
    assert int(n) == 3
    vals, n = D.compact(jnp.array([10, 11, 12, 13]), jnp.array([False, True, False, True]))
    assert np.asarray(vals).tolist() == [11, 13, 10, 12] and int(n) == 2


def test_join_loads_the_prefetches_first_so_a_later_miss_in_their_slot_stays():
    """The fused engine copies the paper's prefetches for a layer in that layer's own fetch
    loop, ahead of its misses (D.join). A miss may evict a wrong prefetch it does not use and
    take its slot: loaded after it, the miss is what the slot holds, as the state says."""
    layout, policy = D.Layout(2, 4, 2), LRU()
    state = D.init_state(layout)
    state, _, slots, needed = _decode(state, layout, policy, 0, [[0]])  # layer 0: expert 0 -> slot 0
    assert slots == [0]
    state, pf = D.plan_prefetch(state, layout, policy, 1, jnp.array([1], jnp.int32), jnp.array([True]), (0, *needed))
    state, miss, _ = D.plan_decode(state, layout, policy, 1, jnp.array([[2]], jnp.int32))  # wrong prefetch
    both = D.join(pf, miss)
    n = int(both.count)
    assert (n, np.asarray(both.experts)[:n].tolist(), np.asarray(both.slots)[:n].tolist()) == (2, [1, 2], [1, 1])
    assert _owner(state, layout) == [(0, 0), (1, 2)]
    # a prefetch the layer dropped (keep False) is not loaded
    both = D.join(pf, miss, jnp.array([False]))
    assert int(both.count) == 1 and int(both.experts[0]) == 2 and int(both.slots[0]) == 1
    # no prefetch: the misses alone
    none = D.Fetches(jnp.zeros(3, jnp.int32), jnp.full(3, 2, jnp.int32), jnp.int32(0))
    both = D.join(none, miss)
    assert int(both.count) == 1 and int(both.experts[0]) == 2 and int(both.slots[0]) == 1


def test_dropped_prefetch_costs_nothing_and_a_used_one_is_pending():
    """Queued prefetches (the real link's schedule): once the layer's experts are known, an
    unused one is dropped unloaded and its slot holds again the expert it had evicted (never
    overwritten); a used one stays, pending to the plan: no hit, not fetched again."""
    layout, policy = D.Layout(2, 4, 2), LRU()
    state = D.init_state(layout)
    state = _decode(state, layout, policy, 0, [[0]])[0]  # slot 0
    state = _decode(state, layout, policy, 1, [[3]])[0]  # slot 1: the pool is full
    state, _, _, needed = _decode(state, layout, policy, 0, [[0]])  # a hit
    before = _counters(state)
    state, pf = D.plan_prefetch(state, layout, policy, 1, jnp.array([1, 2], jnp.int32), jnp.array([True, True]),
                                (0, *needed))
    assert int(pf.count) == 1 and int(pf.slots[0]) == 1 and int(pf.previous[0]) == 1 * 4 + 3  # evicted (1, 3)
    assert _owner(state, layout) == [(0, 0), (1, 1)]
    dropped, keep = D.drop_prefetches(state, layout, 1, jnp.array([[3]], jnp.int32), pf)
    assert not np.asarray(keep).any() and _owner(dropped, layout) == [(0, 0), (1, 3)]
    _check_consistent(dropped, layout)
    c = _counters(dropped)
    assert (c["prefetch_dropped"], c["prefetch_issued"], c["fetched"]) == (1, before["prefetch_issued"], before["fetched"])
    assert not np.asarray(dropped["prefetched"]).any()
    dropped, _, _, _ = _decode(dropped, layout, policy, 1, [[3]])
    assert _counters(dropped)["hits"] == before["hits"] + 1  # (1, 3) is back: a hit
    # used: kept, loaded first, pending to the plan (no hit, not fetched again), counted as used
    kept_state, keep = D.drop_prefetches(state, layout, 1, jnp.array([[1]], jnp.int32), pf)
    assert np.asarray(keep).tolist() == [True, False]  # the second entry is past the count
    kept_state, f, _ = D.plan_decode(kept_state, layout, policy, 1, jnp.array([[1]], jnp.int32),
                                     D.loading(pf, layout.experts, keep))
    c = _counters(kept_state)
    assert int(f.count) == 0 and c["hits"] == before["hits"] and c["prefetch_used"] == 1
    assert c["fetched"] == before["fetched"] + 1 and c["prefetch_dropped"] == 0


def test_a_prefetch_that_evicted_an_expert_the_layer_uses_is_dropped():
    """A queued prefetch the layer uses, but whose slot held another expert the layer uses:
    loading it would send that expert over the link again. Dropped instead, the evicted
    expert is a hit and the prefetched one a miss of the plan: one load instead of two."""
    layout, policy = D.Layout(2, 4, 2), LRU()
    state = D.init_state(layout)
    state = _decode(state, layout, policy, 0, [[0]])[0]  # slot 0
    state = _decode(state, layout, policy, 1, [[3]])[0]  # slot 1: the pool is full
    state, _, _, needed = _decode(state, layout, policy, 0, [[0]])
    before = _counters(state)
    state, pf = D.plan_prefetch(state, layout, policy, 1, jnp.array([1], jnp.int32), jnp.array([True]), (0, *needed))
    assert int(pf.count) == 1 and int(pf.previous[0]) == 1 * 4 + 3  # (1, 1) evicts (1, 3)
    experts = jnp.array([[1, 3]], jnp.int32)  # the layer uses both
    state, keep = D.drop_prefetches(state, layout, 1, experts, pf)
    assert not np.asarray(keep).any() and _owner(state, layout) == [(0, 0), (1, 3)]
    state, miss, _ = D.plan_decode(state, layout, policy, 1, experts, D.loading(pf, layout.experts, keep))
    loads = D.join(pf, miss, keep)
    n = int(loads.count)
    assert (n, np.asarray(loads.experts)[:n].tolist(), np.asarray(loads.slots)[:n].tolist()) == (1, [1], [0])
    _check_consistent(state, layout)
    c = _counters(state)
    assert c["hits"] == before["hits"] + 1 and c["fetched"] == before["fetched"] + 1 and c["prefetch_dropped"] == 1
    assert c["prefetch_issued"] == before["prefetch_issued"]


def test_queued_prefetches_shield_nothing_and_started_ones_the_running_layer():
    """Prefetches that start at once (emulated link, fixed width) may not evict the experts of
    the layer whose reads they may overlap; queued ones are copied after those reads, so they
    choose their victims as any miss would."""
    layout, policy = D.Layout(2, 4, 2), LRU()
    state = D.init_state(layout)
    state = _decode(state, layout, policy, 0, [[0]])[0]  # slot 0
    state = _decode(state, layout, policy, 1, [[3]])[0]  # slot 1: the pool is full
    state, _, _, needed = _decode(state, layout, policy, 0, [[0]])
    predicted, valid = jnp.array([1, 2], jnp.int32), jnp.array([True, True])
    now, pf = D.plan_prefetch(state, layout, policy, 1, predicted, valid, D.prefetch_shield(0, needed, False))
    assert int(pf.count) == 1 and _owner(now, layout) == [(0, 0), (1, 1)]
    queued, pf = D.plan_prefetch(state, layout, policy, 1, predicted, valid, D.prefetch_shield(0, needed, True))
    assert int(pf.count) == 2 and np.asarray(pf.previous).tolist() == [0, 1 * 4 + 3]  # slots in ascending order
    assert _owner(queued, layout) == [(1, 1), (1, 2)]


@dataclass(frozen=True)
class _Router:  # what substitute_step reads of a config
    router: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0


def test_an_expert_a_queued_prefetch_evicted_is_still_a_substitute():
    """Until a queued prefetch loads, the expert it evicted is still in the pool: it is a
    substitute like any resident expert, and using it drops the prefetch (one load, not two)."""
    layout, policy = D.Layout(2, 4, 2), make_policy("smoe", alpha=0.5)
    state = D.init_state(layout)
    state = _decode(state, layout, policy, 0, [[0]])[0]  # slot 0
    state = _decode(state, layout, policy, 1, [[3]])[0]  # slot 1: the pool is full
    state, _, _, needed = _decode(state, layout, policy, 0, [[0]])
    state, pf = D.plan_prefetch(state, layout, policy, 1, jnp.array([1], jnp.int32), jnp.array([True]), (0, *needed))
    assert int(pf.previous[0]) == 1 * 4 + 3 and np.asarray(D.evicted(pf, 1, 4)).tolist() == [0, 0, 0, 1]
    # layer 1: expert 1 top-score (the prefetch), 2 low-score and missing; 3 in its window
    probs = jnp.array([[0.08, 0.5, 0.22, 0.2]], jnp.float32)
    idx, weights = jnp.array([[1, 2]], jnp.int32), jnp.array([[0.7, 0.3]], jnp.float32)
    pending = D.loading(pf, 4)
    args = (_Router(), policy, state, jnp.int32(1), probs, weights, idx, None, pending)
    assert np.asarray(D.substitute_step(*args)[2]).tolist() == [[1, 2]]  # (1, 3) taken for gone: no substitute
    state, _, experts, _ = D.substitute_step(*args, pf)
    assert np.asarray(experts).tolist() == [[1, 3]]
    state, keep = D.drop_prefetches(state, layout, 1, experts, pf)
    assert not np.asarray(keep).any() and _owner(state, layout) == [(0, 0), (1, 3)]
    before = _counters(state)
    state, miss, _ = D.plan_decode(state, layout, policy, 1, experts, D.loading(pf, 4, keep))
    loads = D.join(pf, miss, keep)
    assert int(loads.count) == 1 and int(loads.experts[0]) == 1
    assert _counters(state)["hits"] == before["hits"] + 1 and _counters(state)["substituted"] == 1


def test_compact_and_ascending_count_as_a_stable_sort_would():
    """compact and ascending work by counting, not sorting: the same results as a stable
    argsort on random inputs (repeated values included: ascending's padding repeats)."""
    rng = np.random.default_rng(0)
    for U in (1, 5, 12, 32):
        for _ in range(20):
            values = rng.integers(0, 40, U).astype(np.int32)
            mask = rng.random(U) < 0.5
            got, n = D.compact(jnp.asarray(values), jnp.asarray(mask))
            want = values[np.argsort(np.where(mask, 0, 1), kind="stable")]
            assert np.asarray(got).tolist() == want.tolist() and int(n) == mask.sum()
            v = np.where(rng.random(U) < 0.3, 48, rng.permutation(48)[:U]).astype(np.int32)
            assert np.asarray(D.ascending(jnp.asarray(v))).tolist() == np.sort(v).tolist()


def test_registry_and_ondemand_flags():
    assert make_policy("ondemand").reuse is False and isinstance(make_policy("ondemand"), OnDemand)
    assert make_policy("lru-prefetch").prefetch == "next-layer-gate"
    assert make_policy("smoe").prefetch == "top-score" and make_policy("smoe").substitute
    assert make_policy("score", score_window=4).needs_probs and make_policy("score", score_window=4).score_window == 4
    assert make_policy("lru") == LRU() and make_policy("lru") != LFU()  # static jit arguments
    with pytest.raises(KeyError):
        make_policy("nope")


def _transfer(t, nbytes=1000):
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
