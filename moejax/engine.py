"""The offloaded decode loop.

Per decode step and MoE layer:
  1. jitted attention + router (`_attn_route`): residual stream, MLP input h, dense/shared
     output, top-k expert ids and weights (and, for prefetching policies, the next layer's
     router applied to h);
  2. the expert ids come to the host; the scheduler plans hits, fetches and evictions;
  3. fetches start (`HostExpertStore.fetch`, an async device_put) and are written into
     pool slots by a donated, jitted update that waits for the data on the device;
  4. jitted expert compute (`_moe_out`) gathers the k experts per token from the pool by
     slot index;
  5. a prefetching policy plans and starts the next layer's loads, which then overlap
     this layer's compute.
Shapes never depend on which experts are cached (slots are traced indices), so nothing
recompiles after warm-up. Prefill runs the routed experts group by group through the same
pool, so it respects the budget too.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import checkpoint
from moejax.generate import Generation, generation_loop, sample
from moejax.metrics import Telemetry
from moejax.model import layers as L
from moejax.model import moe
from moejax.model.decoder import Decoder, empty_cache, rope
from moejax.offload.budget import BudgetPlan, plan_budget
from moejax.offload.cache import ExpertPool
from moejax.offload.importance import classify, gate_weights, substitute
from moejax.offload.policies import make_policy
from moejax.offload.scheduler import choose_victims, plan_layer, plan_prefetch, unique_in_order
from moejax.offload.store import HostExpertStore, Link, Transfer


def _rope(cfg, x, pos):
    B, T, _ = x.shape
    return rope(cfg, pos, T, B, x.dtype)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _dense_layer(graphdef, state, x, kv, pos):
    layer = nnx.merge(graphdef, state)
    return layer(x, kv, pos, *_rope(layer.cfg, x, pos))


@partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _attn_route(graphdef, state, x, kv, pos, next_router):
    """x [B, T, H] -> x after attention, h [N, H], dense/shared output [N, H], router scores
    [N, E], top-k weights and ids [N, k], predicted next-layer ids [N, k] (or None), new kv.
    next_router: (router, bias or None) of the next MoE layer, applied to this layer's h."""
    layer = nnx.merge(graphdef, state)
    cfg = layer.cfg
    B, T, H = x.shape
    a, kv = layer.attention(x, kv, pos, *_rope(cfg, x, pos))
    x = x + a
    h = layer.mlp_input(x.reshape(B * T, H))
    scores, weights, idx = layer.route(h)
    pred = None if next_router is None else moe.route(cfg, h, *next_router)[2]
    return x, h, layer.dense_output(h), scores, weights, idx, pred, kv


@jax.jit
def _moe_out(x, h, dense, pool, slots, weights):
    """Decode: gather k experts per token from the pool. slots [N, k] -> new residual [B, T, H]."""
    out = dense + moe.experts_indexed(h, pool, slots, weights)
    return x + out.reshape(x.shape)


@partial(jax.jit, static_argnums=(0,))
def _predict_next(cfg, x, h, dense, pool, slots, weights, next_norm, next_router, next_bias):
    """PAPER.md 4: the next layer's routing from an approximate hidden state: residual +
    shared/dense output + the output of the experts already on the device (weights of the
    others are 0), through the next layer's norm (attention skipped).
    -> (importance [N, E], predicted expert ids [N, k])."""
    approx = x.reshape(h.shape) + dense + moe.experts_indexed(h, pool, slots, weights)
    scores, _, idx = moe.route(cfg, L.rms_norm(approx, next_norm, cfg.rms_norm_eps), next_router, next_bias)
    return moe.importance(scores, cfg.router), idx


@jax.jit
def _group_out(acc, h, pool, group_slots, group_experts, idx, weights, valid):
    """Prefill: add the contribution of one group of G pooled experts to acc [N, H].
    group_experts [G] (-1 = unused entry), idx/weights [N, k], valid [N] (0 for padding)."""
    match = idx[:, :, None] == group_experts[None, None, :]  # [N, k, G]
    w = jnp.sum(jnp.where(match, weights[:, :, None], 0.0), axis=1) * valid[:, None]  # [N, G]
    blocks = pool[group_slots]  # [G, 3, H, I]
    g = jnp.einsum("nh,ghi->ngi", h, blocks[:, 0])
    u = jnp.einsum("nh,ghi->ngi", h, blocks[:, 1])
    y = jnp.einsum("ngi,ghi->ngh", jax.nn.silu(g) * u, blocks[:, 2])  # [N, G, H]
    return acc + jnp.einsum("ngh,ng->nh", y, w.astype(h.dtype))


