#!/usr/bin/env python3
"""Prefill expert dispatch on the CPU, by measurement (issue 15, item 4; docs/benchmarks.md).

One MoE layer's routed experts for N prompt tokens, three formulations with the same result:
  kernel:  moejax's CPU kernel (`moe.experts_ordered`): each expert computes only the tokens
           routed to it, in groups of up to 16 tokens that read its weights once;
  dense:   the jnp loop over every expert computing every token, masked by the routing
           weights (`moe._ordered_jnp`, what the GPU path runs): E/k times the arithmetic;
  einsum:  every expert on every token as two batched einsums, then the weighted sum.
Median of --trials calls after warm-up, per N; JSON with every time.

    python scripts/prefill_dispatch.py --json docs/results/cpu_prefill_dispatch.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

SHAPES = {"bundled": (192, 64, 32, 4), "medium": (768, 384, 32, 4)}  # H, I, E, k


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="8,32,128,512", help="prompt lengths N")
    p.add_argument("--shapes", default="bundled,medium", help=f"expert shapes: {', '.join(SHAPES)}")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from moejax.model import moe

    def einsum(x, stack, idx, w):
        E = stack.shape[0]
        dense_w = jnp.zeros((x.shape[0], E), jnp.float32).at[jnp.arange(x.shape[0])[:, None], idx].add(w)
        h = jax.nn.silu(jnp.einsum("nh,ehi->eni", x, stack[:, 0])) * jnp.einsum("nh,ehi->eni", x, stack[:, 1])
        y = jnp.einsum("eni,ehi->enh", h, stack[:, 2])
        return jnp.einsum("enh,ne->nh", y, dense_w.astype(y.dtype))

    rng = np.random.default_rng(0)
    records = []
    for shape in a.shapes.split(","):
        H, I, E, k = SHAPES[shape]
        for dt in a.dtypes.split(","):
            stack = jnp.asarray(rng.standard_normal((E, 3, H, I)) / np.sqrt(H), dt)
            ids = jnp.arange(E, dtype=jnp.int32)
            for N in map(int, a.tokens.split(",")):
                x = jnp.asarray(rng.standard_normal((N, H)), dt)
                idx = jnp.asarray(np.stack([rng.permutation(E)[:k] for _ in range(N)]), jnp.int32)
                w = jnp.asarray(rng.random((N, k)), jnp.float32)
                acc = jnp.zeros((N, H), dt)
                fns = {
                    "kernel": jax.jit(lambda x, s, i, w, c: moe.experts_ordered(x, s, ids, ids, jnp.ones(E, bool), i, w, c)),
                    "dense": jax.jit(lambda x, s, i, w, c: moe._ordered_jnp(x, s, ids, ids, jnp.ones(E, bool), i, w, c,
                                                                          None)),
                    "einsum": jax.jit(lambda x, s, i, w, c: einsum(x, s, i, w)),
                }
                times = {}
                for name, f in fns.items():
                    f(x, stack, idx, w, acc).block_until_ready()
                    ts = []
                    for _ in range(a.trials):
                        t = time.perf_counter()
                        f(x, stack, idx, w, acc).block_until_ready()
                        ts.append(1e3 * (time.perf_counter() - t))
                    times[name] = ts
                med = {n: round(statistics.median(v), 3) for n, v in times.items()}
                print(f"{shape} {dt} N={N}: ms {med}", file=sys.stderr)
                records.append({"shape": shape, "H": H, "I": I, "E": E, "k": k, "dtype": dt, "tokens": N,
                                "median_ms": med, "trials_ms": times})
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"date": str(date.today()), "jax": jax.__version__, "cores": os.cpu_count(),
                                      "load_avg": os.getloadavg(), "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
