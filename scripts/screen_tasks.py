"""Screen BIG-bench multiple-choice tasks for an accuracy table (issue 12): which tasks have
enough examples, short contexts, and answers that a constant guess cannot win.

For each task (or subtask) with multiple-choice examples, over its first --limit examples:
n, the number of choices, chance (BIG-bench's expected score of a random choice), the
"constant" baseline (the share of examples whose correct choice is the most frequent correct
string: what always answering that string scores where the string is offered), and the mean
context length in characters. A task passes when it has at least --limit examples, a mean
context under --max-chars and a constant baseline at most --max-constant above chance.

    python scripts/screen_tasks.py $BB --limit 500 --max-chars 600 --json docs/results/bigbench_screen.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moejax.eval.tasks import read_task  # noqa: E402


def screen(task, limit: int) -> dict:
    ex = task.examples[:limit]
    correct = [e.choices[int(np.argmax(e.scores))] for e in ex]
    top, count = collections.Counter(correct).most_common(1)[0]
    return {"task": task.name, "n_all": len(task.examples), "n": len(ex),
            "choices": float(np.mean([len(e.choices) for e in ex])),
            "chance": float(np.mean([np.mean(e.scores) for e in ex])),
            "constant": count / len(ex), "constant_answer": top[:40],
            "context_chars": float(np.mean([len(e.context) for e in ex]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="bigbench/benchmark_tasks")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--max-chars", type=float, default=600.0)
    ap.add_argument("--max-constant", type=float, default=0.05)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    for f in sorted(Path(args.path).glob("*/task.json")):
        try:
            tasks = read_task(f)
        except Exception as e:  # a few BIG-bench tasks are programmatic or unreadable here
            print(f"skip {f.parent.name}: {e}", file=sys.stderr)
            continue
        rows += [screen(t, args.limit) for t in tasks if t.examples]
    for r in rows:
        r["passes"] = (r["n_all"] >= args.limit and r["context_chars"] <= args.max_chars
                       and r["constant"] <= r["chance"] + args.max_constant)
    rows.sort(key=lambda r: (not r["passes"], r["context_chars"]))
    for r in rows:
        if r["passes"]:
            print(f"{r['task']:60s} n={r['n_all']:6d} k={r['choices']:4.1f} chance={r['chance']:.3f} "
                  f"constant={r['constant']:.3f} chars={r['context_chars']:.0f}")
    print(f"{sum(r['passes'] for r in rows)} of {len(rows)} multiple-choice tasks pass", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "tasks": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
