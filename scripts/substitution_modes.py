"""Accuracy and hit rate of the three substitution modes across alpha, one budget, one text.

    python scripts/substitution_modes.py --model DIR --text FILE --vram-budget 25% \
        --alphas 0,0.1,0.2,0.3,0.4 --json OUT.json

Decode-mode evaluation (moejax.eval.ppl): teacher forcing token by token through the
offloaded engine with policy smoe, compared with the resident model on the same tokens.
`hybrid` and `similarity` use the output similarity calibrated on --calib-text (a text
other than --text, so the choice of mode is not tuned on the evaluation text).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--calib-text", required=True)
    p.add_argument("--vram-budget", default="25%")
    p.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)

    import moejax
    from moejax.engine import OffloadEngine, load_parts
    from moejax.eval.ppl import evaluate
    from moejax.generate import cache_length
    from moejax.offload import similarity
    from moejax.offload.budget import parse_budget

    model = moejax.load(a.model)
    tok = model.tokenizer
    tokens = tok.encode(Path(a.text).read_text()).ids[: a.max_tokens]
    calib = tok.encode(Path(a.calib_text).read_text()).ids[:512]
    import numpy as np

    sim = similarity.calibrate(model, np.array([calib], np.int32), "output")
    parts = load_parts(model.path)
    spec = parse_budget(a.vram_budget)
    rows = []
    base = evaluate(model, OffloadEngine(model.path, "lru", spec, cache_len=cache_length(len(tokens), 0),
                                         parts=parts), np.array(tokens))
    rows.append({"policy": "lru", "mode": "-", "alpha": 0.0, **base})
    for alpha in [float(x) for x in a.alphas.split(",")]:
        for mode in (("window",) if alpha == 0 else ("window", "hybrid", "similarity")):
            e = OffloadEngine(model.path, "smoe", spec, cache_len=cache_length(len(tokens), 0), parts=parts,
                              alpha=alpha, substitute=mode, similarity=sim)
            rows.append({"policy": "smoe", "mode": mode, "alpha": alpha, **evaluate(model, e, np.array(tokens))})
            print(json.dumps(rows[-1]), file=sys.stderr)
    a.json.write_text(json.dumps({"budget": a.vram_budget, "text": a.text, "rows": rows}, indent=2) + "\n")
    print("| policy | mode | alpha | hit rate | subst. rate | ppl | ppl resident | ppl change | top-1 agreement | KL |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['mode']} | {r['alpha']:g} | {r['hit_rate']:.3f} | {r['substitution_rate']:.3f} | "
              f"{r['ppl']:.2f} | {r['ppl_resident']:.2f} | {100 * (r['ppl'] / r['ppl_resident'] - 1):+.2f}% | "
              f"{r['top1_agreement']:.3f} | {r['kl']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
