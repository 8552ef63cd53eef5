#!/usr/bin/env python3
"""Where a decode step's time goes on the H200 at a 25% budget (padded model): the resident
model's TPOT (compute), the bytes moved at the in-program copy rate (transfers, nothing hidden),
and what is left over (the engine's own cost), against the measured TPOT. From device_check.py's
records:

    python scripts/plot_h200_time.py docs/results/h200_device_check.json docs/figures/h200_time.png

Also prints, per run, the share of the transfer time hidden behind compute (compute + transfers
- TPOT, over transfers, at least 0) and the most any pipeline could hide (compute / transfers,
at most 1). The copy rate is --rate GB/s if given, else the onepass part's, else 48.6 GB/s
(onepass_check.py on the H200, 2026-11-30).
"""
import argparse
import json

from moejax.plots import _pyplot


def rows_of(r: dict) -> tuple[dict, list[dict]]:
    """(resident TPOT per batch, the other 25% runs) of device_check.py's padded parts."""
    recs = [x for part in ("bench_padded_b1", "bench_padded_b3") for x in r.get(part, {}).get("records", [])]
    res = {x["batch"]: x["tpot_ms"] for x in recs if x["policy"] == "resident" and x["budget"] == "25%"}
    return res, [x for x in recs if x["policy"] != "resident" and x["budget"] == "25%" and x["batch"] in res]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--rate", type=float, help="GB/s of expert copies inside a program (default: the "
                   "records' onepass part, else 48.6)")
    a = p.parse_args(argv)
    r = json.load(open(a.src))
    onepass = r.get("onepass", {}).get("overlap", {}).get("GBps_copies")
    rate = (a.rate or onepass or 48.6) * 1e9  # bytes/s of expert copies inside a program
    res, rows = rows_of(r)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 4))
    labels = []
    print(f"copy rate {rate / 1e9:.1f} GB/s ({'--rate' if a.rate else 'onepass part' if onepass else 'default'})")
    print("| policy | batch | TPOT ms | compute ms | transfers ms | hidden | most hideable |")
    print("|---|---|---|---|---|---|---|")
    for i, x in enumerate(rows):
        compute, move = res[x["batch"]], 1e3 * x["bytes_h2d_per_token"] / rate
        rest = x["tpot_ms"] - compute - move
        name = x["policy"] + (f":{x['prefetch_width']}" if x.get("prefetch_width") else "")
        hidden = max(0.0, -rest) / move if move else float("nan")
        most = min(compute, move) / move if move else float("nan")
        print(f"| {name} | {x['batch']} | {x['tpot_ms']:.2f} | {compute:.2f} | {move:.2f} | {hidden:.0%} | {most:.0%} |")
        ax.bar(i, compute, color="tab:blue", label="resident TPOT (compute)" if i == 0 else None)
        ax.bar(i, move, bottom=compute, color="tab:orange", label="bytes moved / copy rate" if i == 0 else None)
        ax.bar(i, rest, bottom=compute + move, color="tab:gray", label="rest (measured - both)" if i == 0 else None)
        ax.text(i, x["tpot_ms"] + 0.3, f"{x['tpot_ms']:.2f} ms", ha="center", fontsize=8)
        labels.append(f"{name}\nbatch {x['batch']}")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("ms per token")
    ax.set_title(f"H200, 25% budget, experts of 17.3 MB (copies at {rate / 1e9:.1f} GB/s)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.dst, dpi=120)


if __name__ == "__main__":
    main()
