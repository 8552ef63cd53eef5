"""Quantized experts against substitution at the same budget in bytes (issue 14).

Every configuration gets the same --vram-budget in bytes (default: what the bfloat16 model
needs for a pool of 25% of its experts with smoe on the stepwise engine) and the same link
(the bfloat16 model's emulated paper link, so a quantized expert moves in proportionally less
time). Accuracy is decode-mode (moejax/eval/ppl.py) against the bfloat16 resident model;
TPOT from greedy generations, trials interleaved across configurations.

    python scripts/quant_equal_bytes.py --bf16 DIR --int8 DIR --int4 DIR \
        --text data/shakespeare/macbeth.txt --json docs/results/quant_equal_bytes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import date

import numpy as np

# (label, model key, policy, alpha)
CONFIGS = [("bf16 + lru", "bf16", "lru", 0.0), ("bf16 + smoe a0.3", "bf16", "smoe", 0.3),
           ("int8 + lru", "int8", "lru", 0.0), ("int8 + smoe a0.3", "int8", "smoe", 0.3),
           ("int4 + smoe a0.3", "int4", "smoe", 0.3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bf16", required=True, help="converted bfloat16 checkpoint (the reference)")
    ap.add_argument("--int8", required=True, help="the same model converted with --experts int8")
    ap.add_argument("--int4", required=True, help="the same model converted with --experts int4")
    ap.add_argument("--text", required=True)
    ap.add_argument("--share", type=float, default=0.25, help="bf16 pool share that sets the byte budget")
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--prefix", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()

    import moejax
    from moejax.bench import machine, paper_link
    from moejax.engine import make_engine
    from moejax.eval.ppl import evaluate
    from moejax.generate import cache_length
    from moejax.offload.budget import plan_budget
    from moejax.offload.store import load_parts

    models = {k: moejax.load(getattr(a, k)) for k in ("bf16", "int8", "int4")}
    parts = {k: load_parts(m.path) for k, m in models.items()}
    ref = models["bf16"]
    link = paper_link(parts["bf16"], ref.path)
    tokens = ref.tokenizer.encode(open(a.text, encoding="utf-8").read()).ids[: a.max_tokens]
    S = cache_length(len(tokens), a.new_tokens)
    cfg = ref.config
    budget = plan_budget(cfg, 2, 1, S, ("pct", a.share), prefetch=True).budget_bytes
    print(f"budget {budget} bytes (bf16 smoe at {a.share:.0%}), {link.describe()}", file=sys.stderr)
    rows, engines = [], []
    for label, key, policy, alpha in CONFIGS:
        e = make_engine("stepwise", models[key].path, policy, ("bytes", budget), cache_len=S, alpha=alpha,
                        parts=parts[key], link=link)
        r = evaluate(models[key], e, tokens, a.prefix, reference=ref)
        r.update(config=label, experts=key, policy=policy, alpha=alpha, pool_slots=e.plan.pool_slots,
                 expert_bytes=e.plan.expert_bytes, budget_bytes=e.plan.budget_bytes,
                 bytes_h2d_per_token=r["bytes_h2d"] / max(1, len(tokens) - a.prefix - 1))
        rows.append(r)
        engines.append(e)
        print(f"{label}: ppl {r['ppl']:.3f} ({r['ppl_resident']:.3f}), top-1 {r['top1_agreement']:.3f}, "
              f"KL {r['kl']:.4f}, hit {r['hit_rate']:.3f}, {r['bytes_h2d_per_token'] / 2**10:.0f} KiB/token, "
              f"{e.plan.pool_slots} slots", file=sys.stderr)
    prompt = np.asarray(tokens, np.int32)[None, : a.prefix]
    tpots = [[] for _ in rows]
    for trial in range(a.trials + 1):  # the first round warms up (compiles)
        for i, e in enumerate(engines):
            e.reset()
            g = e.generate(prompt, a.new_tokens, warmup=trial == 0)
            if trial:
                tpots[i].append(g.tpot_ms)
    for r, t in zip(rows, tpots):
        r.update(tpot_ms=statistics.median(t), tpot_trials=t)
    meta = {**machine(), "date": date.today().isoformat(), "link": link.describe(), "budget_bytes": budget,
            "text": a.text, "tokens": len(tokens), "command": "python " + " ".join(sys.argv)}
    print("| config | slots | ppl change | top-1 | KL | hit rate | KiB/token | TPOT ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['pool_slots']} | {100 * (r['ppl'] / r['ppl_resident'] - 1):+.2f}% | "
              f"{r['top1_agreement']:.3f} | {r['kl']:.4f} | {r['hit_rate']:.3f} | "
              f"{r['bytes_h2d_per_token'] / 2**10:.0f} | {r['tpot_ms']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=float)


if __name__ == "__main__":
    main()
