"""Compare `moejax eval tasks` runs example by example (issue 12's accuracy tables).

The first JSON is the reference (e.g. the dense model, or alpha 0); every other one is
compared with it on the tasks and examples both scored (the first n of each task, n the
smaller). Per task and scoring rule (raw, per token, per character): the reference's accuracy,
its z against chance (accuracy - chance over the standard error of a random guess's grade),
each run's accuracy, its difference from the reference in points, and the paired standard
error of that difference (over the per-example grade differences), plus the mean change of
the correct choice's log-likelihood (nats).

    python scripts/compare_tasks.py docs/results/dense.json docs/results/moe.json --markdown out.md --json out.json

A run given as A.json+B.json is the parts of one run (`eval tasks --skip`): each task's
examples are A's followed by B's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moejax.eval.tasks import picks, read_task  # noqa: E402

RULES = ("acc", "acc_per_token", "acc_per_char")


def _chars(task: dict) -> list[list[int]]:
    """Each example's choice lengths in characters (runs before the field was recorded: re-read the task)."""
    if all("chars" in e for e in task["examples"]):
        return [e["chars"] for e in task["examples"]]
    found = {t.name: t for t in read_task(Path(task["path"]))}
    ex = found[task["task"]].examples
    return [[len(c) for c in x.choices] for x in ex[:len(task["examples"])]]