@jax.jit
def _finish_prefill(x, dense, acc):
    return x + (dense + acc).reshape(x.shape)


@partial(jax.jit, static_argnums=(5, 6))
def _head(embed, final_norm, lm_head, x, key, temperature, top_p, eps):
    """Last position of x [B, T, H] -> (next token [B], logits [B, V])."""
    hidden = L.rms_norm(x[:, -1], final_norm, eps)
    logits = (hidden @ (embed.T if lm_head is None else lm_head)).astype(jnp.float32)
    return sample(logits, key, temperature, top_p), logits


@jax.jit
def _embed(embed, tokens):
    """tokens [B, T] (or [B] for one decode step) -> [B, T, H]."""
    return embed[tokens.reshape(tokens.shape[0], -1)]


def load_parts(path: str | Path):
    """(config, global params, layer params without routed experts, host expert store):
    what an engine needs from a checkpoint. Engines may share one (benchmarks build many)."""
    path = Path(path)
    cfg, _ = checkpoint.read_meta(path)
    glob = checkpoint.load_item(path, "global")
    layers, experts = [], {}
    for i in range(cfg.num_layers):
        p = checkpoint.load_item(path, checkpoint.layer_name(i))
        if cfg.moe_layers[i]:
            experts[i] = p.pop("experts")
        layers.append(p)
    return cfg, glob, layers, HostExpertStore(experts)  # routed experts never touch the device here


