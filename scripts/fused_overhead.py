#!/usr/bin/env python3
"""Fused engine at a 100% budget against the resident model, bundled model, batch 1: TPOT of
both (40 tokens after warm-up), then the fused engine's `step` and its compiled decode program
called directly (median of 50), to separate Python around the step from the program.

    python scripts/fused_overhead.py
"""
import statistics
import time

import jax
import numpy as np

import moejax
from moejax.engine import make_engine

p = moejax.api.resolve("checkpoints/moejax-shakespeare-moe")
m = moejax.load(p)
e = make_engine("fused", p, "lru", ("pct", 1.0), batch=1, cache_len=128)
ids = np.arange(5, 21, dtype=np.int32)[None]
e.generate(ids, 40, warmup=True)
fused = e.generate(ids, 40).tpot_ms
m.generate(ids, 40, warmup=True)
resident = m.generate(ids, 40).tpot_ms
key, tok = np.asarray(jax.random.PRNGKey(0)), np.zeros(1, np.int32)


def median_ms(fn):
    ts = []
    for i in range(50):
        t = time.perf_counter()
        jax.block_until_ready(fn(i))
        ts.append(time.perf_counter() - t)
    return round(1e3 * statistics.median(ts), 3)


step = median_ms(lambda i: e.step(tok, 20 + i % 20, key))
program = next(v for k, v in e.compiled_programs.items() if k[0] == "decode")


def call(i):
    out = program(*e._args(tok, 20, key))
    _, _, e.pool, kv, e.state = out
    e.kv = list(kv)
    return out


print({"fused_tpot_ms": round(fused, 3), "resident_tpot_ms": round(resident, 3), "ratio": round(fused / resident, 2),
       "fused_step_ms": step, "fused_program_ms": median_ms(call)})
