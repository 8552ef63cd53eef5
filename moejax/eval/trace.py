"""Router traces: record what every MoE layer routed in a run, replay policies without the model.

A trace holds, per MoE layer, the prompt's routed expert ids (prefill) and, per decode step,
the routed ids [N, k] and the router probabilities over all experts [N, E]. Replaying a
policy runs the same scheduler, policy and pool bookkeeping as the engine (no arrays), so
for policies that need nothing but the routing (ondemand, lru, lfu, score, score-sub) the
replayed hit rate equals the engine's on the same run exactly (a test holds it to that).
Policies that prefetch need the model's hidden states and are not replayable. `belady`
(evict the expert whose next use is furthest away) is the offline optimum for any cache
that does not substitute: the bound the paper's substitution can beat.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError
from moejax.offload.cache import ExpertPool
from moejax.offload.importance import substitute
from moejax.offload.policies import LRU, POLICIES, make_policy
from moejax.offload.scheduler import choose_victims, plan_layer, unique_in_order

REPLAYABLE = ("ondemand", "lru", "lfu", "score", "score-sub", "belady")


class TraceRecorder:
    """Filled by the engine while it runs (engine.recorder = TraceRecorder())."""

    def __init__(self):
        self.prefill: dict[int, np.ndarray] = {}
        self.steps: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []
        self._first_layer: int | None = None

    def on_prefill(self, layer: int, idx: np.ndarray) -> None:
        self.prefill[layer] = np.asarray(idx, np.int32)

    def on_decode(self, layer: int, idx: np.ndarray, probs: np.ndarray) -> None:
        if self._first_layer is None:
            self._first_layer = layer
        if layer == self._first_layer:
            self.steps.append({})
        self.steps[-1][layer] = (np.asarray(idx, np.int32), np.asarray(probs, np.float32))

    def save(self, path: Path, cfg, batch: int) -> None:
        from moejax.offload.similarity import fingerprint

        layers = list(cfg.moe_layer_ids)
        meta = {"fingerprint": fingerprint(cfg), "layers": layers, "num_experts": cfg.num_experts,
                "top_k": cfg.top_k, "norm_topk_prob": cfg.norm_topk_prob, "batch": batch, "steps": len(self.steps)}
        arrays = {f"prefill_{l}": self.prefill[l] for l in layers}
        if self.steps:
            arrays["decode_idx"] = np.stack([[s[l][0] for l in layers] for s in self.steps])  # [S, L, N, k]
            arrays["decode_probs"] = np.stack([[s[l][1] for l in layers] for s in self.steps])  # [S, L, N, E]
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(tmp, meta=json.dumps(meta), **arrays)
        tmp.replace(path)


class Trace:
    def __init__(self, path: Path, cfg=None):
        try:
            data = np.load(path)
            self.meta = json.loads(str(data["meta"]))
            self.layers = self.meta["layers"]
            self.prefill = {l: data[f"prefill_{l}"] for l in self.layers}
            S = self.meta["steps"]
            self.idx = data["decode_idx"] if S else np.zeros((0, len(self.layers), 1, self.meta["top_k"]), np.int32)
            self.probs = data["decode_probs"] if S else None
        except (OSError, ValueError, KeyError) as e:
            raise MoejaxError(f"{path} is not a moejax trace ({e})") from None
        if cfg is not None:
            from moejax.offload.similarity import fingerprint

            if self.meta["fingerprint"] != fingerprint(cfg):
                raise MoejaxError(f"{path} was recorded with another model")

    @property
    def total_experts(self) -> int:
        return self.meta["num_experts"] * len(self.layers)


class Belady(LRU):
    """Offline optimum without substitution: evict the expert used again furthest in the future."""

    name = "belady"

    def __init__(self, future: dict[tuple[int, int], list[int]], **kw):
        super().__init__(**kw)
        self.future, self.now = future, 0

    def victim(self, candidates):
        def next_use(k):
            times = self.future.get(k, [])
            i = np.searchsorted(times, self.now, side="right")
            return times[i] if i < len(times) else np.inf

        return max(candidates, key=lambda k: (next_use(k), -self.last_use.get(k, 0)))


def _accesses(trace: Trace) -> dict[tuple[int, int], list[int]]:
    """Time of every use of every expert: prefill layers, then decode (step, layer)."""
    out: dict[tuple[int, int], list[int]] = {}
    t = 0
    for l in trace.layers:
        t += 1
        for e in unique_in_order(trace.prefill[l]):
            out.setdefault((l, e), []).append(t)
    for s in range(trace.idx.shape[0]):
        for j, l in enumerate(trace.layers):
            t += 1
            for e in unique_in_order(trace.idx[s, j]):
                out.setdefault((l, e), []).append(t)
    return out


def replay(trace: Trace, policy: str, slots: int, per_layer: bool = False, alpha: float = 0.0,
           score_window: int = 16) -> dict:
    """Simulate one policy at one pool size; mirrors OffloadEngine's prefill and decode."""
    if policy not in REPLAYABLE:
        raise MoejaxError(f"policy {policy!r} cannot be replayed from a trace (replayable: {', '.join(REPLAYABLE)})")
    E, k = trace.meta["num_experts"], trace.meta["top_k"]
    need = min(trace.meta["batch"] * k, E)
    if slots < need:
        raise MoejaxError(f"a pool of {slots} slots is below the {need} one step needs")
    settings = dict(alpha=alpha, mode="window", score_window=score_window)
    pol = Belady(_accesses(trace), **settings) if policy == "belady" else make_policy(policy, **settings)
    pool = ExpertPool(slots, (), None, trace.layers, E, per_layer, device=False)
    loads = hits = unique = substituted = routed = 0
    t = 0

    def candidates(layer):
        keys = pool.keys_in_range(layer)
        return keys, sum(pool.key_of[s] is None for s in pool.slot_range(layer))

    for l in trace.layers:  # prefill, as OffloadEngine._moe_prefill
        t += 1
        pol.now = t
        needed = unique_in_order(trace.prefill[l])
        resident = pool.resident(l)
        order = [e for e in needed if e in resident] + [e for e in needed if e not in resident]
        G = min(len(pool.slot_range(l)), E)
        for start in range(0, len(order), G):
            group = order[start:start + G]
            shield = {(l, e) for e in group}
            keys, free = candidates(l)
            missing = [e for e in group if (l, e) not in pool.slot_of]
            for key in choose_victims(len(missing), free, keys, shield, pol):
                pool.evict(key)
            for e in missing:
                pool.put((l, e), pool.free_slot(l), None)
            pol.touch(sorted(shield, key=lambda key: group.index(key[1])))
        if not pol.reuse:
            for e in needed:
                if (l, e) in pool.slot_of:
                    pool.evict((l, e))
    for s in range(trace.idx.shape[0]):  # decode, as OffloadEngine._moe_decode
        for j, l in enumerate(trace.layers):
            t += 1
            pol.now = t
            idx, probs = trace.idx[s, j], (trace.probs[s, j] if trace.probs is not None else None)
            resident = pool.resident(l)
            experts = idx
            if pol.substitute and alpha > 0:
                experts, changed = substitute(probs, idx, alpha, resident, "window")
                substituted += int(changed.sum())
            keys, free = candidates(l)
            plan = plan_layer(l, experts, resident, set(), pol, free, keys)
            if pol.needs_probs:
                pol.observe(l, probs)
            for key in plan.evict:
                pool.evict(key)
            for e in plan.fetch:
                pool.put((l, e), pool.free_slot(l), None)
            loads += len(plan.fetch)
            hits += len(plan.hits)
            unique += len(plan.needed)
            routed += idx.size
            pol.touch([(l, e) for e in plan.needed])
            if not pol.reuse:
                for e in plan.needed:
                    pool.evict((l, e))
    return {"policy": policy, "slots": slots, "share": slots / trace.total_experts,
            "hit_rate": hits / unique if unique else float("nan"), "transfers": loads,
            "substitution_rate": substituted / routed if routed else 0.0, "steps": int(trace.idx.shape[0])}


__all__ = ["POLICIES", "REPLAYABLE", "Trace", "TraceRecorder", "replay"]