class OffloadEngine:
    """Runs a converted checkpoint with its routed experts in host memory and a device
    expert pool sized by `budget` (a parsed --vram-budget; None = every expert fits)."""

    def __init__(self, path: str | Path, policy: str = "lru", budget=None, batch: int = 1,
                 cache_len: int = 256, per_layer: bool = False, alpha: float = 0.0, substitute: str = "window",
                 similarity: dict[int, np.ndarray] | None = None, score_window: int = 16, parts=None,
                 link: Link | None = None):
        path = Path(path)
        cfg, glob, layers, self.store = parts or load_parts(path)
        self.config, self.path, self.batch, self.cache_len = cfg, path, batch, cache_len
        self.policy_name = policy
        self.link = link or Link()
        self.recorder = None  # a moejax.eval.trace.TraceRecorder, to record the routing
        self.settings = dict(alpha=alpha, mode=substitute, score_window=score_window)
        self.similarity = similarity or {}
        self.policy = make_policy(policy, **self.settings)
        self.module = Decoder(cfg, glob, layers, offloaded=True)  # dense weights -> device
        self.dtype = self.module.dtype
        self.layer_defs = [nnx.split(layer) for layer in self.module.layers]
        self.plan: BudgetPlan = plan_budget(cfg, np.dtype(self.dtype).itemsize, batch, cache_len, budget,
                                            prefetch=self.policy.prefetch is not None)
        self.pool = ExpertPool(self.plan.pool_slots, self.store.expert_shape, self.dtype,
                               list(cfg.moe_layer_ids), cfg.num_experts, per_layer)
        self.kv = empty_cache(cfg, batch, cache_len, self.dtype)
        self._next_moe = {i: (i + 1 if i + 1 < cfg.num_layers and cfg.moe_layers[i + 1] else None)
                          for i in cfg.moe_layer_ids}
        self._dense_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(self.module)))
        self.reset()

    # ---- state --------------------------------------------------------------------------
    def reset(self, keep_pool: bool = False) -> None:
        """Fresh telemetry; unless keep_pool, an empty pool and a fresh policy. If the pool
        holds every expert, it is filled now (the warm-up), so decoding moves no bytes."""
        self.t = Telemetry()
        self._inflight: dict[tuple[int, int], Transfer] = {}
        self._prefetched: set[tuple[int, int]] = set()
        self._staging: list[Transfer] = []
        if not keep_pool:
            for key in list(self.pool.slot_of):
                self.pool.evict(key)
            self.policy = make_policy(self.policy_name, **self.settings)
            if self.plan.pool_slots == self.plan.total_experts and self.policy.reuse:
                for layer in self.config.moe_layer_ids:
                    for e in range(self.config.num_experts):
                        self.pool.put((layer, e), self.pool.free_slot(layer), self.store.fetch(layer, e).array)
                jax.block_until_ready(self.pool.array)

    def device_bytes(self) -> int:
        """Bytes of the device arrays the engine holds now: dense weights, KV cache, pool,
        and the device copies of transfers issued in the current layer."""
        kv = sum(a.nbytes for pair in self.kv for a in pair)
        return self._dense_bytes + kv + self.pool.nbytes + sum(tr.nbytes for tr in self._staging)

    def _note_peak(self) -> None:
        self.t.peak_device_bytes = max(self.t.peak_device_bytes, self.device_bytes())

    # ---- moving experts -----------------------------------------------------------------
    def _landed(self, layer: int) -> tuple[set[int], set[int]]:
        """(resident and landed, still in flight) experts of a layer."""
        for key, tr in list(self._inflight.items()):
            if tr.ready():
                del self._inflight[key]
        pending = {e for (l, e) in self._inflight if l == layer}
        return self.pool.resident(layer) - pending, pending

    def _evict(self, key) -> None:
        self.pool.evict(key)
        self._inflight.pop(key, None)
        self._prefetched.discard(key)

    def _load(self, layer: int, e: int, kind: str) -> None:
        if len(self._staging) >= self.plan.staging_slots:
            # the budget reserves room for this many device copies in flight: let the pool
            # writes consume them before starting more (only prefill groups get here)
            jax.block_until_ready(self.pool.array)
            self._staging = []
        tr = self.store.fetch(layer, e, kind, self.link)
        self.pool.put((layer, e), self.pool.free_slot(layer), tr.array)
        self._inflight[(layer, e)] = tr
        self._staging.append(tr)
        if kind == "prefill":
            self.t.bytes_h2d_prefill += tr.nbytes
        else:
            self.t.bytes_h2d_decode += tr.nbytes
            self.t.transfers += 1
        if kind == "prefetch":
            self._prefetched.add((layer, e))
        self._note_peak()

    def _wait(self, keys) -> None:
        """On an emulated link, compute may not start before its experts have arrived. (On a
        real link the device orders the pool write before the compute by itself.)"""
        if self.link.emulated:
            for key in keys:
                tr = self._inflight.get(key)
                if tr is not None:
                    tr.wait()

    def _drop_stale_prefetches(self, layer: int, needed) -> bool:
        """PAPER.md 4: once a layer's real scores are known, prefetches for it that the link
        has not started and that the layer does not need are dropped (slot freed). Only an
        emulated link queues transfers; a real device_put starts at once. -> whether any was."""
        if not self.link.emulated:
            return False
        dropped = False
        for key, tr in list(self._inflight.items()):
            if key[0] == layer and tr.kind == "prefetch" and key[1] not in needed and self.link.cancel(tr):
                self._evict(key)
                self.t.prefetch_dropped += 1
                dropped = True
        return dropped

    def _router(self, layer: int):
        """(router weight, selection bias or None) of a MoE layer."""
        m = self.module.layers[layer]
        return m.router[...], None if m.router_bias is None else m.router_bias[...]

    def _candidates(self, layer: int):
        return self.pool.keys_in_range(layer), sum(k is None for k in
                                                   (self.pool.key_of[s] for s in self.pool.slot_range(layer)))

    # ---- one MoE layer ------------------------------------------------------------------
    def _moe_decode(self, i, x, pos):
        gd, st = self.layer_defs[i]
        cfg, pol = self.config, self.policy
        nxt = self._next_moe[i]
        gate = pol.prefetch == "next-layer-gate" and nxt is not None
        next_router = self._router(nxt) if gate else None
        x, h, dense, scores, weights, idx, pred, self.kv[i] = _attn_route(gd, st, x, self.kv[i], pos, next_router)
        idx_h, weights_h = np.asarray(idx), np.asarray(weights)  # [N, k]: the layer's device -> host reads
        scores_h = np.asarray(scores) if (pol.needs_probs or self.recorder) else None  # [N, E]
        probs_h = None if scores_h is None else moe.importance(scores_h, cfg.router)
        if self.recorder is not None:
            self.recorder.on_decode(i, idx_h, probs_h)
        t0 = time.perf_counter()
        resident, pending = self._landed(i)
        experts = idx_h
        if pol.substitute and pol.alpha > 0:
            experts, changed = substitute(probs_h, idx_h, pol.alpha, resident, pol.mode, self.similarity.get(i))
            if changed.any():
                weights_h = gate_weights(scores_h, experts, cfg.norm_topk_prob, cfg.routed_scaling_factor)
                self.t.substituted += int(changed.sum())
        if pol.prefetch and self._drop_stale_prefetches(i, set(experts.reshape(-1).tolist())):
            resident, pending = self._landed(i)
        candidates, free = self._candidates(i)
        plan = plan_layer(i, experts, resident, pending, pol, free, candidates)
        if probs_h is not None:
            pol.observe(i, probs_h)
        self.t.sched_us.append(1e6 * (time.perf_counter() - t0))
        if pol.prefetch == "top-score" and nxt is not None:  # predict before the fetches land
            hit = np.isin(experts, plan.hits)
            slots = np.where(hit, self.pool.table[i][experts], 0)
            pred_probs = _predict_next(cfg, x, h, dense, self.pool.array, slots, np.where(hit, weights_h, 0.0),
                                       self.module.layers[nxt].mlp_norm[...], *self._router(nxt))
        for key in plan.evict:
            self._evict(key)
        for e in plan.fetch:
            self._load(i, e, "fetch")
        used = {(i, e) for e in plan.needed}
        self.t.prefetch_used += len(used & self._prefetched)
        self._prefetched -= used
        self.t.decode_hits += len(plan.hits)
        self.t.decode_unique += len(plan.needed)
        self.t.routed += idx_h.size
        slots = self.pool.table[i][experts]  # [N, k]
        self._wait(used)
        x = _moe_out(x, h, dense, self.pool.array, slots, weights_h)
        pol.touch([(i, e) for e in plan.needed])
        if not pol.reuse:  # on-demand: nothing stays for later
            for key in used:
                self._evict(key)
        if pol.prefetch and nxt is not None:
            pred_h = jax.device_get(pred_probs if pol.prefetch == "top-score" else pred)  # waits for the device
            t0 = time.perf_counter()  # scheduling work only, not the wait above
            if pol.prefetch == "top-score":
                pred_probs, pred_idx = pred_h
                _, top = classify(pred_probs, pred_idx, pol.alpha)
                predicted = pred_idx[top]
            else:
                predicted = pred_h
            resident, pending = self._landed(nxt)
            candidates, free = self._candidates(nxt)
            want, evict = plan_prefetch(nxt, predicted, resident, pending, pol, free, candidates, shield=used)
            self.t.sched_us[-1] += 1e6 * (time.perf_counter() - t0)
            for key in evict:
                self._evict(key)
            for e in want:
                self._load(nxt, e, "prefetch")
            self.t.prefetch_issued += len(want)
        self._note_peak()
        self._staging = [tr for tr in self._staging if tr.kind == "prefetch" and tr.key[0] == nxt]
        return x

    def _moe_prefill(self, i, x, T):
        """All prompt tokens through layer i, routed experts in groups that fit the pool."""
        gd, st = self.layer_defs[i]
        x, h, dense, _, weights, idx, _, self.kv[i] = _attn_route(gd, st, x, self.kv[i], np.int32(0), None)
        idx_h = np.asarray(idx).reshape(self.batch, -1, idx.shape[-1])[:, :T].reshape(-1)  # real tokens only
        if self.recorder is not None:
            self.recorder.on_prefill(i, idx_h.reshape(-1, idx.shape[-1]))
        needed = unique_in_order(idx_h)
        resident = self.pool.resident(i)
        order = [e for e in needed if e in resident] + [e for e in needed if e not in resident]
        G = min(len(self.pool.slot_range(i)), self.config.num_experts)
        valid = np.zeros((self.batch, x.shape[1]), np.float32)
        valid[:, :T] = 1.0
        valid = valid.reshape(-1)
        acc = jnp.zeros_like(h)
        for start in range(0, len(order), G):
            group = order[start:start + G]
            shield = {(i, e) for e in group}
            candidates, free = self._candidates(i)
            missing = [e for e in group if (i, e) not in self.pool.slot_of]
            for key in choose_victims(len(missing), free, candidates, shield, self.policy):
                self._evict(key)
            for e in missing:
                self._load(i, e, "prefill")
            self.policy.touch(sorted(shield, key=lambda k: group.index(k[1])))
            ids = np.full(G, -1, np.int32)
            ids[: len(group)] = group
            slots = np.zeros(G, np.int32)
            slots[: len(group)] = [self.pool.slot_of[(i, e)] for e in group]
            self._wait(shield)
            acc = _group_out(acc, h, self.pool.array, slots, ids, idx, weights, valid)
            self._staging = []
        if not self.policy.reuse:
            for e in needed:
                if (i, e) in self.pool.slot_of:  # later groups may have evicted it already
                    self._evict((i, e))
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

    def _head(self, x, key, temperature, top_p):
        m = self.module
        lm_head = None if m.lm_head is None else m.lm_head[...]
        return _head(m.embed[...], m.final_norm[...], lm_head, x, key, temperature, top_p,
                     self.config.rms_norm_eps)

    def prefill(self, padded: np.ndarray, T: int, key, temperature=0.0, top_p=1.0):
        """padded [B, Tp] prompt (T real tokens) -> (first token [B], logits [B, V])."""
        if padded.shape[1] > self.cache_len:
            raise ValueError(f"prompt of {padded.shape[1]} tokens exceeds the engine's cache of {self.cache_len}")
        self.kv = list(self.kv)
        x = _embed(self.module.embed[...], np.asarray(padded, np.int32))
        x = self._layers(x, 0, T)
        return self._head(x[:, :T], key, temperature, top_p)

    def step(self, token, pos: int, key, temperature=0.0, top_p=1.0):
        """token [B] at position pos -> (next token [B], logits [B, V])."""
        x = _embed(self.module.embed[...], token)
        x = self._layers(x, pos, None)
        return self._head(x, key, temperature, top_p)

    def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop_ids=(), on_token=None, warmup: bool = False) -> Generation:
        prompt = np.asarray(prompt, np.int32)
        if prompt.shape[0] != self.batch:
            raise ValueError(f"engine built for batch {self.batch}, got {prompt.shape[0]} prompts")
        if prompt.shape[1] + max_new_tokens > self.cache_len:
            raise ValueError(f"prompt + new tokens exceed the engine's cache of {self.cache_len}")
        temperature, top_p = float(temperature), float(top_p)
        prefill = lambda p, T, k: self.prefill(p, T, k, temperature, top_p)[0]  # noqa: E731
        step = lambda tok, pos, k: self.step(tok, pos, k, temperature, top_p)[0]  # noqa: E731

        warmup_s = 0.0
        if warmup:  # compile every stage, then start from an empty pool
            t0 = time.perf_counter()
            generation_loop(prefill, step, prompt, 3, seed)
            warmup_s = time.perf_counter() - t0
            self.reset()
        self.t = Telemetry()
        g = generation_loop(prefill, step, prompt, max_new_tokens, seed, stop_ids, on_token)
        g.warmup_s = warmup_s
        self.t.ttft_s, self.t.step_s = g.ttft_s, g.step_s
        return g


ENGINES = ("fused", "stepwise")


def make_engine(kind: str, path, policy: str = "lru", budget=None, **kw):
    """The offloaded engine by name: "fused" (one XLA program per decode step, the default)
    or "stepwise" (this module's Python-driven loop: emulated links, research hooks).
    Keyword arguments are OffloadEngine's (batch, cache_len, alpha, substitute, similarity,
    score_window, parts, link, per_layer); an emulated link needs the stepwise engine."""
    if kind == "stepwise":
        return OffloadEngine(path, policy, budget, **kw)
    if kind != "fused":
        raise ValueError(f"unknown engine {kind!r}")
    link = kw.pop("link", None)
    if link is not None and link.emulated:
        raise ValueError("an emulated link runs on the stepwise engine")
    from moejax.fused import FusedEngine

    return FusedEngine(path, policy, budget, **kw)
