#!/usr/bin/env python3
"""Profile one resident decode step on the CPU: where the time of a step goes (docs/benchmarks.md,
"CPU: one decode step, profiled").

Times the step three ways (median over --steps after warm-up): `Model.generate`'s TPOT (what a
user sees), the jitted step called the way generate calls it, and the compiled executable alone
(no Python); then records a `jax.profiler` trace of --steps steps and sums XLA:CPU's thunks per
kind (fusions, dots, the moejax kernels' custom calls, copies) from its perfetto JSON.

    python scripts/profile_step.py --model checkpoints/moejax-shakespeare-moe --dtype bfloat16 \\
        --json docs/results/cpu_profile_step.json
    MOEJAX_CPU_KERNEL=0 python scripts/profile_step.py ...     # without the CPU kernels ("before")

Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np


def median_ms(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def thunk_kinds(trace_dir: str, steps: int, hlo_text: str) -> dict:
    """Per thunk kind (the HLO instruction name without its number): microseconds per step and
    count per step. Custom calls are named by their target."""
    path = sorted(glob.glob(trace_dir + "/**/*.trace.json.gz", recursive=True))[-1]
    ev = json.load(gzip.open(path))
    events = ev["traceEvents"] if isinstance(ev, dict) else ev
    target = dict(re.findall(r"%?(\S+) = \S+ custom-call\(.*custom_call_target=\"(\w+)\"", hlo_text))
    names = set(re.findall(r"^\s*%?([\w.\-]+) = ", hlo_text, re.M))
    kinds = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") != "X" or e["name"].startswith("$"):
            continue
        n = e["name"]
        if n.startswith("ffi_call"):
            kind = "kernel call"
        elif n in names:
            kind = target.get(n) or n.split(".")[0]
        else:
            continue
        kinds[kind][0] += e["dur"] / steps
        kinds[kind][1] += 1 / steps
    return {k: {"us_per_step": round(v[0], 1), "per_step": round(v[1], 1)}
            for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="checkpoints/moejax-shakespeare-moe", help="checkpoint (HF or converted)")
    p.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16")
    p.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    p.add_argument("--json", type=Path, help="write the record here")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import moejax
    from moejax import kernels
    from moejax.generate import bound_steps, cache_length, decode_step
    from moejax.model.decoder import empty_cache

    m = moejax.load(moejax.api.resolve(a.model), dtype=a.dtype)
    ids = (np.arange(a.prompt_len, dtype=np.int32) % m.config.vocab_size + 5)[None]
    m.generate(ids, a.steps + 1, warmup=True)
    tpot = statistics.median(m.generate(ids, a.steps + 1).tpot_ms for _ in range(3))

    S = cache_length(a.prompt_len, a.steps + 1)
    _, step = bound_steps(m)
    tok, key = jnp.zeros(1, jnp.int32), np.asarray(jax.random.PRNGKey(0))
    state = {"cache": empty_cache(m.config, 1, S, m.dtype)}

    def bound():
        t, _, state["cache"] = step(tok, state["cache"], np.int32(a.prompt_len), key, 0.0, 1.0)
        t.block_until_ready()

    def unbound():  # the plain jitted step: graphdef hashed and nnx.State flattened per call
        t, _, state["cache"] = decode_step(m.graphdef, m.state, tok, state["cache"], jnp.int32(a.prompt_len), key,
                                           0.0, 1.0)
        t.block_until_ready()

    compiled = decode_step.lower(m.graphdef, m.state, tok, state["cache"], jnp.int32(0), key, 0.0, 1.0).compile()

    def executable():
        t, _, state["cache"] = compiled(m.state, tok, state["cache"], np.int32(a.prompt_len), key)
        t.block_until_ready()

    for f in (bound, unbound, executable):
        f()
    times = {"generate_tpot": tpot, "bound_step": median_ms(bound, a.steps), "unbound_step": median_ms(unbound, a.steps),
             "executable": median_ms(executable, a.steps)}
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(a.steps):
                executable()
        kinds = thunk_kinds(d, a.steps, compiled.as_text())
    rec = {"date": str(date.today()), "model": a.model, "dtype": a.dtype, "jax": jax.__version__,
           "cpu_kernels": kernels.available(), "load_avg": os.getloadavg(), "cores": os.cpu_count(),
           "ms": {k: round(v, 3) for k, v in times.items()},
           "profiled_us_per_step": {"total": round(sum(v["us_per_step"] for v in kinds.values()), 1), "by_kind": kinds},
           "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    print(json.dumps({k: rec[k] for k in ("model", "dtype", "cpu_kernels", "ms")}))
    for k, v in list(kinds.items())[:12]:
        print(f"  {v['us_per_step']:9.1f} us  x{v['per_step']:5.1f}  {k}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