def per_example(task: dict, n: int) -> dict[str, np.ndarray]:
    """-> {rule: grades [n]}, {"pick_" + rule: the first-ranked choice [n]} and "ll_correct":
    the best choice's log-likelihood [n]."""
    chars = _chars(task)
    out = {r: [] for r in RULES} | {"pick_" + r: [] for r in RULES} | {"ll_correct": []}
    for e, ch in zip(task["examples"][:n], chars):
        pk = picks(e["ll"], e["tokens"], ch)  # a grade is the score of the pick (eval.tasks.grades)
        for r in RULES:
            out[r].append(e["scores"][pk[r]])
            out["pick_" + r].append(pk[r])
        out["ll_correct"].append(e["ll"][int(np.argmax(e["scores"]))])
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _guess(task: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly random choice's grade per example, mean and variance [n] each."""
    scores = [e["scores"] for e in task["examples"][:n]]
    return np.asarray([np.mean(s) for s in scores]), np.asarray([np.var(s) for s in scores])


def chance_se(task: dict, n: int) -> tuple[float, float]:
    """(chance, standard error of a random guess's mean grade) over the first n examples."""
    return _chance(*_guess(task, n))


def _chance(p: np.ndarray, var: np.ndarray) -> tuple[float, float]:
    return float(p.mean()), float(np.sqrt(var.sum()) / len(p))


def _paired(d: np.ndarray, scale: float = 1.0) -> tuple[float, float]:
    """(mean, standard error) of per-example differences d, times scale (100: points)."""
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return scale * float(d.mean()), scale * se


def _row(name: str, base: dict, curs: list[dict], chance: float, se: float, rates: list[dict]) -> dict:
    """One table row: the reference's per-example grades against each run's (paired)."""
    n = len(base["ll_correct"])
    row = {"task": name, "n": n, "chance": chance, "chance_se": se,
           "ref": {r: float(base[r].mean()) for r in RULES},
           "ref_z": {r: (float(base[r].mean()) - chance) / se if se else float("nan") for r in RULES},
           "runs": []}
    for cur, rate in zip(curs, rates):
        d = {r: _paired(cur[r] - base[r], 100) for r in RULES}
        ll, ll_se = _paired(cur["ll_correct"] - base["ll_correct"])
        row["runs"].append({
            "acc": {r: float(cur[r].mean()) for r in RULES},
            "diff_points": {r: d[r][0] for r in RULES}, "diff_se_points": {r: d[r][1] for r in RULES},
            "ll_correct_diff": ll, "ll_correct_diff_se": ll_se, **rate})
    return row


def compare(ref: dict, runs: list[dict]) -> list[dict]:
    """Per task the rows of _row; with more than one task, a last row "(all tasks)" pools every
    compared example (each task's grades as they are, so tasks weigh by their example counts)."""
    rows, pooled = [], []
    indexed = [{t["task"]: t for t in r["tasks"]} for r in runs]
    for rt in ref["tasks"]:
        others = [ix.get(rt["task"]) for ix in indexed]
        if any(o is None for o in others):
            continue
        n = min([len(rt["examples"])] + [len(o["examples"]) for o in others])
        base, curs = per_example(rt, n), [per_example(o, n) for o in others]
        rates = [{k: o.get(k) for k in ("hit_rate", "substitution_rate", "skip_rate")} for o in others]
        p, var = _guess(rt, n)
        rows.append(_row(rt["task"], base, curs, *_chance(p, var), rates))
        pooled.append((base, curs, p, var))
    if len(pooled) > 1:
        cat = lambda ds: {k: np.concatenate([d[k] for d in ds]) for k in ds[0]}  # noqa: E731
        base = cat([b for b, _, _, _ in pooled])
        curs = [cat([c[i] for _, c, _, _ in pooled]) for i in range(len(runs))]
        p, var = np.concatenate([x[2] for x in pooled]), np.concatenate([x[3] for x in pooled])
        rates = [{k: None for k in ("hit_rate", "substitution_rate", "skip_rate")} for _ in runs]
        rows.append(_row("(all tasks)", base, curs, *_chance(p, var), rates))
    return rows


def markdown(rows: list[dict], labels: list[str]) -> str:
    f3 = lambda v: "/".join(f"{v[r]:.3f}" for r in RULES)  # noqa: E731
    head = "| task | n | chance | reference acc / per token / per char | z vs chance |"
    sep = "|---|---|---|---|---|"
    for lab in labels:
        head += f" {lab} acc / per token / per char | {lab} - reference, points (paired s.e.) | correct choice's log-lik., nats |"
        sep += "---|---|---|"
    lines = [head, sep]
    for row in rows:
        z = "/".join(f"{row['ref_z'][r]:+.1f}" for r in RULES)
        line = f"| {row['task']} | {row['n']} | {row['chance']:.3f} | {f3(row['ref'])} | {z} |"
        for run in row["runs"]:
            diffs = ", ".join(f"{run['diff_points'][r]:+.1f} ({run['diff_se_points'][r]:.1f})" for r in RULES)
            line += f" {f3(run['acc'])} | {diffs} | {run['ll_correct_diff']:+.2f} +- {run['ll_correct_diff_se']:.2f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


RUN_KEYS = ("hit_rate", "substitution_rate", "skip_rate", "prefetch_precision", "bytes_h2d")  # a run's own, --by-run


def run_table(ref: dict, runs: list[dict], labels: list[str], rules: dict[str, str]) -> tuple[list[dict], str]:
    """One row per run (e.g. an alpha sweep against alpha 0): per task, the difference from
    the reference in points (paired s.e.) under that task's rule (rules: task -> rule, default
    "acc"); then all tasks pooled, each example graded by its task's rule; the mean change of
    the correct choice's log-likelihood over every example; the share of examples whose
    first-ranked choice differs from the reference's (under the task's rule, right or wrong);
    and the run's own rates, prefetch precision and decode bytes moved to the device (the whole
    run's, as `eval tasks` reports them; a run in parts: its first part's)."""
    indexed = [{t["task"]: t for t in r["tasks"]} for r in runs]
    names = [t["task"] for t in ref["tasks"] if all(t["task"] in ix for ix in indexed)]
    refs = {t["task"]: t for t in ref["tasks"]}
    ref_graded = {}  # (task, n) -> the reference's per_example, computed once for every run
    out = []
    for run, ix, label in zip(runs, indexed, labels):
        row, pooled, lls, changed = {"label": label, "tasks": {}}, [], [], []
        for name in names:
            n = min(len(refs[name]["examples"]), len(ix[name]["examples"]))
            rule = rules.get(name, "acc")
            if (name, n) not in ref_graded:
                ref_graded[name, n] = per_example(refs[name], n)
            base, cur = ref_graded[name, n], per_example(ix[name], n)
            d = cur[rule] - base[rule]
            diff, se = _paired(d, 100)
            row["tasks"][name] = {"rule": rule, "n": n, "ref": float(base[rule].mean()), "acc": float(cur[rule].mean()),
                                  "diff_points": diff, "diff_se_points": se}
            pooled.append(d)
            lls.append(cur["ll_correct"] - base["ll_correct"])
            changed.append(cur["pick_" + rule] != base["pick_" + rule])
        d = np.concatenate(pooled)
        (diff, se), (ll, ll_se) = _paired(d, 100), _paired(np.concatenate(lls))
        row["all"] = {"n": len(d), "diff_points": diff, "diff_se_points": se, "ll_correct_diff": ll,
                      "ll_correct_diff_se": ll_se, "changed": float(np.concatenate(changed).mean())}
        row["rates"] = {k: run.get("run", {}).get(k) for k in RUN_KEYS}
        out.append(row)
    def run_cells(r: dict) -> str:  # RUN_KEYS in order; bytes as GB
        return " | ".join("" if r[k] is None else f"{r[k] / 1e9:.1f}" if k == "bytes_h2d" else f"{r[k]:.3f}"
                          for k in RUN_KEYS)

    head = "| run | " + " | ".join(f"{n} ({rules.get(n, 'acc')})" for n in names) + \
        (" | all tasks | choice changed | correct choice's log-lik., nats | hit rate | subst. rate | skip rate"
         " | prefetch precision | decode GB to device |")
    lines = [head, "|" + "---|" * (len(names) + 9)]
    for row in out:
        cells = [f"{t['diff_points']:+.1f} ({t['diff_se_points']:.1f})" for t in row["tasks"].values()]
        a, r = row["all"], row["rates"]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {a['diff_points']:+.1f} ({a['diff_se_points']:.1f})"
                     f" | {a['changed']:.3f} | {a['ll_correct_diff']:+.2f} +- {a['ll_correct_diff_se']:.2f} | {run_cells(r)} |")
    if out:  # the reference's accuracies, under the first run's n, and its own rates
        cells = [f"{t['ref']:.3f} (n {t['n']})" for t in out[0]["tasks"].values()]
        own = {k: ref.get("run", {}).get(k) for k in RUN_KEYS}
        lines.insert(2, "| reference | " + " | ".join(cells) + " | | | | " + run_cells(own) + " |")
    return out, "\n".join(lines) + "\n"


