#!/usr/bin/env python3
"""Fused engine at a 100% budget (or --budget) against the resident model, bundled model
(docs/benchmarks.md, "Engine overhead with every expert resident"), batch 1 and 3, in one process.

TPOT: `generate` of --new-tokens after a 16-token prompt, for each engine in turn, --rounds
times with the order rotating every round (so drift of a shared machine hits all alike); the
ratio fused / resident is taken within each round, and its median and spread are reported.
Then, to split the fused step: the compiled decode program called directly, the engine's
`step`, and the resident model's bound decode step called directly (medians of blocks of 10
steps, blocks interleaved; wall time and the calling thread's CPU time). --before COMMIT also
runs that commit's moejax/fused.py (loaded from git into a scratch module) side by side, for a
before/after in the same run.

    python scripts/fused_overhead.py --batch 1,3 --rounds 20 --before 279dda1 \
        --json docs/results/cpu_fused_overhead.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np


def load_fused_at(commit: str):
    """moejax/fused.py as it was at `commit`, as a scratch module (its FusedEngine)."""
    src = subprocess.run(["git", "show", f"{commit}:moejax/fused.py"], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / f"fused_{commit}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"fused_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FusedEngine


def spread(values) -> dict:
    v = np.asarray(values, float)
    return {"median": round(float(np.median(v)), 3), "q25": round(float(np.percentile(v, 25)), 3),
            "q75": round(float(np.percentile(v, 75)), 3), "min": round(float(v.min()), 3),
            "max": round(float(v.max()), 3)}


def direct_ms(fns: dict, blocks: int, block: int = 10) -> tuple[dict, dict]:
    """({name: median wall ms of one synchronised call}, {name: median CPU ms of the calling
    thread per call}): blocks of `block` calls, names rotating. The calling thread's CPU time
    (Python, dispatch, argument and result buffers, the part of the program XLA runs on the
    caller) hardly depends on what else the machine runs; wall time does."""
    ts = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    names = list(fns)
    for b in range(blocks):
        for k in names[b % len(names):] + names[:b % len(names)]:
            for i in range(block):
                t, c = time.perf_counter(), time.thread_time()
                np.array(fns[k](i))
                ts[k].append(time.perf_counter() - t)
                cpu[k].append(time.thread_time() - c)
    med = lambda d: {k: round(1e3 * statistics.median(v), 3) for k, v in d.items()}  # noqa: E731
    return med(ts), med(cpu)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="checkpoints/moejax-shakespeare-moe")
    p.add_argument("--batch", default="1,3", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=15, help="interleaved generate rounds per batch")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--policy", default="lru", help="the fused engine's policy (at 100%% nothing is evicted)")
    p.add_argument("--budget", type=float, default=100.0, help="--vram-budget in percent")
    p.add_argument("--alpha", type=float, default=0.0, help="the policy's alpha (smoe: substitution)")
    p.add_argument("--before", help="a commit whose moejax/fused.py runs beside the current one")
    p.add_argument("--json", type=Path, help="write the record here")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import moejax
    from moejax import kernels
    from moejax.api import load_tokenizer
    from moejax.bench import prompt_tokens
    from moejax.engine import load_parts
    from moejax.fused import FusedEngine
    from moejax.generate import bound_steps, cache_length, empty_cache

    path = moejax.api.resolve(a.model)
    model = moejax.load(path)
    parts = load_parts(path)
    classes = {"fused": FusedEngine}
    if a.before:
        classes[f"fused@{a.before}"] = load_fused_at(a.before)
    S = cache_length(a.prompt_len, a.new_tokens)
    key = np.asarray(jax.random.PRNGKey(0))
    rec = {"date": datetime.now().isoformat(timespec="minutes"), "model": a.model, "jax": jax.__version__,
           "cpu_kernels": kernels.available(), "cores": os.cpu_count(), "load_avg_start": os.getloadavg(),
           "policy": a.policy, "budget": f"{a.budget:g}%", "alpha": a.alpha, "new_tokens": a.new_tokens,
           "prompt_len": a.prompt_len,
           "rounds": a.rounds, "command": " ".join(["python scripts/fused_overhead.py", *(argv or sys.argv[1:])]),
           "batches": {}}
    for batch in [int(b) for b in a.batch.split(",")]:
        prompt = prompt_tokens(load_tokenizer(path), model.config.vocab_size, batch, a.prompt_len)
        engines = {name: cls(path, a.policy, ("pct", a.budget / 100), batch=batch, cache_len=S, parts=parts,
                              alpha=a.alpha)
                   for name, cls in classes.items()}
        run = {"resident": lambda: model.generate(prompt, a.new_tokens)}
        run.update({name: (lambda e=e: e.generate(prompt, a.new_tokens)) for name, e in engines.items()})
        model.generate(prompt, a.new_tokens, warmup=True)
        for e in engines.values():
            e.generate(prompt, a.new_tokens, warmup=True)
        names, rounds = list(run), []
        for r in range(a.rounds):
            row = {}
            for name in names[r % len(names):] + names[:r % len(names)]:
                g = run[name]()
                row[name] = {"tpot_ms": round(g.tpot_ms, 3), "median_step_ms": round(1e3 * float(np.median(g.step_s)), 3)}
            rounds.append(row)
        out = {"tpot_ms": {n: spread([r[n]["tpot_ms"] for r in rounds]) for n in names},
               "median_step_ms": {n: spread([r[n]["median_step_ms"] for r in rounds]) for n in names},
               "ratio_to_resident": {n: spread([r[n]["tpot_ms"] / r["resident"]["tpot_ms"] for r in rounds])
                                     for n in names if n != "resident"},
               "rounds": rounds}

        # the split: resident bound step, each fused engine's `step` and its compiled program, called directly
        _, decode = bound_steps(model)
        st = {"cache": empty_cache(model.config, batch, S, model.dtype), "tok": jnp.zeros(batch, jnp.int32)}

        def resident_step(i):
            st["tok"], _, st["cache"] = decode(st["tok"], st["cache"], np.int32(a.prompt_len + i), key, 0.0, 1.0)
            return st["tok"]

        fns = {"resident bound step": resident_step}
        for name, e in engines.items():
            e.reset()
            if hasattr(e, "_decode_args"):  # since dff11b1 the one-step program is another than generate's
                e.prepare(a.prompt_len, chunk=1)
            program = next(v for k, v in e.compiled_programs.items()
                           if k[0] == "decode" and (not hasattr(e, "_decode_args") or k[1][2] == (1, 2)))
            toks = {"step": jnp.zeros(batch, jnp.int32), "program": jnp.zeros(batch, jnp.int32)}

            def step(i, e=e, toks=toks):
                toks["step"] = e.step(toks["step"], a.prompt_len + i, key)[0]
                return toks["step"]

            def call(i, e=e, toks=toks, program=program):
                chunked = hasattr(e, "_decode_args")  # since dff11b1: (tokens, last token, logits, ...)
                args = list(e._decode_args(toks["program"], a.prompt_len + i, key.reshape(1, 2)) if chunked else
                            e._args(toks["program"], a.prompt_len + i, key))
                args[5] = toks["program"]  # a device token, as `generate` passes it
                res = program(*args)
                toks["program"], _, e.pool, kv, e._packed = res[1:] if chunked else res
                e.kv = list(kv)
                return toks["program"]

            fns[f"{name} step"] = step
            fns[f"{name} program"] = call
        out["direct_ms"], out["direct_main_thread_cpu_ms"] = direct_ms(fns, blocks=4 * len(fns))
        rec["batches"][str(batch)] = out
        print(json.dumps({"batch": batch, "tpot_ms": {n: v["median"] for n, v in out["tpot_ms"].items()},
                          "ratio_to_resident": out["ratio_to_resident"], "direct_ms": out["direct_ms"],
                          "direct_main_thread_cpu_ms": out["direct_main_thread_cpu_ms"]}), flush=True)
    rec["load_avg_end"] = os.getloadavg()
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
