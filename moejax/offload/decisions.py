"""One definition of every policy's decisions: which experts a layer hits, fetches, evicts and
prefetches, as pure jnp functions on a `CacheState`.

The fused engine runs them inside its one program per decode step; the stepwise engine and
trace replay run the same functions through jit and carry the plans out on the host, so the
three drivers cannot drift apart (tests hold them to the same counts).

CacheState (a dict of arrays; L = MoE layers, E = experts per layer, S = pool slots):
  table [L, E]      slot holding (layer, expert), -1 if not on the device
  owner [S]         layer * E + expert held by each slot, -1 if free
  last_use [L, E]   clock of the last use (LRU), count [L, E] uses (LFU)
  hist [L, W, E]    router probabilities of the last W observed decode steps (score eviction),
  hist_n [L]        steps observed per layer
  prefetched [L, E] loaded by a prefetch and not used since
  clock             one tick per expert use
  counters          hits, unique, routed, substituted, skipped (dropped by --substitute skip),
                    fetched (decode transfers, prefetches included), prefill_fetched,
                    prefetch_issued, prefetch_used, prefetch_idle (fixed-width prefetch slots
                    left without an expert: the fused engine copies a block for nothing),
                    prefetch_dropped (queued prefetches dropped unloaded: `drop_prefetches`)
Slots are shared by all MoE layers (the paper's global cache) or split evenly per layer
(`Layout.ranges`). A plan fills slots in this order: free slots (lowest first), then the
policy's eviction order (`Policy.eviction_keys`, ties to the lowest slot); experts the layer
uses are shielded. Fetches take their slots in ascending slot order, experts in first-use order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

COUNTERS = ("hits", "unique", "routed", "substituted", "skipped", "fetched", "prefill_fetched", "prefetch_issued",
            "prefetch_used", "prefetch_idle", "prefetch_dropped")


@dataclass(frozen=True)
class Layout:
    """Static shape of the cache: MoE layers, experts per layer, pool slots and the slot range
    each MoE layer may use."""

    layers: int
    experts: int
    slots: int
    per_layer: bool = False

    def check(self, per_step: int) -> None:
        """Every layer's slot range must hold one step's experts (per_step = min(B * k, E))."""
        if self.share < per_step:
            from moejax.errors import MoejaxError

            raise MoejaxError(f"a pool split per layer gives each of {self.layers} MoE layers {self.share} slots; "
                              f"one step needs {per_step}: raise the budget or share the pool")

    @property
    def share(self) -> int:
        """Slots one MoE layer may use."""
        return self.slots // self.layers if self.per_layer else self.slots

    def range(self, m) -> tuple:
        """[lo, hi) slots of MoE layer m (m may be traced)."""
        if not self.per_layer:
            return 0, self.slots
        return m * self.share, (m + 1) * self.share


def init_state(layout: Layout, score_window: int = 16, full: bool = False) -> dict:
    """An empty pool, or (full) one holding every expert at slot layer * E + expert."""
    L, E, S = layout.layers, layout.experts, layout.slots
    if full:
        assert S >= L * E
        owner = np.full(S, -1, np.int32)
        owner[: L * E] = np.arange(L * E)
        table = np.arange(L * E, dtype=np.int32).reshape(L, E)
    else:
        owner, table = np.full(S, -1, np.int32), np.full((L, E), -1, np.int32)
    state = {"table": table, "owner": owner, "last_use": np.zeros((L, E), np.int32),
             "count": np.zeros((L, E), np.int32), "hist": np.zeros((L, score_window, E), np.float32),
             "hist_n": np.zeros(L, np.int32), "prefetched": np.zeros((L, E), bool), "clock": np.int32(0),
             "counters": {c: np.int32(0) for c in COUNTERS}}
    return jax.tree.map(jnp.asarray, state)


def _count(state, name, n):
    return {**state, "counters": {**state["counters"], name: state["counters"][name] + jnp.asarray(n, jnp.int32)}}


def member(ids, ok, size: int):
    """bool [size]: which of 0..size-1 are among the ok entries of ids (any shape)."""
    ids, ok = jnp.asarray(ids).reshape(-1), jnp.broadcast_to(ok, jnp.shape(ids)).reshape(-1)
    return ((ids[:, None] == jnp.arange(size)) & ok[:, None]).any(axis=0)


def put(x, at, values, ok, add: bool = False):
    """x with x.flat[at[i]] = values[i] (add: += values[i]) for the ok i, whose `at` are distinct.

    A compare and select instead of a scatter: these arrays are tiny, and on a GPU each scatter
    is a kernel of its own (often with a copy of x), while selects fuse with their neighbours.
    values may be a scalar."""
    flat, at = x.reshape(-1), jnp.asarray(at).reshape(-1)
    match = (at[:, None] == jnp.arange(flat.shape[0])) & jnp.broadcast_to(ok, at.shape).reshape(-1)[:, None]
    vals = jnp.broadcast_to(jnp.asarray(values, flat.dtype), at.shape).reshape(-1)[:, None]  # [n, 1]
    if add:
        return (flat + jnp.where(match, vals, 0).sum(axis=0, dtype=flat.dtype)).reshape(x.shape)
    new = jnp.where(match, vals, jnp.zeros((), flat.dtype))
    new = new.any(axis=0) if flat.dtype == jnp.bool_ else new.sum(axis=0, dtype=flat.dtype)  # one match at most
    return jnp.where(match.any(axis=0), new, flat).reshape(x.shape)


def unique_first(ids, valid=None, size: int | None = None):
    """ids [M] -> (unique ids [U] in first-use order, ok [U], count). U = size or M; entries
    past the count are 0 and not ok."""
    M = ids.shape[0]
    U = size or M
    valid = jnp.ones(M, bool) if valid is None else valid
    same = (ids[:, None] == ids[None, :]) & valid[None, :]  # [M, M]
    first = valid & ~jnp.tril(same, -1).any(axis=1)
    uniq, n = compact(ids, first)
    ok = jnp.arange(U) < n
    return jnp.where(ok, uniq[:U], 0), ok, n


def compact(values, mask):
    """values [U], mask [U] -> (values with the masked ones first, in order; their count): a
    stable partition, by counting instead of sorting ([U, U] compares and sums, which fuse;
    a sort is a kernel, or on the CPU a library call, of its own)."""
    U = values.shape[0]
    m = mask.astype(jnp.int32)
    j = jnp.arange(U)
    before = jnp.sum(jnp.where(j[None, :] < j[:, None], m[None, :], 0), axis=1)  # masked entries before each
    n = m.sum()
    return _to_places(values, jnp.where(mask, before, n + j - before)), n


def _owner_mask(state, layout: Layout, m: int, experts, ok):
    """bool [S]: slots holding one of `experts` (ok entries) of MoE layer m."""
    want = member(experts, ok, layout.experts)
    own = state["owner"]
    return (own >= 0) & (own // layout.experts == m) & want[jnp.maximum(own, 0) % layout.experts]


def choose_slots(state, layout: Layout, policy, m: int, n, shield, size: int):
    """[size] slots for n new experts of MoE layer m (ascending; entries past n = slots, i.e.
    none): free slots first, then the policy's eviction order; shielded slots never."""
    S, E = layout.slots, layout.experts
    lo, hi = layout.range(m)
    s = jnp.arange(S)
    own = state["owner"]
    ol, oe = jnp.maximum(own, 0) // E, jnp.maximum(own, 0) % E
    keys = [jnp.where(own >= 0, k[ol, oe], 0) for k in policy.eviction_keys(state)]
    cls = jnp.where((s < lo) | (s >= hi) | shield, 2, jnp.where(own >= 0, 1, 0))
    order = jnp.lexsort((s, *reversed(keys), cls))[:size]
    order = jnp.pad(order, (0, size - order.shape[0]), constant_values=S)  # more asked than slots: none
    return ascending(jnp.where(jnp.arange(size) < n, order, S)).astype(jnp.int32)


