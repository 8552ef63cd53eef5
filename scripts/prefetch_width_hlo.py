#!/usr/bin/env python3
"""Where XLA:GPU schedules the fused engine's prefetch copies, per --prefetch-width, on a
machine without a GPU: each decode program compiled for an H200 (scripts/gpu_hlo.py), then for
every asynchronous host -> device copy the instructions scheduled between its start and its
done, split into copies at the step's top level and copies inside a fetch loop's body.

    python scripts/prefetch_width_hlo.py --h200-plugin /tmp/h200plugin \\
        --runs smoe:1:0,smoe:1:1,smoe:1:2,smoe:3:0,smoe:3:2,smoe:3:4 --json docs/results/h200_hlo_prefetch_width.json

(--runs: policy:batch:width; bundled model, 25% budget, alpha 0.3, fetch mode loop. The plugin:
pip install --no-deps --target DIR jax-cuda12-plugin==<jax version> jax-cuda12-pjrt==<jax version>.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--h200-plugin", type=Path, required=True)
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "moejax-shakespeare-moe"))
    p.add_argument("--runs", default="smoe:1:0,smoe:1:1,smoe:1:2")
    p.add_argument("--budget", default="25%")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    sys.path.insert(0, str(a.h200_plugin.resolve()))
    sys.path.insert(0, str(ROOT / "scripts"))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    import jax
    import numpy as np
    from fetch_modes import async_h2d_copies, h200_hlo_check, parse_hlo
    from gpu_hlo import h200_hlo

    from moejax import api
    from moejax.bench import machine
    from moejax.engine import make_engine
    from moejax.generate import NO_HOIST
    from moejax.offload.budget import parse_budget

    path, rows = api.resolve(Path(a.model)), []
    for run in a.runs.split(","):
        policy, batch, width = run.split(":")
        batch, width = int(batch), int(width)
        e = make_engine("fused", path, policy, parse_budget(a.budget), batch=batch, cache_len=64, alpha=a.alpha,
                        prefetch_width=width)
        t0 = time.perf_counter()
        text = h200_hlo(jax.jit(e._decode_fn(0.0, 1.0), donate_argnums=(2, 3, 4), compiler_options=NO_HOIST),
                        *e._decode_args(np.zeros(batch, np.int32), 0))
        compile_s = time.perf_counter() - t0
        check, cs = h200_hlo_check(text, tuple(e.pool.shape)), async_h2d_copies(parse_hlo(text))
        loop_size = min(c["computation_size"] for c in cs)  # the fetch loops' bodies are the smallest
        top = [c["between"] for c in cs if c["computation_size"] > loop_size]
        rows.append({"policy": policy, "batch": batch, "prefetch_width": width, "compile_s": round(compile_s, 1),
                     "step": check["per_step"], "pool_shaped_copies": check["pool_shaped_copies"],
                     "host_compute_ops": check["host_compute_ops"],
                     "top_level_copies_between": [len(b) for b in top],
                     # fetch loops (this layer's misses) among them: a copy that spans one shares the link
                     "top_level_copies_loops_between": [b.count("while") for b in top],
                     "loop_copies_between": [len(c["between"]) for c in cs if c["computation_size"] == loop_size]})
        r = rows[-1]
        print(f"{policy} batch {batch} width {width}: {r['step']['ops']} instructions per step, "
              f"{r['step']['loops']} loops; top-level copies with instructions between start and done: "
              f"{r['top_level_copies_between']}; in loops: {r['loop_copies_between']}", flush=True)
    if a.json:
        a.json.write_text(json.dumps({**machine(), "command": "python scripts/prefetch_width_hlo.py " + " ".join(
            sys.argv[1:] if argv is None else argv), "budget": a.budget, "alpha": a.alpha, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
