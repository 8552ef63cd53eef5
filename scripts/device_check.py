"""Measurements for docs/benchmarks.md on a machine with an accelerator, in one run.

    python scripts/device_check.py --out DIR [--bench-model DIR]

1. the device and its memory kinds (is `pinned_host` there?);
2. host -> device bandwidth of `jax.device_put` from pinned host memory and from numpy
   (pageable), by transfer size;
3. transfer/compute overlap (scripts/overlap_probe.py): expert-sized transfers and a chain
   of matmuls, alone and started together, from one thread and from two;
4. exactness of the offloaded engine against the resident model on this device;
5. the policy benchmark for real (no link emulation) on a random 4-layer model with 32
   Qwen1.5-MoE-sized experts per layer ([3, 2048, 1408], 17.3 MB in bfloat16), and on
   --bench-model if given.
Every part writes its own JSON file under --out, so a part that fails does not lose the rest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np


def part(out: Path, name: str, fn) -> None:
    t = time.perf_counter()
    try:
        result = fn()
        status = "ok"
    except Exception as e:  # a device check reports, it does not stop the others
        result, status = {"error": repr(e), "traceback": traceback.format_exc()}, "failed"
    result = {"status": status, "seconds": time.perf_counter() - t, **result}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"[{name}] {status} in {result['seconds']:.1f} s", flush=True)


def device_info():
    import jax

    d = jax.devices()[0]
    return {"jax": jax.__version__, "device": str(d), "kind": d.device_kind, "platform": d.platform,
            "memories": [m.kind for m in d.addressable_memories()]}


def _time(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bandwidth():
    import jax

    d = jax.devices()[0]
    dev = jax.sharding.SingleDeviceSharding(d)
    pinned = jax.sharding.SingleDeviceSharding(d, memory_kind="pinned_host")
    rows = []
    for mib in (1, 4, 16, 64, 256, 1024):
        host = np.random.default_rng(0).standard_normal(mib * 2**18).astype(np.float32)  # mib MiB
        hp = jax.device_put(host, pinned)
        hp.block_until_ready()
        for src_name, src in (("pinned_host", hp), ("numpy", host)):
            jax.device_put(src, dev).block_until_ready()  # warm-up
            s = _time(lambda: jax.device_put(src, dev).block_until_ready(), 5)
            rows.append({"MiB": mib, "source": src_name, "seconds": s, "GB_per_s": mib * 2**20 / s / 1e9})
    return {"rows": rows}


def overlap():
    from overlap_probe import measure  # scripts/ is on sys.path when this script runs

    return measure()


def random_checkpoint(root: Path, hidden, layers, experts, top_k, width, shared, dtype):
    """A moejax checkpoint with random weights, written directly (no HF model needed)."""
    import ml_dtypes

    from moejax import checkpoint
    from moejax.config import MoEConfig
    from moejax.model.params import random_params

    cfg = MoEConfig(model_type="qwen2_moe", vocab_size=32000, hidden_size=hidden, num_layers=layers,
                    num_heads=16, num_kv_heads=16, head_dim=hidden // 16, rope_theta=1e6, rms_norm_eps=1e-6,
                    max_position_embeddings=4096, num_experts=experts, top_k=top_k, moe_intermediate_size=width,
                    norm_topk_prob=False, moe_layers=(True,) * layers, shared_intermediate_size=shared,
                    shared_expert_gate=True, qkv_bias=True)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    glob, lays = random_params(cfg, seed=0, dtype=np_dtype)
    # a router with some structure, so routing is not uniform noise
    rng = np.random.default_rng(1)
    for p in lays:
        p["router"] = (rng.standard_normal(p["router"].shape) * 0.5).astype(np_dtype)
    root.mkdir(parents=True, exist_ok=True)
    checkpoint.save_item(root, "global", glob)
    for i, p in enumerate(lays):
        checkpoint.save_item(root, checkpoint.layer_name(i), p)
    checkpoint.write_meta(root, cfg, dtype)
    return cfg


def exactness(model_dir: Path):
    import moejax
    from moejax.engine import ENGINES, make_engine

    m = moejax.load(model_dir)
    prompt = np.random.default_rng(0).integers(0, m.config.vocab_size, (1, 16))
    ref = m.generate(prompt, 16).tokens
    rows = []
    for kind in ENGINES:
        for policy in ("ondemand", "lru", "lfu", "lru-prefetch", "score", "smoe"):
            for pct in (1.0, 0.25):
                e = make_engine(kind, model_dir, policy, ("pct", pct), cache_len=64)
                g = e.generate(prompt, 16)
                rows.append({"engine": kind, "policy": policy, "pct": pct, "tokens_equal": g.tokens == ref,
                             "hit_rate": e.telemetry.hit_rate,
                             "peak_le_budget": e.telemetry.peak_device_bytes <= e.plan.budget_bytes})
    return {"rows": rows, "all_equal": all(r["tokens_equal"] for r in rows)}


def bench(model_dir: Path, alpha: float, batches, trials: int, new_tokens: int):
    from moejax.bench import machine, markdown, run_bench

    policies = ["resident", "ondemand", "lru", "lfu", "lru-prefetch", "score", "score-sub", "smoe"]
    budgets = [("25%", ("pct", 0.25)), ("50%", ("pct", 0.5))]
    records = run_bench(model_dir, budgets, batches, policies, new_tokens, 16, trials,
                        dict(alpha=alpha, substitute="window", similarity=None, score_window=16), progress=False,
                        engines=("fused", "stepwise"))
    return {"meta": machine(), "alpha": alpha, "records": records, "markdown": markdown(records)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bench-model", type=Path)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--skip", default="", help="comma-separated parts to skip")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    skip = set(a.skip.split(","))
    part(a.out, "device", device_info)
    if "bandwidth" not in skip:
        part(a.out, "bandwidth", bandwidth)
    if "overlap" not in skip:
        part(a.out, "overlap", overlap)
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small"
        random_checkpoint(small, 256, 4, 16, 4, 128, 256, "float32")
        if "exactness" not in skip:
            part(a.out, "exactness", lambda: exactness(small))
        if "bench" not in skip:
            big = Path(tmp) / "qwen15-sized"
            random_checkpoint(big, 2048, 4, 32, 4, 1408, 5632, "bfloat16")
            part(a.out, "bench_qwen15_sized", lambda: bench(big, a.alpha, [1, 3], a.trials, 32))
            if a.bench_model:
                part(a.out, "bench_model", lambda: bench(a.bench_model, a.alpha, [1, 3], a.trials, 32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