def ascending(v):
    """v [U] sorted, by counting ([U, U] compares, which fuse, instead of a sort kernel)."""
    j = jnp.arange(v.shape[0])
    before = (v[None, :] < v[:, None]) | ((v[None, :] == v[:, None]) & (j[None, :] < j[:, None]))
    return _to_places(v, before.sum(axis=1))


def _to_places(values, place):
    """values [U] moved to their places [U] (a permutation of 0..U-1), by a one-hot sum."""
    j = jnp.arange(values.shape[0])
    return jnp.sum(jnp.where(place[None, :] == j[:, None], values[None, :], 0), axis=1).astype(values.dtype)


def room(state, layout: Layout, m: int, shield):
    """Slots MoE layer m may fill without touching shielded ones."""
    lo, hi = layout.range(m)
    s = jnp.arange(layout.slots)
    return jnp.sum((s >= lo) & (s < hi) & ~shield)


def assign(state, layout: Layout, m: int, experts, slots, n):
    """Place experts[:n] of MoE layer m into slots[:n], evicting what those slots held."""
    S, E = layout.slots, layout.experts
    ok = jnp.arange(experts.shape[0]) < n
    slots = jnp.where(ok, slots, S)
    old = jnp.where(ok, state["owner"].at[slots].get(mode="fill", fill_value=-1), -1)  # layer * E + expert
    table = put(state["table"], old, -1, old >= 0)
    prefetched = put(state["prefetched"], old, False, old >= 0)
    table = put(table, m * E + experts, slots, ok)
    owner = put(state["owner"], slots, m * E + experts, ok)
    return {**state, "table": table, "owner": owner, "prefetched": prefetched}


