#!/usr/bin/env python3
"""Where the fused engine's decode step spends its CPU time, by the function that made each op
(the op_name of the compiled program's instructions: plan_step, prefetch_step, substitute_step,
the expert and attention compute, ...), from a `jax.profiler` trace of --tokens decode steps.
The profiler adds a cost to every op, so the TPOT printed is inflated: read the shares.

    python scripts/profile_fused.py --policy smoe --budget 25% --json docs/results/cpu_profile_fused_smoe.json
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "moejax-shakespeare-moe"))
    p.add_argument("--policy", default="smoe")
    p.add_argument("--budget", default="25%")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    import jax

    from moejax import api
    from moejax.bench import machine
    from moejax.engine import make_engine
    from moejax.offload.budget import parse_budget

    path = api.resolve(Path(a.model))
    e = make_engine("fused", path, a.policy, parse_budget(a.budget), batch=a.batch, cache_len=a.tokens + 32,
                    alpha=a.alpha)
    prompt = (np.arange(16, dtype=np.int32)[None] + 100).repeat(a.batch, 0)
    e.generate(prompt, a.tokens, warmup=True)
    (program,) = [c for k, c in e.compiled_programs.items() if k[0] == "decode"]
    source = {}  # instruction name -> the function that made it (the op_name's first two levels)
    for line in program.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if m:
            parts = [s for s in m.group(2).split("/") if s not in ("while", "body", "cond")]
            source[m.group(1)] = re.sub(r"\[[^\]]*\]", "", "/".join(parts[1:3])) or "(top)"
    e.reset()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            g = e.generate(prompt, a.tokens)
        (trace,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace))["traceEvents"]
    us, ops = collections.Counter(), collections.Counter()
    for ev in events:
        if ev.get("ph") == "X" and ev.get("name") in source:
            us[source[ev["name"]]] += ev["dur"] / a.tokens
            ops[source[ev["name"]]] += 1 / a.tokens
    total = sum(us.values())
    rows = [{"source": k, "us_per_token": v, "share": v / total, "ops_per_token": ops[k]} for k, v in us.most_common()]
    print(f"{a.policy} at {a.budget}, batch {a.batch}: TPOT under the profiler {g.tpot_ms:.2f} ms; "
          f"ops {sum(ops.values()):.0f} per token, {total:.0f} us")
    for r in rows[:12]:
        print(f"{r['share']:6.1%} {r['us_per_token']:8.1f} us {r['ops_per_token']:6.1f} ops  {r['source']}")
    if a.json:
        a.json.write_text(json.dumps({**machine(), "args": {k: str(v) for k, v in vars(a).items()},
                                      "tpot_ms_under_profiler": g.tpot_ms, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
