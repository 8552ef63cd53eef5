#!/usr/bin/env python3
"""Where a decode step's time goes on the H200 at a 25% budget (padded model): the resident
model's TPOT (compute), the bytes moved at the in-program copy rate (transfers, nothing hidden),
and what is left over (the engine's own cost), against the measured TPOT. From device_check.py's
records:

    python scripts/plot_h200_time.py docs/results/h200_device_check.json docs/figures/h200_time.png
"""
import json
import sys

from moejax.plots import _pyplot


def main(src: str, dst: str) -> None:
    r = json.load(open(src))
    rate = r["onepass"]["overlap"]["GBps_copies"] * 1e9  # bytes/s of expert copies inside a program
    recs = r["bench_padded_b1"]["records"] + r["bench_padded_b3"]["records"]
    res = {x["batch"]: x["tpot_ms"] for x in recs if x["policy"] == "resident" and x["budget"] == "25%"}
    rows = [x for x in recs if x["policy"] != "resident" and x["budget"] == "25%"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = []
    for i, x in enumerate(rows):
        compute, move = res[x["batch"]], 1e3 * x["bytes_h2d_per_token"] / rate
        rest = x["tpot_ms"] - compute - move
        ax.bar(i, compute, color="tab:blue", label="resident TPOT (compute)" if i == 0 else None)
        ax.bar(i, move, bottom=compute, color="tab:orange", label="bytes moved / copy rate" if i == 0 else None)
        ax.bar(i, rest, bottom=compute + move, color="tab:gray", label="rest (measured - both)" if i == 0 else None)
        ax.text(i, x["tpot_ms"] + 0.3, f"{x['tpot_ms']:.2f} ms", ha="center", fontsize=8)
        labels.append(f"{x['policy']}\nbatch {x['batch']}")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("ms per token")
    ax.set_title(f"H200, 25% budget, experts of 17.3 MB: nothing hidden (copies at {rate / 1e9:.1f} GB/s)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