def release(state, layout: Layout, m: int, experts, ok):
    """Evict the ok experts of MoE layer m (on-demand loading keeps nothing)."""
    E = layout.experts
    slots = state["table"].at[m, jnp.where(ok, experts, E)].get(mode="fill", fill_value=-1)
    owner = put(state["owner"], slots, -1, slots >= 0)
    return {**state, "owner": owner, "table": put(state["table"], m * E + experts, -1, ok)}


def touch(state, layout: Layout, m: int, experts, ok, n):
    """One use of each ok expert of layer m, in order: the clock ticks once per expert."""
    at = m * layout.experts + experts
    ticks = state["clock"] + 1 + jnp.arange(experts.shape[0], dtype=jnp.int32)
    return {**state, "last_use": put(state["last_use"], at, ticks, ok),
            "count": put(state["count"], at, 1, ok, add=True), "clock": state["clock"] + n.astype(jnp.int32)}


def observe(state, m: int, probs):
    """Score eviction's window: the batch mean of this decode step's probabilities [N, E]."""
    L, W, _ = state["hist"].shape
    row = (jnp.arange(L)[:, None, None] == m) & (jnp.arange(W)[None, :, None] == state["hist_n"][m] % W)
    hist = jnp.where(row, jnp.mean(probs.astype(jnp.float32), axis=0), state["hist"])  # a select, not a scatter
    return {**state, "hist": hist, "hist_n": state["hist_n"] + (jnp.arange(state["hist_n"].shape[0]) == m)}


@dataclass
class Fetches:
    """What to load: experts[:count] of one layer into slots[:count] (arrays of a fixed size);
    for prefetches, previous: what each slot held before (layer * E + expert, -1 if free)."""

    experts: jax.Array
    slots: jax.Array
    count: jax.Array
    previous: jax.Array | None = None


jax.tree_util.register_dataclass(Fetches, data_fields=["experts", "slots", "count", "previous"], meta_fields=[])


def join(first: Fetches, then: Fetches, keep=None) -> Fetches:
    """One list of loads: first's (those keep [M] marks, if given), then then's (of the same host
    stack; fixed size the sum of both). A later entry may reuse an earlier one's slot (a layer's
    miss evicting an expert the previous layer prefetched for it and it does not use): it is
    loaded later, so it stays."""
    ok = jnp.concatenate([_valid(first, keep), jnp.arange(then.experts.shape[0]) < then.count])
    experts, n = compact(jnp.concatenate([first.experts, then.experts]), ok)
    slots, _ = compact(jnp.concatenate([first.slots, then.slots]), ok)
    return Fetches(experts, slots, n)