def load_run(arg: str) -> dict:
    """One eval tasks JSON, or parts joined with "+": per task, the parts' examples in order
    (a joined task keeps its name and path only: the parts' summaries and rates are per part)."""
    parts = [json.loads(Path(p).read_text()) for p in arg.split("+")]
    run = parts[0]
    for part in parts[1:]:
        more = {t["task"]: t for t in part["tasks"]}
        run["tasks"] = [{"task": t["task"], "path": t["path"], "examples": t["examples"] + more[t["task"]]["examples"]}
                        for t in run["tasks"] if t["task"] in more]
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference", help="eval tasks JSON of the reference run (parts joined with +)")
    ap.add_argument("runs", nargs="+", help="eval tasks JSONs to compare with it (parts joined with +)")
    ap.add_argument("--labels", help="comma-separated names of the runs (default: file names)")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    ap.add_argument("--by-run", action="store_true",
                    help="one row per run (an alpha sweep): per task and pooled differences, log-lik., rates")
    ap.add_argument("--rules", default="", help="with --by-run: task=rule,... (acc, acc_per_token, acc_per_char; default acc)")
    ap.add_argument("--only", default="", help="comma-separated tasks to compare (default: every task all runs have); "
                    "a run's rates stay the whole run's")
    args = ap.parse_args(argv)
    ref = load_run(args.reference)
    runs = [load_run(p) for p in args.runs]
    only = [t for t in args.only.split(",") if t]
    missing = sorted(set(only) - {t["task"] for t in ref["tasks"]})
    if missing:
        print(f"error: --only: the reference has no task {missing[0]!r}", file=sys.stderr)
        return 2
    for run in [ref, *runs] if only else []:
        run["tasks"] = [t for t in run["tasks"] if t["task"] in only]
    labels = args.labels.split(",") if args.labels else [Path(p).stem for p in args.runs]
    if args.by_run:
        rules = dict(kv.split("=", 1) for kv in args.rules.split(",") if kv)
        bad = sorted(set(rules.values()) - set(RULES))
        if bad:
            print(f"error: --rules: unknown rule {bad[0]!r} (expected one of {', '.join(RULES)})", file=sys.stderr)
            return 2
        rows, md = run_table(ref, runs, labels, rules)
        print(md, end="")
        if args.markdown:
            Path(args.markdown).write_text(md)
        if args.json:
            Path(args.json).write_text(json.dumps({"reference": args.reference, "runs": args.runs, "labels": labels,
                                                   "rules": rules, "rows": rows}, indent=1) + "\n")
        return 0
    rows = compare(ref, runs)
    md = markdown(rows, labels)
    print(md, end="")
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": args.reference, "runs": args.runs, "labels": labels,
                                               "tasks": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
