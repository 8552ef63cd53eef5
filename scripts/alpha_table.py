"""The cost side of issue 12's alpha table: one row per configuration (alpha, substitution
mode), from the JSONs that `moejax eval ppl`, `moejax bench` and `moejax eval tasks` wrote
for it. The accuracy side is `compare_tasks.py --by-run`.

    python scripts/alpha_table.py --labels "window 0,window 0.1,skip 0.1" \
        --ppl p0.json,p1.json,p2.json --tpot t0.json,t1.json,t2.json --tasks k0.json,k1.json,k2.json \
        --markdown out.md --json out.json

Per row: perplexity on the ppl tokens and its change against the first row, top-1 agreement
and KL against the resident model; the tasks run's hit rate, substitution or skip rate and
decode gigabytes moved to the device; the benchmark's TPOT (median of its trials, with the
trials), its ratio to the first row's, and host-to-device megabytes per token. Any list may
be left out; a file given as "-" leaves its cells empty.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _load(path: str) -> dict | None:
    return None if path == "-" else json.loads(Path(path).read_text())


def _record(bench: dict | None) -> dict | None:
    """A `moejax bench --json` file holds one record per configuration; here there is one."""
    if bench is None:
        return None
    records = bench["records"]
    if len(records) != 1:
        raise ValueError(f"expected one bench record, found {len(records)}")
    return records[0]


def rows(labels: list[str], ppl: list[str], tpot: list[str], tasks: list[str]) -> list[dict]:
    n = len(labels)
    ppl, tpot, tasks = (x or ["-"] * n for x in (ppl, tpot, tasks))
    for name, files in (("--ppl", ppl), ("--tpot", tpot), ("--tasks", tasks)):
        if len(files) != n:
            raise ValueError(f"{name} has {len(files)} files for {n} labels")
    out = []
    for label, p, t, k in zip(labels, map(_load, ppl), map(_record, map(_load, tpot)), map(_load, tasks)):
        row = {"label": label}
        if p is not None:
            row |= {"ppl": p["ppl"], "top1_agreement": p["top1_agreement"], "kl": p["kl"], "ppl_tokens": p["tokens"]}
        if k is not None:
            r = k["run"]
            row |= {"hit_rate": r["hit_rate"], "rate": r["substitution_rate"] + r["skip_rate"],
                    "decode_gb": r["bytes_h2d"] / 1e9}
        if t is not None:
            row |= {"tpot_ms": t["tpot_ms"], "tpot_ms_trials": t["tpot_ms_trials"],
                    "mb_per_token": t["bytes_h2d_per_token"] / 1e6, "tpot_hit_rate": t["hit_rate"]}
        out.append(row)
    first = out[0] if out else {}
    for row in out:
        if "ppl" in row and "ppl" in first:
            row["ppl_change"] = row["ppl"] / first["ppl"] - 1
        if "tpot_ms" in row and "tpot_ms" in first:
            row["tpot_ratio"] = row["tpot_ms"] / first["tpot_ms"]
    return out


def markdown(table: list[dict]) -> str:
    def cell(row, key, fmt):
        v = row.get(key)
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = ["| run | ppl | vs first | top-1 agr. | KL | tasks: hit rate | subst. or skip rate | decode GB "
             "| TPOT ms (trials) | vs first | MB per token |", "|" + "---|" * 11]
    for r in table:
        trials = ", ".join(f"{x:.1f}" for x in r.get("tpot_ms_trials", []))
        tpot = f"{r['tpot_ms']:.1f} ({trials})" if "tpot_ms" in r else ""
        lines.append(f"| {r['label']} | {cell(r, 'ppl', '.3f')} | {cell(r, 'ppl_change', '+.1%')} | "
                     f"{cell(r, 'top1_agreement', '.3f')} | {cell(r, 'kl', '.4f')} | {cell(r, 'hit_rate', '.3f')} | "
                     f"{cell(r, 'rate', '.3f')} | {cell(r, 'decode_gb', '.1f')} | {tpot} | "
                     f"{cell(r, 'tpot_ratio', '.2f')} | {cell(r, 'mb_per_token', '.1f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", required=True, help="comma-separated names of the rows (the first is the reference)")
    for name, what in (("ppl", "eval ppl"), ("tpot", "bench"), ("tasks", "eval tasks")):
        ap.add_argument(f"--{name}", default="", help=f"comma-separated `moejax {what} --json` files, one per label ('-': none)")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    try:
        table = rows(split(args.labels), split(args.ppl), split(args.tpot), split(args.tasks))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: a JSON file lacks the field {e} (is each list in the order of --labels?)", file=sys.stderr)
        return 2
    md = markdown(table)
    print(md, end="")
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv, "rows": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