def substitute_layer(state, policy, m, probs, idx, similarity=None, available=None):
    """Decode, docs/method.md 2: substitution of low-score experts against what MoE layer m holds
    (available [E]; default: every expert in its pool). probs [N, E] importance (moe.importance),
    idx [N, k] the router's choice -> (state, experts [N, k] to compute, substituted [N, k]).
    The skip mode drops them instead: the mask is of the dropped experts, counted as skipped."""
    from moejax.offload.importance import substitute

    if not (policy.substitute and policy.alpha > 0):
        return state, idx, jnp.zeros(idx.shape, bool)
    if available is None:
        available = state["table"][m] >= 0
    experts, changed = substitute(probs, idx, policy.alpha, available, policy.mode, similarity)
    return _count(state, "skipped" if policy.mode == "skip" else "substituted", changed.sum()), experts, changed


def reweigh(cfg, scores, experts, changed, weights, mode: str = "window"):
    """Gate weights [N, k] of the computed experts: the router's own for rows nothing was
    substituted in (bit for bit), else each expert's own score (importance.gate_weights). Skip
    mode: the dropped experts weigh 0, the kept ones carry the rest (importance.skip_weights)."""
    from moejax.offload.importance import gate_weights, skip_weights

    if mode == "skip":
        return skip_weights(weights, changed)
    new = gate_weights(scores, experts, cfg.norm_topk_prob, cfg.routed_scaling_factor)
    return jnp.where(changed.any(axis=-1, keepdims=True), new, weights)


def plan_decode(state, layout: Layout, policy, m: int, experts, pending=None):
    """A decode step's layer m computes experts [N, k] (after substitution). pending [E]:
    experts whose transfer is in flight (the stepwise engine's emulated link), neither hits
    nor fetched again. -> (state after evictions, placements and uses; Fetches; needed
    (unique experts [U], ok [U]))."""
    E = layout.experts
    flat = experts.reshape(-1)
    U = min(flat.shape[0], E)
    uniq, ok, n = unique_first(flat, size=U)
    resident = state["table"][m] >= 0  # [E]
    landed = resident if pending is None else resident & ~pending
    miss = ok & ~resident[uniq]
    fetch, nf = compact(uniq, miss)
    shield = _owner_mask(state, layout, m, uniq, ok)
    slots = choose_slots(state, layout, policy, m, nf, shield, U)
    used_prefetch = jnp.sum(ok & state["prefetched"][m][uniq])
    state = {**state, "prefetched": put(state["prefetched"], m * E + uniq, False, ok)}
    state = assign(state, layout, m, fetch, slots, nf)
    state = touch(state, layout, m, uniq, ok, n)
    for name, v in (("hits", jnp.sum(ok & landed[uniq])), ("unique", n), ("fetched", nf),
                    ("routed", flat.shape[0]), ("prefetch_used", used_prefetch)):
        state = _count(state, name, v)
    return state, Fetches(fetch, slots, nf), (uniq, ok)


def plan_prefetch(state, layout: Layout, policy, m: int, predicted, valid, shield_experts, pending=None):
    """Speculative loads for MoE layer m: the unique predicted experts [M] (valid entries,
    in order) not on the device nor on the way, as many as fit without evicting the
    shielded ones ((layer, uniq [U], ok [U]): `prefetch_shield`) -> (state, Fetches).

    policy.prefetch_width P > 0: predicted is a ranking of all E experts (`fused.predict_next`),
    and the first P of them that are missing are loaded; Fetches then has the fixed size P,
    and the slots left without an expert (fewer than P missing, or no room) count as
    prefetch_idle."""
    E, P = layout.experts, policy.prefetch_width
    if P:
        uniq, ok = predicted, valid  # a ranking: unique already
    else:
        uniq, ok, _ = unique_first(predicted, valid, size=min(predicted.shape[0], E))
    resident = state["table"][m] >= 0
    if pending is not None:
        resident = resident | pending
    want, n_want = compact(uniq, ok & ~resident[uniq])
    shield = _owner_mask(state, layout, *shield_experts)
    nf = jnp.minimum(n_want, room(state, layout, m, shield))
    if P:
        want, nf = want[:P], jnp.minimum(nf, P)
        state = _count(state, "prefetch_idle", P - nf)
    slots = choose_slots(state, layout, policy, m, nf, shield, want.shape[0])
    previous = state["owner"].at[slots].get(mode="fill", fill_value=-1)  # slots past nf are S: -1
    state = assign(state, layout, m, want, slots, nf)
    state = {**state, "prefetched": put(state["prefetched"], m * E + want, True, jnp.arange(want.shape[0]) < nf)}
    state = _count(_count(state, "prefetch_issued", nf), "fetched", nf)
    return state, Fetches(want, slots, nf, previous)


