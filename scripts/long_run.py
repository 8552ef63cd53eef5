"""A long decode through the offloaded engine: does anything grow with the number of tokens?

    python scripts/long_run.py --tokens 2000 --json docs/results/cpu_long_run.json

The engine `moejax decode --vram-budget 25% --policy smoe` builds (fused by default), on the
bundled model; the run ignores the stop token so that it decodes every step asked for. After
every `--every` tokens (counted as `decode` counts them: the prefill's token is the first),
inside the per-token callback and after a garbage collection, it records:
  * host RSS (/proc/self/statm resident pages x page size);
  * jax.live_arrays(): how many, and their bytes, split into device memory and host memory
    (the pinned_host expert stacks are live arrays too);
  * the engine's own account of its device arrays (`device_bytes()`), its compiled programs;
  * the length of every list, dict, set and tuple the engine and its Telemetry hold.
Check: RSS and live device bytes at the last mark within 2% of those at `--check-from`
(token 200). The generation loop itself keeps one token and one step time per step (the
output and its timing); the lengths above show what the engine keeps.

A prompt plus `--tokens` must fit the model's context (max_position_embeddings: 2048 for the
bundled model); the script refuses more.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = resource.getpagesize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def live_arrays() -> dict:
    """Count and bytes of every live jax array, by memory kind (device / pinned_host / ...)."""
    import jax

    out = {"count": 0, "bytes": 0, "by_kind": {}}
    for a in jax.live_arrays():
        kind = getattr(a.sharding, "memory_kind", None) or "device"
        k = out["by_kind"].setdefault(kind, {"count": 0, "bytes": 0})
        k["count"] += 1
        k["bytes"] += a.nbytes
        out["count"] += 1
        out["bytes"] += a.nbytes
    return out


def containers(engine) -> dict[str, int]:
    """Length of every list, dict, set and tuple attribute of the engine and of its Telemetry."""
    sizes = {}
    for prefix, obj in (("engine", engine), ("telemetry", engine._t)):
        for name, v in vars(obj).items():
            if isinstance(v, (list, dict, set, tuple)):
                sizes[f"{prefix}.{name}"] = len(v)
    return sizes


def snapshot(engine, tokens: int) -> dict:
    gc.collect()
    return {"tokens": tokens, "rss_bytes": rss_bytes(), "live": live_arrays(),
            "engine_device_bytes": engine.device_bytes(),
            "compiled_programs": len(getattr(engine, "compiled_programs", {})),
            "containers": containers(engine)}


def run(path, policy: str, budget: str, tokens: int, every: int, engine_kind: str = "fused", alpha: float = 0.3,
        prompt: str = "ROMEO:", batch: int = 1, stop: bool = False) -> tuple[list[dict], dict]:
    """Decode `tokens` tokens and snapshot after every `every` -> (snapshots, run info)."""
    import numpy as np

    from moejax import checkpoint
    from moejax.api import load_tokenizer, resolve
    from moejax.engine import make_engine
    from moejax.generate import cache_length
    from moejax.offload.budget import parse_budget

    given_path, path = path, resolve(path)
    cfg, _ = checkpoint.read_meta(path)
    tok = load_tokenizer(path)
    ids = tok.encode(prompt).ids if tok is not None else [1, 2, 3]
    if len(ids) + tokens > cfg.max_position_embeddings:
        raise SystemExit(f"error: prompt ({len(ids)} tokens) + {tokens} exceeds the model's context of "
                         f"{cfg.max_position_embeddings}")
    S = cache_length(len(ids), tokens)
    engine = make_engine(engine_kind, path, policy, parse_budget(budget), batch=batch, cache_len=S,
                         alpha=alpha if policy in ("score-sub", "smoe") else 0.0)
    if hasattr(engine, "prepare"):
        engine.prepare(len(ids))
    shots, n = [], 0

    def on_token(_):
        nonlocal n
        n += 1
        if n % every == 0 or n == tokens:
            shots.append(snapshot(engine, n))

    t0 = time.perf_counter()
    g = engine.generate(np.array([ids] * batch), tokens, warmup=True, on_token=on_token,
                        stop_ids=cfg.eos_token_ids if stop else ())
    wall = time.perf_counter() - t0
    t = engine.telemetry
    given = Path(given_path)
    info = {"model": os.path.relpath(given, ROOT) if given.is_absolute() and ROOT in given.parents else str(given),
            "converted": str(path), "prompt": prompt, "prompt_tokens": len(ids), "tokens": len(g.tokens[0]),
            "context": cfg.max_position_embeddings, "cache_len": S, "engine": engine_kind, "policy": policy,
            "budget": budget, "alpha": alpha, "plan": engine.plan.describe(), "wall_s": wall,
            "tpot_ms": g.tpot_ms, "hit_rate": t.hit_rate, "substitution_rate": t.substitution_rate,
            "after_run": {"telemetry.step_s": len(t.step_s), "telemetry.sched_us": len(t.sched_us),
                          "containers": containers(engine)}}
    return shots, info


def growth(a: dict, b: dict) -> dict:
    """Relative change from snapshot a to snapshot b of RSS and live bytes."""
    rel = lambda x, y: (y - x) / x if x else 0.0  # noqa: E731
    return {"rss": rel(a["rss_bytes"], b["rss_bytes"]), "live_bytes": rel(a["live"]["bytes"], b["live"]["bytes"]),
            "live_device_bytes": rel(a["live"]["by_kind"].get("device", {}).get("bytes", 0),
                                     b["live"]["by_kind"].get("device", {}).get("bytes", 0)),
            "live_count": b["live"]["count"] - a["live"]["count"],
            "engine_device_bytes": rel(a["engine_device_bytes"], b["engine_device_bytes"]),
            "containers_grown": {k: (a["containers"].get(k), v) for k, v in b["containers"].items()
                                 if v != a["containers"].get(k)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "moejax-shakespeare-moe"))
    p.add_argument("--policy", default="smoe")
    p.add_argument("--vram-budget", default="25%")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--engine", default="fused", choices=["fused", "stepwise"])
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--check-from", type=int, default=200, help="the reference mark (tokens)")
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.json and not a.json.parent.is_dir():
        p.error(f"--json: directory {a.json.parent} does not exist")

    from moejax.api import enable_compile_cache
    from moejax.bench import machine

    enable_compile_cache()
    shots, info = run(a.model, a.policy, a.vram_budget, a.tokens, a.every, a.engine, a.alpha, a.prompt)
    ref = next(s for s in shots if s["tokens"] == a.check_from)
    last = shots[-1]
    g = growth(ref, last)
    ok = abs(g["rss"]) <= a.tolerance and abs(g["live_device_bytes"]) <= a.tolerance
    for s in shots:
        dev = s["live"]["by_kind"].get("device", {"count": 0, "bytes": 0})
        print(f"token {s['tokens']:5d}: RSS {s['rss_bytes'] / 2**20:8.1f} MiB | live arrays {s['live']['count']} "
              f"({s['live']['bytes'] / 2**20:.2f} MiB; device {dev['count']}, {dev['bytes'] / 2**20:.2f} MiB) | "
              f"engine device bytes {s['engine_device_bytes'] / 2**20:.2f} MiB", file=sys.stderr)
    print(f"{info['tokens']} tokens, {info['engine']} engine, {info['policy']} at {info['budget']}: from token "
          f"{ref['tokens']} to {last['tokens']}: RSS {100 * g['rss']:+.2f}%, live device bytes "
          f"{100 * g['live_device_bytes']:+.2f}%, live arrays {g['live_count']:+d}, engine containers grown: "
          f"{g['containers_grown'] or 'none'} -> {'OK' if ok else 'GROWTH'} (tolerance {100 * a.tolerance:g}%)")
    if a.json:
        command = "python scripts/long_run.py " + " ".join(sys.argv[1:] if argv is None else argv)
        out = {**machine(), "command": command, "load_avg_1min": os.getloadavg()[0], **info,
               "check": {"from": ref["tokens"], "to": last["tokens"], "tolerance": a.tolerance, "ok": ok, **g},
               "snapshots": shots}
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
