"""Router traces: record what every MoE layer routed in a run, replay policies without the model.

A trace holds, per MoE layer, the prompt's routed expert ids (prefill) and, per decode step,
the routed ids [N, k] and the router probabilities over all experts [N, E]. Replaying a
policy runs the engines' own decisions (`offload.decisions`: substitution, plan, score
window, on-demand release) on the recorded routing, without the model, so for policies that
need nothing but the routing (ondemand, lru, lfu, score, score-sub) the replayed counts
equal both engines' on the same run exactly (tests hold them to that).
Policies that prefetch need the model's hidden states and are not replayable. `belady`
(evict the expert whose next use is furthest away) is the offline optimum for any cache
that does not substitute: the bound the paper's substitution can beat.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.errors import MoejaxError
from moejax.offload import decisions as D
from moejax.offload.policies import POLICIES, make_policy

REPLAYABLE = ("ondemand", "lru", "lfu", "score", "score-sub", "belady")
REPLAY_MODES = ("window", "skip")  # hybrid and similarity need a similarity table


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
        if Path(path).is_file() and Path(path).stat().st_size == 0:
            raise MoejaxError(f"{path} is not a moejax trace (the file is empty)")
        try:
            data = np.load(path)  # never unpickles: a file that is no .npz is refused below
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError
            self.meta = json.loads(str(data["meta"]))
            self.layers = self.meta["layers"]
            self.prefill = {l: data[f"prefill_{l}"] for l in self.layers}
            S = self.meta["steps"]
            self.idx = data["decode_idx"] if S else np.zeros((0, len(self.layers), 1, self.meta["top_k"]), np.int32)
            self.probs = data["decode_probs"] if S else None
        except KeyError as e:
            raise MoejaxError(f"{path} is not a moejax trace (it has no {e.args[0]})") from None
        except (EOFError, zipfile.BadZipFile, zlib.error):
            raise MoejaxError(f"{path} is not a moejax trace (truncated or corrupt)") from None
        except (ValueError, TypeError):  # numpy's message for a non-.npz file suggests unpickling: not repeated
            raise MoejaxError(f"{path} is not a moejax trace (not an .npz file from `moejax trace record`)") from None
        except OSError as e:
            raise MoejaxError(f"{path}: cannot read the trace ({e.strerror or e})") from None
        if cfg is not None:
            from moejax.offload.similarity import fingerprint

            if self.meta["fingerprint"] != fingerprint(cfg):
                raise MoejaxError(f"{path} was recorded with another model")

    @property
    def total_experts(self) -> int:
        return self.meta["num_experts"] * len(self.layers)


NEVER = 2**30  # "not used again" for belady's next-use times


def next_uses(trace: Trace) -> np.ndarray:
    """[T, L, E]: for each decision time t (prefill layers, then decode steps x layers), the
    next time after t that each expert is used (NEVER if it is not): belady's eviction key."""
    L, E = len(trace.layers), trace.meta["num_experts"]
    used = [np.isin(np.arange(E), trace.prefill[l]) for l in trace.layers]
    used += [np.isin(np.arange(E), trace.idx[s, j]) for s in range(trace.idx.shape[0]) for j in range(L)]
    T = len(used)
    out = np.full((T, L, E), NEVER, np.int32)
    nxt = np.full((L, E), NEVER, np.int32)
    for t in range(T - 1, -1, -1):
        out[t] = nxt
        nxt = nxt.copy()
        nxt[t % L if t < L else (t - L) % L][used[t]] = t
    return out


@partial(jax.jit, static_argnums=(0, 1))
def _decode(layout, policy, state, m, idx, probs):
    """One decode step of one layer, as both engines decide it."""
    state, experts, _ = D.substitute_layer(state, policy, m, probs, idx)
    state, _, needed = D.plan_decode(state, layout, policy, m, experts)
    if policy.needs_probs:
        state = D.observe(state, m, probs)
    if not policy.reuse:
        state = D.release(state, layout, m, *needed)
    return state


@partial(jax.jit, static_argnums=(0, 1))
def _prefill_group(layout, policy, state, m, group, ok):
    return D.plan_prefill_group(state, layout, policy, m, group, ok)[0]


def replay(trace: Trace, policy: str, slots: int, per_layer: bool = False, alpha: float = 0.0,
           score_window: int = 16, mode: str = "window") -> dict:
    """Simulate one policy at one pool size with the engines' decisions. mode: "window" or
    "skip" (the substitution modes that need nothing but the routing)."""
    if policy not in REPLAYABLE:
        raise MoejaxError(f"policy {policy!r} cannot be replayed from a trace (replayable: {', '.join(REPLAYABLE)})")
    E, k = trace.meta["num_experts"], trace.meta["top_k"]
    need = min(trace.meta["batch"] * k, E)
    if slots < need:
        raise MoejaxError(f"a pool of {slots} slots is below the {need} one step needs")
    if mode not in REPLAY_MODES:
        raise MoejaxError(f"--substitute {mode!r} cannot be replayed (replayable: {', '.join(REPLAY_MODES)})")
    pol = make_policy(policy, alpha, mode, score_window)
    L = len(trace.layers)
    layout = D.Layout(L, E, slots, per_layer)
    layout.check(need)
    state = D.init_state(layout, score_window)
    future = next_uses(trace) if policy == "belady" else None
    t = 0

    def at(t, state):
        return {**state, "next_use": jnp.asarray(future[t])} if future is not None else state

    G, _ = D.prefill_groups(layout)
    for m, l in enumerate(trace.layers):  # prefill, as the engines: needed experts in id order, in groups
        needed = np.unique(trace.prefill[l]).astype(np.int32)
        for start in range(0, len(needed), G):
            group = np.zeros(G, np.int32)
            part = needed[start:start + G]
            group[: len(part)] = part
            state = _prefill_group(layout, pol, at(t, state), np.int32(m), group, np.arange(G) < len(part))
        if not pol.reuse:
            ids = np.zeros(E, np.int32)
            ids[: len(needed)] = needed
            state = D.release(state, layout, m, jnp.asarray(ids), jnp.arange(E) < len(needed))
        t += 1
    probs = trace.probs if trace.probs is not None else np.zeros((*trace.idx.shape[:3], E), np.float32)
    for s in range(trace.idx.shape[0]):
        for m in range(L):
            state = _decode(layout, pol, at(t, state), np.int32(m), trace.idx[s, m], probs[s, m])
            t += 1
    c = {key: int(v) for key, v in jax.device_get(state["counters"]).items()}
    return {"policy": policy, "pool": "per-layer pool" if per_layer else "shared pool", "slots": slots,
            "slots_per_layer": layout.share if per_layer else None, "share": slots / trace.total_experts,
            "hit_rate": c["hits"] / c["unique"] if c["unique"] else float("nan"), "transfers": c["fetched"],
            "substitution_rate": c["substituted"] / c["routed"] if c["routed"] else 0.0,
            "skip_rate": c["skipped"] / c["routed"] if c["routed"] else 0.0, "substitute": mode,
            "steps": int(trace.idx.shape[0])}


__all__ = ["POLICIES", "REPLAYABLE", "Trace", "TraceRecorder", "replay"]
