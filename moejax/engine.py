"""The stepwise offloaded engine: each MoE layer driven from Python (`--engine stepwise`).

Kept beside the fused engine (moejax.fused) for what needs the host between layers: the
emulated link (transfers that take their time, queued prefetches dropped when real scores
arrive), trace recording and other research hooks. Its decisions are the fused engine's
(`offload.decisions`, run through jit), its expert arithmetic is the resident model's.

Per decode step and MoE layer:
  1. jitted attention + router (`_attn_route`);
  2. jitted decisions (`_substitute`, `_plan`): substitution, hits, evictions, slots;
     the plan's fetch list comes to the host (the layer's device -> host read);
  3. fetches start (`HostExpertStore.fetch`: an in-program copy of the expert) and are
     written into their pool slots by a donated, jitted update;
  4. jitted expert compute (`_moe_out`) from the pool by slot index;
  5. a prefetching policy predicts the next layer (`fused.predict_next`) and plans its loads.
     On an emulated link, or with a fixed prefetch width, they start now and overlap this
     layer's compute (an emulated link drops those that have not started once the next layer's
     real scores are known, if it does not use them); on the real link they are queued as the
     fused engine queues them: the next layer drops the ones it does not use and loads the
     rest before its own misses (`decisions.drop_prefetches`), so both engines make the same
     decisions.
Shapes never depend on which experts are cached, so nothing recompiles after warm-up.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.fused import attend_route, next_layer, predict_next
from moejax.generate import OffloadedGeneration
from moejax.metrics import Telemetry
from moejax.model import layers as L
from moejax.model import moe
from moejax.model.decoder import Decoder, empty_cache, rope
from moejax.offload import decisions as D
from moejax.offload.budget import BudgetPlan, plan_budget
from moejax.offload.cache import new_pool, write_block
from moejax.offload.importance import SIMILARITY_MODES
from moejax.offload.policies import check_width, make_policy
from moejax.offload.store import Link, Parts, Transfer, load_parts  # noqa: F401  (load_parts: public here too)


def _rope(cfg, x, pos):
    B, T, _ = x.shape
    return rope(cfg, pos, T, B, x.dtype)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _dense_layer(graphdef, state, x, kv, pos):
    layer = nnx.merge(graphdef, state)
    return layer(x, kv, pos, *_rope(layer.cfg, x, pos))


@partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _attn_route(graphdef, state, x, kv, pos):
    """x [B, T, H] -> (x after attention, new kv, h [N, H], dense/shared output [N, H], router
    scores [N, E], top-k weights and ids [N, k])."""
    layer = nnx.merge(graphdef, state)
    return attend_route(layer, x, kv, pos, *_rope(layer.cfg, x, pos))


@partial(jax.jit, static_argnums=(0, 1))
def _predict(cfg, policy, nxt, x, h, dense, pool, slots, hit, weights):
    return predict_next(cfg, policy, nxt, x, h, dense, pool, slots, hit, weights)


@partial(jax.jit, static_argnums=(6,))
def _moe_out(x, h, dense, pool, slots, weights, quant=None):
    """Decode: the k experts per token from the pool. slots [N, k] -> new residual [B, T, H]."""
    out = dense + moe.experts_indexed(h, pool, slots, weights, quant)
    return x + out.reshape(x.shape)


@partial(jax.jit, static_argnums=(8,))
def _ordered(h, pool, rows, ids, ok, idx, weights, acc, quant=None):
    return moe.experts_ordered(h, pool, rows, ids, ok, idx, weights, acc, quant)


@jax.jit
def _finish_prefill(x, dense, acc):
    return x + (dense + acc).reshape(x.shape)


@partial(jax.jit, static_argnums=(4, 5))
def _head(module_logits_args, x, last, key, temperature, top_p):
    """x [B, T, H] -> (next token [B], logits [B, V]) of position `last` (the final norm and LM head
    of that position only, as the resident model computes them)."""
    from moejax.generate import sample

    embed, final_norm, lm_head, eps = module_logits_args
    x = jax.lax.dynamic_index_in_dim(x, last, axis=1, keepdims=False)  # [B, H]
    logits = L.lm_head(L.rms_norm(x, final_norm, eps), embed, lm_head)  # [B, V]
    return sample(logits, key, temperature, top_p), logits


@jax.jit
def _embed(embed, tokens):
    """tokens [B, T] (or [B] for one decode step) -> [B, T, H]."""
    return embed[tokens.reshape(tokens.shape[0], -1)]


class OffloadEngine(OffloadedGeneration):
    """Runs a converted checkpoint with its routed experts in host memory and a device
    expert pool sized by `budget` (a parsed --vram-budget; None = every expert fits)."""

    engine_name = "stepwise"

    def __init__(self, path: str | Path, policy: str = "lru", budget=None, batch: int = 1,
                 cache_len: int = 256, per_layer: bool = False, alpha: float = 0.0, substitute: str = "window",
                 similarity: dict[int, np.ndarray] | None = None, score_window: int = 16,
                 parts: Parts | None = None, link: Link | None = None, prefetch_width: int = 0):
        path = Path(path)
        cfg, glob, layers, self.store = parts or load_parts(path)
        self.config, self.batch, self.cache_len = cfg, batch, cache_len
        self.policy_name = policy
        self.link = link or Link()
        self.recorder = None  # a moejax.eval.trace.TraceRecorder, to record the routing
        self.policy = make_policy(policy, alpha, substitute, score_window, check_width(prefetch_width, cfg))
        self.moe_ids = list(cfg.moe_layer_ids)
        self.similarity = {} if self.policy.mode not in SIMILARITY_MODES or not similarity else {
            m: jnp.asarray(similarity[i], jnp.float32) for m, i in enumerate(self.moe_ids)}
        self.module = Decoder(cfg, glob, layers, offloaded=True)  # dense weights -> device
        self.dtype = self.module.dtype
        self.layer_defs = [nnx.split(layer) for layer in self.module.layers]
        self.plan: BudgetPlan = plan_budget(cfg, np.dtype(self.dtype).itemsize, batch, cache_len, budget,
                                            prefetch=self.policy.prefetch is not None)
        self.layout = D.Layout(len(self.moe_ids), cfg.num_experts, self.plan.pool_slots, per_layer)
        self.layout.check(min(batch * cfg.top_k, cfg.num_experts))
        self.compile_s = 0.0  # compilation happens inside the warm-up (Generation.warmup_s)
        self._dense_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(self.module)))
        m = self.module
        self._logits_args = (m.embed[...], m.final_norm[...], None if m.lm_head is None else m.lm_head[...],
                             cfg.rms_norm_eps)
        self.reset()

    # ---- state --------------------------------------------------------------------------
    def reset(self) -> None:
        """Fresh telemetry, an empty pool and fresh decision state. If the pool holds every
        expert (and the policy reuses experts), it is filled now (the warm-up), so decoding
        moves no bytes."""
        full = self.plan.pool_slots == self.plan.total_experts and self.policy.reuse
        self.pool = new_pool(self.store, self.moe_ids, self.plan.pool_slots, full)
        self.state = D.init_state(self.layout, self.policy.score_window, full)
        self.kv = list(empty_cache(self.config, self.batch, self.cache_len, self.dtype))
        self._inflight: dict[tuple[int, int], Transfer] = {}  # emulated link: transfers not yet landed
        self._staging: list[Transfer] = []
        self._queued = None  # real link: Fetches of the prefetches planned for the next MoE layer, not started
        self._t = Telemetry()

    @property
    def telemetry(self) -> Telemetry:
        """Telemetry since the last reset (decision counters read from the device now)."""
        c = {k: int(v) for k, v in jax.device_get(self.state["counters"]).items()}
        return self._t.count(c, self.store.expert_bytes)

    def device_bytes(self) -> int:
        """Bytes of the device arrays the engine holds now: dense weights, KV cache, pool,
        and the device copies of transfers issued in the current layer."""
        kv = sum(a.nbytes for pair in self.kv for a in pair)
        return self._dense_bytes + kv + self.pool.nbytes + sum(tr.nbytes for tr in self._staging)

    def _note_peak(self) -> None:
        self._t.peak_device_bytes = max(self._t.peak_device_bytes, self.device_bytes())

    # ---- moving experts -----------------------------------------------------------------
    def _pending(self, layer: int, queued=()) -> np.ndarray:
        """bool [E]: experts of a layer still on the way: on an emulated link, transfers that have
        not landed; on a real link, the prefetches `queued` for it (expert ids, not started when
        its scores are known). Other transfers count as landed at the next plan: the device
        orders the compute after the pool write."""
        pending = np.zeros(self.config.num_experts, bool)
        pending[np.asarray(queued, np.int64)] = True
        for (l, e), tr in list(self._inflight.items()):
            if tr.ready():
                del self._inflight[(l, e)]
            elif l == layer:
                pending[e] = True
        return pending

    def _load(self, layer: int, e: int, slot: int, kind: str) -> None:
        if len(self._staging) >= self.plan.staging_slots:
            # the budget reserves room for this many device copies in flight: let the pool
            # writes consume them before starting more (only prefill groups get here)
            jax.block_until_ready(self.pool)
            self._staging = []
        tr = self.store.fetch(layer, e, kind, self.link)
        self.pool = write_block(self.pool, tr.array, np.int32(slot))
        if self.link.emulated:
            self._inflight[(layer, e)] = tr
        self._staging.append(tr)
        self._note_peak()

    def _carry_out(self, layer: int, fetches, kind: str) -> list[int]:
        """Start the plan's loads (the layer's device -> host read of the plan)."""
        n, experts, slots = jax.device_get((fetches.count, fetches.experts, fetches.slots))  # one read, not three
        experts, slots = experts[:int(n)], slots[:int(n)]
        if self.link.emulated:  # transfers of experts the plan evicted are void
            table = np.asarray(self.state["table"])
            for (l, e) in list(self._inflight):
                if table[self.moe_ids.index(l), e] < 0:
                    del self._inflight[(l, e)]
        for e, s in zip(experts.tolist(), slots.tolist()):
            self._load(layer, e, s, kind)
        return experts.tolist()

    def _wait(self, layer: int, experts) -> None:
        """On an emulated link, compute may not start before its experts have arrived."""
        for e in experts:
            tr = self._inflight.get((layer, int(e)))
            if tr is not None:
                tr.wait()

    def _drop_stale_prefetches(self, layer: int, m: int, experts) -> bool:
        """docs/method.md 4: once a layer's real scores are known (experts [N, k] it computes),
        the queued prefetches for it that the link has not started and that it does not use are
        dropped (`decisions.drop_prefetches`: slot freed). Only an emulated link queues
        transfers. -> whether any was."""
        needed = set(np.asarray(experts).ravel().tolist())
        drop = [e for (l, e), tr in self._inflight.items()
                if l == layer and tr.kind == "prefetch" and e not in needed and self.link.cancel(tr)]
        if drop:
            ids = np.zeros(self.config.num_experts, np.int32)
            ids[: len(drop)] = drop
            slots = np.asarray(self.state["table"])[m, ids].astype(np.int32)  # entries past the count unused
            queued = D.Fetches(ids, slots, np.int32(len(drop)))
            self.state, _ = D.drop_step(self.layout, self.state, np.int32(m), experts, queued)
            for e in drop:
                del self._inflight[(layer, e)]
        return bool(drop)

    # ---- one MoE layer ------------------------------------------------------------------
    def _moe_decode(self, i, x, pos):
        gd, st = self.layer_defs[i]
        cfg, pol = self.config, self.policy
        m = self.moe_ids.index(i)
        x, self.kv[i], h, dense, scores, weights, idx = _attn_route(gd, st, x, self.kv[i], pos)
        t0 = time.perf_counter()
        queued, self._queued = self._queued, None  # real link: the previous layer's prefetches, not started
        if queued is not None:
            n, q_experts, q_slots = jax.device_get((queued.count, queued.experts, queued.slots))  # one read
            q_experts, q_slots = q_experts[:n], q_slots[:n]
        pending = self._pending(i, () if queued is None else q_experts)
        self.state, probs, experts, weights = D.substitute_step(cfg, pol, self.state, np.int32(m), scores, weights, idx,
                                                          self.similarity.get(m), pending, queued)
        if self.recorder is not None:
            self.recorder.on_decode(i, np.asarray(idx), np.asarray(probs))
        if pol.prefetch and self.link.emulated and self._drop_stale_prefetches(i, m, experts):
            pending = self._pending(i)
        if queued is not None:  # as the fused engine: drop the unused, load the rest first (pending to the plan)
            self.state, keep = D.drop_step(self.layout, self.state, np.int32(m), experts, queued)
            keep = np.asarray(keep)[:n]
            pending = self._pending(i, q_experts[keep])
            self._carry_out(i, D.Fetches(q_experts[keep], q_slots[keep], np.int32(keep.sum())), "prefetch")
        self.state, fetches, needed, before = D.plan_step(self.layout, pol, self.state, np.int32(m), experts, pending, probs)
        nxt = i + 1 < cfg.num_layers and cfg.moe_layers[i + 1]
        if pol.prefetch and nxt:  # from the pool before this layer's fetches land
            hit = (before >= 0) & ~jnp.asarray(pending)[experts]
            predicted = _predict(cfg, pol, next_layer(self.module.layers, i), x, h, dense, self.pool, before, hit,
                                 weights)
        self._carry_out(i, fetches, "fetch")
        self._t.sched_us.append(1e6 * (time.perf_counter() - t0))
        if self.link.emulated:
            self._wait(i, np.asarray(experts).ravel())
        x = _moe_out(x, h, dense, self.pool, self.state["table"][m][experts], weights, cfg.quant)
        if not pol.reuse:  # on-demand: nothing stays for later
            self.state = D.release_step(self.layout, self.state, np.int32(m), *needed)
        if pol.prefetch and nxt:
            t0 = time.perf_counter()
            now = self.link.emulated or pol.prefetch_width  # else queued, as the fused engine queues them
            self.state, pf = D.prefetch_step(self.layout, pol, self.state, np.int32(m + 1), *predicted,
                                            D.prefetch_shield(np.int32(m), needed, not now), self._pending(i + 1))
            if now:
                self._carry_out(i + 1, pf, "prefetch")
            else:
                self._queued = pf
            self._t.sched_us[-1] += 1e6 * (time.perf_counter() - t0)
        self._note_peak()
        self._staging = [tr for tr in self._staging if tr.kind == "prefetch" and tr.key[0] == i + 1]
        return x

    def _moe_prefill(self, i, x, T):
        """All prompt tokens through layer i, expert by expert in id order (as the resident
        model), in groups that fit the layer's slots."""
        gd, st = self.layer_defs[i]
        m = self.moe_ids.index(i)
        x, self.kv[i], h, dense, _, weights, idx = _attn_route(gd, st, x, self.kv[i], np.int32(0))
        k = idx.shape[-1]
        idx_h = np.asarray(idx).reshape(self.batch, -1, k)[:, :T].reshape(-1, k)  # real tokens only
        if self.recorder is not None:
            self.recorder.on_prefill(i, idx_h)
        needed = np.unique(idx_h).astype(np.int32)  # ascending
        G, _ = D.prefill_groups(self.layout)
        acc = jnp.zeros_like(h)
        for start in range(0, len(needed), G):
            group = np.zeros(G, np.int32)
            part = needed[start:start + G]
            group[: len(part)] = part
            ok = np.arange(G) < len(part)
            self.state, fetches = D.prefill_group_step(self.layout, self.policy, self.state, np.int32(m), group, ok)
            self._carry_out(i, fetches, "prefill")
            if self.link.emulated:
                self._wait(i, part)
            rows = jnp.where(ok, self.state["table"][m][group], 0)
            acc = _ordered(h, self.pool, rows, group, ok, idx, weights, acc, self.config.quant)
            self._staging = []
        if not self.policy.reuse:
            ids = np.zeros(self.config.num_experts, np.int32)
            ids[: len(needed)] = needed
            self.state = D.release_step(self.layout, self.state, np.int32(m), ids, np.arange(len(ids)) < len(needed))
        return _finish_prefill(x, dense, acc)

    # ---- whole steps --------------------------------------------------------------------
    def _layers(self, x, pos, prefill_len: int | None):
        for i in range(self.config.num_layers):
            if not self.config.moe_layers[i]:
                gd, st = self.layer_defs[i]
                x, self.kv[i] = _dense_layer(gd, st, x, self.kv[i], np.int32(pos))
            elif prefill_len is not None:
                x = self._moe_prefill(i, x, prefill_len)
            else:
                x = self._moe_decode(i, x, np.int32(pos))
        return x

    def prefill(self, padded: np.ndarray, T: int, key, temperature=0.0, top_p=1.0):
        """padded [B, Tp] prompt (T real tokens) -> (first token [B], logits [B, V])."""
        if padded.shape[1] > self.cache_len:
            raise ValueError(f"prompt of {padded.shape[1]} tokens exceeds the engine's cache of {self.cache_len}")
        x = _embed(self.module.embed[...], np.asarray(padded, np.int32))
        x = self._layers(x, 0, T)
        return _head(self._logits_args, x, np.int32(T - 1), key, float(temperature), float(top_p))

    def step(self, token, pos: int, key, temperature=0.0, top_p=1.0):
        """token [B] at position pos -> (next token [B], logits [B, V])."""
        x = _embed(self.module.embed[...], jnp.asarray(token))
        x = self._layers(x, pos, None)
        return _head(self._logits_args, x, np.int32(0), key, float(temperature), float(top_p))


ENGINES = ("fused", "stepwise")


def make_engine(kind: str, path, policy: str = "lru", budget=None, **kw):
    """The offloaded engine by name: "fused" (one XLA program per decode step, the default)
    or "stepwise" (this module's Python-driven loop: emulated links, research hooks).
    Keyword arguments are OffloadEngine's (batch, cache_len, alpha, substitute, similarity,
    score_window, parts, link, per_layer, prefetch_width); an emulated link needs the stepwise engine."""
    if kind == "stepwise":
        return OffloadEngine(path, policy, budget, **kw)
    if kind != "fused":
        raise ValueError(f"unknown engine {kind!r}")
    link = kw.pop("link", None)
    if link is not None and link.emulated:
        raise ValueError("an emulated link runs on the stepwise engine")
    from moejax.fused import FusedEngine

    return FusedEngine(path, policy, budget, **kw)