def prefetch_shield(m, needed, queued: bool) -> tuple:
    """What prefetches planned after MoE layer m's compute may not evict (plan_prefetch's
    shield_experts): m's experts (needed: uniq [U], ok [U]) when the copies start at once and
    may overlap their reads (the paper's rule), nothing when they are queued for the next
    layer's fetch loop, which runs after those reads: its victims are then chosen as a miss of
    the next layer would choose them."""
    uniq, ok = needed
    return m, uniq, ok & (not queued)


def _valid(fetches: Fetches, keep=None):
    """bool [M]: the entries of a Fetches within its count (and marked by keep [M], if given)."""
    ok = jnp.arange(fetches.experts.shape[0]) < fetches.count
    return ok if keep is None else ok & keep


def loading(fetches: Fetches, E: int, keep=None):
    """bool [E]: the experts of a Fetches (those keep marks; on the way: `pending` to the plans)."""
    return member(fetches.experts, _valid(fetches, keep), E)


def _previous(fetches: Fetches):
    """[M] layer * E + expert that each entry's slot held before it (-1: free, or not known)."""
    if fetches.previous is None:
        return jnp.full(fetches.experts.shape[0], -1, jnp.int32)
    return fetches.previous


def _evicts(queued: Fetches, m: int, E: int):
    """-> (bool [M]: the entries within the count that evicted an expert of MoE layer m, the
    expert ids [M] they evicted)."""
    prev = _previous(queued)
    return _valid(queued) & (prev >= 0) & (prev // E == m), jnp.maximum(prev, 0) % E


def evicted(queued: Fetches, m: int, E: int):
    """bool [E]: the experts of MoE layer m that prefetches queued (not started) evicted. Their
    blocks are still in the pool: they may be used (as the router's choice or as substitutes),
    which drops the prefetch that evicted them (`drop_prefetches`)."""
    here, ids = _evicts(queued, m, E)
    return member(ids, here, E)


def drop_prefetches(state, layout: Layout, m: int, experts, queued: Fetches):
    """docs/method.md 4: once MoE layer m's real scores are known (experts [N, k] it computes,
    after substitution), the prefetches queued for it whose loads have not started (queued:
    their Fetches) and that it does not use are dropped: released (their slots free), never
    loaded, so no longer counted as fetched nor issued. A dropped prefetch's slot still holds
    the expert the prefetch evicted (queued.previous; its block was never overwritten): that
    expert is resident again, so a wrong prediction costs nothing. A used prefetch that
    evicted an expert this layer also uses (routed to, or as a substitute: `evicted`) is
    dropped too: loading it would cost that expert a second transfer, while dropped it is one
    miss of the plan, which shields the layer's experts (one load instead of two).
    -> (state, keep [M]: the queued entries still to load, in their order: pending to the plan,
    neither hits nor fetched again; `join` and `loading` take it)."""
    E, M = layout.experts, queued.experts.shape[0]
    ok, prev = _valid(queued), _previous(queued)
    used = member(experts, True, E)  # [E]
    here, victims = _evicts(queued, m, E)
    drop = ok & (~used[queued.experts] | (here & used[victims]))
    back = drop & (prev >= 0) & (state["table"].reshape(-1)[jnp.maximum(prev, 0)] < 0)
    mine = m * E + queued.experts
    # one write each: the dropped experts leave their slots, which hold their previous experts again
    table = put(state["table"], jnp.concatenate([mine, prev]), jnp.concatenate([jnp.full(M, -1), queued.slots]),
                jnp.concatenate([drop, back]))
    state = {**state, "table": table, "owner": put(state["owner"], queued.slots, jnp.where(back, prev, -1), drop),
             "prefetched": put(state["prefetched"], mine, False, drop)}
    n = drop.sum()
    for name, v in (("prefetch_dropped", n), ("fetched", -n), ("prefetch_issued", -n)):
        state = _count(state, name, v)
    return state, ok & ~drop


def plan_prefill_group(state, layout: Layout, policy, m: int, group, ok):
    """Prefill: a group of experts [G] (ok entries, ascending ids) of layer m computed
    together; the group is shielded, missing ones are fetched. -> (state, Fetches)."""
    resident = state["table"][m] >= 0
    fetch, nf = compact(group, ok & ~resident[group])
    shield = _owner_mask(state, layout, m, group, ok)
    slots = choose_slots(state, layout, policy, m, nf, shield, group.shape[0])
    state = assign(state, layout, m, fetch, slots, nf)
    state = touch(state, layout, m, group, ok, ok.sum())
    return _count(state, "prefill_fetched", nf), Fetches(fetch, slots, nf)


def prefill_groups(layout: Layout) -> tuple[int, int]:
    """(group size, number of groups) for the prefill of a MoE layer: as many experts at once
    as a layer's slot range holds."""
    G = min(layout.share, layout.experts)
    return G, -(-layout.experts // G)


def needed_sorted(idx, valid_tokens, E: int):
    """Prefill routing idx [N, k] of tokens with valid_tokens [N] -> (experts any valid token
    routes to, ascending, padded to [E]; their count)."""
    need = member(idx, valid_tokens[:, None], E)
    return compact(jnp.arange(E, dtype=jnp.int32), need)


# ---- one layer's decisions as jitted steps --------------------------------------------------
# The stepwise engine calls these per layer; the fused engine calls the same ones inside its
# program (a nested jit is traced once and reused by every layer, which keeps tracing short).
# m, the MoE layer, is traced; pending [E]: transfers still in flight (stepwise, emulated link).

@partial(jax.jit, static_argnums=(0, 1))
def substitute_step(cfg, policy, state, m, scores, weights, idx, similarity, pending, queued=None):
    """-> (state, importance [N, E], experts [N, k], their weights [N, k]). queued: the
    prefetches queued for layer m (Fetches, not started) or None: the experts they evicted are
    substitutes too (`evicted`)."""
    from moejax.model.moe import importance

    probs = importance(scores, cfg.router)
    available = (state["table"][m] >= 0) & ~pending
    if queued is not None:
        available = available | evicted(queued, m, state["table"].shape[1])
    state, experts, changed = substitute_layer(state, policy, m, probs, idx, similarity, available)
    return state, probs, experts, reweigh(cfg, scores, experts, changed, weights, policy.mode)


@partial(jax.jit, static_argnums=(0, 1))
def plan_step(layout, policy, state, m, experts, pending, probs):
    """-> (state, Fetches, needed, slots [N, k] of the experts before the plan (-1: not there))."""
    before = state["table"][m][experts]
    state, fetches, needed = plan_decode(state, layout, policy, m, experts, pending)
    if policy.needs_probs:
        state = observe(state, m, probs)
    return state, fetches, needed, before


@partial(jax.jit, static_argnums=(0,))
def drop_step(layout, state, m, experts, queued):
    return drop_prefetches(state, layout, m, experts, queued)


@partial(jax.jit, static_argnums=(0, 1))
def prefetch_step(layout, policy, state, m, predicted, valid, shield, pending):
    return plan_prefetch(state, layout, policy, m, predicted, valid, shield, pending)


@partial(jax.jit, static_argnums=(0, 1))
def prefill_group_step(layout, policy, state, m, group, ok):
    return plan_prefill_group(state, layout, policy, m, group, ok)


@partial(jax.jit, static_argnums=(0,))
def release_step(layout, state, m, experts, ok):
    return release(state, layout, m, experts, ok)
