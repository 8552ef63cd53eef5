#!/usr/bin/env python3
"""Bytes per second of the CPU kernels (moejax/kernels) at decode size, against a plain read.

One token (N = 1) through L layers' worth of distinct weights (more than the last-level cache),
jitted as one program: the routed-expert kernel (k experts of an E-expert stack per layer, in
float32, bfloat16 and int8), the linear kernel (w [H, O], several O), and `jnp.sum` over a
256 MiB array as the machine's read bandwidth. Median of --reps calls after a warm-up, each
synchronised with block_until_ready. A benchmark, not a test: run it on an idle machine.

    python scripts/kernel_bandwidth.py --json out/kernel_bandwidth.json
"""
import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.model import moe
from moejax.model.layers import linear
from moejax.quant import Quant, quantize


def median_s(fn, *args, reps):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--inter", type=int, default=384, help="routed expert width")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--outs", default="768,3072", help="linear output widths")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)
    H, I, E, k, L = a.hidden, a.inter, a.experts, a.top_k, a.layers
    rng = np.random.default_rng(0)
    rows = []
    for kind in ("float32", "bfloat16", "int8"):
        dt = jnp.float32 if kind == "float32" else jnp.bfloat16
        q = Quant("int8", 0, H, I) if kind == "int8" else None
        x = jnp.asarray(rng.standard_normal((1, H)), dt)
        ids = [jnp.asarray(rng.permutation(E)[:k][None], jnp.int32) for _ in range(L)]
        w = jnp.full((1, k), 1.0 / k, jnp.float32)
        stacks = []
        for _ in range(L):
            s = rng.standard_normal((E, 3, H, I)).astype(np.float32) / np.sqrt(H)
            stacks.append(jnp.asarray(quantize(s, q)) if q else jnp.asarray(s, dt))
        f = jax.jit(lambda x, s, i, w: sum(moe.experts_indexed(x, s[j], i[j], w, q) for j in range(L)))
        t = median_s(f, x, stacks, ids, w, reps=a.reps)
        per_expert = q.nbytes if q else 3 * H * I * jnp.dtype(dt).itemsize
        rows.append({"kernel": "experts", "dtype": kind, "shape": [H, I], "ms": t * 1e3,
                     "gb_per_s": L * k * per_expert / t / 1e9})
        del stacks
        if kind == "int8":
            continue
        for O in map(int, a.outs.split(",")):
            n = max(1, (L * k * 3 * H * I) // (H * O))  # about the experts' weight count
            ws = [jnp.asarray(rng.standard_normal((H, O)) / np.sqrt(H), dt) for _ in range(n)]
            g = jax.jit(lambda x, W: sum(linear(x, m)[:, :8] for m in W))
            t = median_s(g, x, ws, reps=a.reps)
            rows.append({"kernel": "linear", "dtype": kind, "shape": [H, O], "ms": t * 1e3,
                         "gb_per_s": n * H * O * jnp.dtype(dt).itemsize / t / 1e9})
    big = jnp.asarray(rng.standard_normal((64 << 20)), jnp.float32)
    t = median_s(jax.jit(jnp.sum), big, reps=a.reps)
    rows.append({"kernel": "jnp.sum (read)", "dtype": "float32", "shape": [64 << 20], "ms": t * 1e3,
                 "gb_per_s": big.nbytes / t / 1e9})
    for r in rows:
        print(f"{r['kernel']:>15} {r['dtype']:>9} {str(r['shape']):>12} {r['ms']:8.2f} ms {r['gb_per_s']:6.2f} GB/s")
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} cores", "loadavg": os.getloadavg(), "jax": jax.__version__, "args": vars(a) | {"json": str(a.json)}}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
