"""Figures for the benchmark commands (matplotlib, from the `plot` extra)."""

from __future__ import annotations

from moejax.errors import MoejaxError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MoejaxError("figures need matplotlib (pip install -e '.[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_figure(path) -> None:
    """Refuse a figure before the work that makes it: no matplotlib, or a file type it cannot write."""
    from pathlib import Path

    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix and suffix not in kinds:
        raise MoejaxError(f"--figure {path}: matplotlib cannot write .{suffix} (it writes {', '.join(sorted(kinds))})")


def policy_bars(records: list[dict], path: str) -> None:
    """TPOT and hit rate per policy, one group per (budget, batch)."""
    plt = _pyplot()

    engines = {r["engine"] for r in records} - {"none"}

    def label(r):  # a policy, its prefetch width (bench's NAME:P) and, if several, its engine
        width = f":{r['prefetch_width']}" if r.get("prefetch_width") else ""
        return r["policy"] + width + (f" ({r['engine']})" if len(engines) > 1 and r["engine"] != "none" else "")

    configs = list(dict.fromkeys((r["budget"], r["batch"]) for r in records))
    policies = list(dict.fromkeys(label(r) for r in records))
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    width = 0.8 / len(policies)
    for j, p in enumerate(policies):
        rs = {(r["budget"], r["batch"]): r for r in records if label(r) == p}
        xs = [i + j * width for i in range(len(configs))]
        axes[0].bar(xs, [rs[c]["tpot_ms"] for c in configs], width, label=p)
        axes[1].bar(xs, [rs[c]["hit_rate"] for c in configs], width, label=p)
    axes[0].set_ylabel("TPOT ms")
    axes[1].set_ylabel("hit rate")
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
    axes[1].set_xticklabels([f"{b}, batch {n}" for b, n in configs])
    axes[0].set_title(f"policies side by side ({records[-1]['link']})", fontsize=9)
    axes[0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def hit_rate_curves(rows: list[dict], path: str, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((100 * r["share"], r["hit_rate"]) for r in rows if r["policy"] == p)
        ax.plot(*zip(*pts), marker="o", label=p, linestyle="--" if p == "belady" else "-")
    ax.set_xlabel("expert cache, % of routed experts")
    ax.set_ylabel("hit rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def alpha_sweep(rows: list[dict], path: str, title: str) -> None:
    plt = _pyplot()
    a = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(a, [r["top1_agreement"] for r in rows], "o-", label="top-1 agreement")
    ax.plot(a, [r["hit_rate"] for r in rows], "s-", label="hit rate")
    ax.set_xlabel("alpha")
    ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(a, [r["tpot_ms"] for r in rows], "^--", color="tab:red", label="TPOT (ms)")
    ax2.set_ylabel("TPOT ms")
    ax.set_title(title, fontsize=9)
    fig.legend(loc="center right", fontsize=8, bbox_to_anchor=(0.88, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
