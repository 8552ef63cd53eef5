"""`moejax bench`: every policy on the same prompts, budget and seeds, side by side.

Trials are interleaved across policies (policy A, B, C, then again), so drift of a shared
machine hits all of them alike. Each trial starts from an empty expert pool; the first
trial of each engine is preceded by a warm-up that compiles every stage. Step times are
synchronised (each step's token is read back to the host before the next starts).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from datetime import date
from pathlib import Path

import numpy as np

PROMPTS = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "KING: Now is the winter of our discontent made glorious summer",
    "To be, or not to be, that is the question: whether 'tis nobler",
    "First Citizen: Before we proceed any further, hear me speak.",
]


def prompt_tokens(tokenizer, vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """[batch, length] prompt ids: text prompts cut to one length when there is a tokenizer."""
    if tokenizer is not None:
        rows = [tokenizer.encode(PROMPTS[b % len(PROMPTS)] * 4).ids[:length] for b in range(batch)]
        if all(len(r) == length for r in rows):
            return np.array(rows, np.int32)
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def split_policy(spec: str) -> tuple[str, int | None]:
    """A bench policy: "smoe", or "smoe:2" (the policy with --prefetch-width 2, so that widths
    run side by side) -> (name, width or None)."""
    name, _, width = spec.partition(":")
    if not width:
        return name, None
    from moejax.errors import MoejaxError
    from moejax.offload.policies import POLICIES

    if name not in POLICIES or not POLICIES[name].prefetch:
        raise MoejaxError(f"--policies {spec!r}: a prefetch width goes with a prefetching policy (smoe, lru-prefetch)")
    if not width.isdigit():
        raise MoejaxError(f"--policies {spec!r}: the prefetch width after ':' must be a whole number")
    return name, int(width)


def run_bench(path: Path, budgets: list, batches: list[int], policies: list[str], new_tokens: int = 32,
              prompt_len: int = 16, trials: int = 3, settings: dict | None = None,
              progress: bool = True, parts=None, engines: tuple[str, ...] = ("fused",),
              on_record=None) -> list[dict]:
    """engines: "fused" and/or "stepwise" (moejax.engine.make_engine; an emulated link needs
    stepwise), each with every policy but resident, trials interleaved across all of them.
    A policy "NAME:P" runs NAME with prefetch width P (split_policy).
    on_record(records so far) is called after each record is finished (to save them as they come)."""
    from tqdm.auto import tqdm

    import moejax
    from moejax import checkpoint
    from moejax.api import load_tokenizer
    from moejax.engine import load_parts, make_engine
    from moejax.generate import cache_length

    cfg, _ = checkpoint.read_meta(path)
    tok = load_tokenizer(path)
    S = cache_length(prompt_len, new_tokens)
    resident = moejax.load(path) if "resident" in policies else None
    parts = parts or load_parts(path)  # one host copy of the experts, shared by every engine
    records = []
    runs_of = [("none", "resident")] if "resident" in policies else []
    runs_of += [(k, p) for k in engines for p in policies if p != "resident"]
    named = {p: split_policy(p) for p in policies}  # "smoe:2" -> ("smoe", 2)
    total = len(budgets) * len(batches) * trials * len(runs_of)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress)
    for spec_text, spec in budgets:
        for batch in batches:
            prompt = prompt_tokens(tok, cfg.vocab_size, batch, prompt_len)
            built = {(k, p): make_engine(k, path, named[p][0], spec, batch=batch, cache_len=S, parts=parts,
                                         **_with_width(settings or {}, named[p][1]))
                     for k, p in runs_of if p != "resident"}
            runs: dict[tuple, list] = {kp: [] for kp in runs_of}
            for trial in range(trials):
                for kp in runs_of:
                    p = kp[1]
                    if p == "resident":
                        g = resident.generate(prompt, new_tokens, warmup=trial == 0)
                        stats = {"hit_rate": 1.0, "substitution_rate": 0.0, "skip_rate": 0.0, "bytes_h2d": 0,
                                 "bytes_h2d_prefill": 0, "transfers": 0, "prefetch_precision": float("nan"),
                                 "sched_us_median": 0.0}
                    else:
                        e = built[kp]
                        e.reset()
                        g = e.generate(prompt, new_tokens, warmup=trial == 0)
                        stats = e.telemetry.summary()
                    runs[kp].append((g, stats))
                    bar.update()
            for kp in runs_of:
                kind, p = kp
                gens = [g for g, _ in runs[kp]]
                stats = runs[kp][-1][1]  # counters are deterministic across trials
                steps = len(gens[-1].step_s)
                plan = built[kp].plan if p != "resident" else None
                records.append({
                    "policy": named[p][0], "engine": kind, "batch": batch,
                    "budget": spec_text,
                    "budget_bytes": plan.budget_bytes if plan else None,
                    "pool_slots": plan.pool_slots if plan else cfg.num_experts * len(cfg.moe_layer_ids),
                    "tpot_ms": statistics.median(g.tpot_ms for g in gens),
                    "tpot_ms_trials": [g.tpot_ms for g in gens],
                    "ttft_ms": statistics.median(1e3 * g.ttft_s for g in gens),
                    # the fused engine compiles ahead of its warm-up (compile_s); the others inside it
                    "compile_s": (built[kp].compile_s if p != "resident" else 0.0) or gens[0].warmup_s,
                    "hit_rate": stats["hit_rate"], "substitution_rate": stats["substitution_rate"],
                    "skip_rate": stats["skip_rate"],
                    "bytes_h2d_per_token": stats["bytes_h2d"] / steps if steps else 0.0,
                    # host -> device copies per token, and the prefetches among them
                    "transfers_per_token": stats["transfers"] / steps if steps else 0.0,
                    "prefetch_issued_per_token": stats.get("prefetch_issued", 0) / steps if steps else 0.0,
                    "bytes_h2d_prefill": stats["bytes_h2d_prefill"],
                    "prefetch_precision": stats["prefetch_precision"],
                    "sched_us_median": stats["sched_us_median"],
                    "new_tokens": new_tokens, "prompt_len": prompt_len, "trials": trials,
                    "link": built[kp].link.describe() if p != "resident" else "none",
                    "pool": "none" if p == "resident" else
                            "per-layer pool" if built[kp].layout.per_layer else "shared pool",
                    "program_bytes": plan.program_bytes if plan else 0,
                    "prefetch_dropped": stats.get("prefetch_dropped", 0),
                    "prefetch_idle": stats.get("prefetch_idle", 0),
                    "prefetch_width": built[kp].policy.prefetch_width if p != "resident" else 0,
                    "alpha": (settings or {}).get("alpha", 0.0),
                    "substitute": (settings or {}).get("substitute", "window"),
                })
                if on_record is not None:
                    on_record(records)
    bar.close()
    return records


def _with_width(settings: dict, width: int | None) -> dict:
    return settings if width is None else {**settings, "prefetch_width": width}


# docs/method.md ("Setting"): the paper's Qwen2-57B-A14B on an A6000 over PCIe 4.0: one bf16 expert
# (55 MB) takes ~2 ms to transfer at ~26 GB/s and ~0.07 ms to stream through the GPU's 768 GB/s
# at batch 1.
PAPER_TRANSFER_TO_COMPUTE = 28.0
LINK_FILE = "link_calibration.json"  # beside the checkpoint, as similarity.npz


def expert_compute_s(parts, reps: int = 200) -> float:
    """Median wall time of one routed expert on one token, on this machine (jitted, synchronised)."""
    import time

    import jax
    import jax.numpy as jnp

    from moejax.model import moe

    cfg, glob, _, store = parts
    block = store.fetch(store.layers[0], 0).array  # [3, H, I] on the device
    if cfg.quant is not None:  # timed as the model's dtype holds it: the link belongs to the machine
        from moejax.quant import dequantize

        block = dequantize(block, cfg.quant, glob["embed"].dtype)
    block = block[None]  # [1, 3, H, I]
    x = jnp.ones((1, cfg.hidden_size), block.dtype)
    ids, w = np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32)
    f = jax.jit(moe.experts_indexed)
    f(x, block, ids, w).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(x, block, ids, w).block_until_ready()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def h2d_bandwidth(parts, n: int = 32) -> float:
    """Bytes/s of real expert fetches (pinned host -> device where the backend has it),
    measured one expert at a time, synchronised; recorded before a real-link benchmark."""
    import time

    _, _, _, store = parts
    keys = [(l, e) for l in store.layers for e in range(3)][:n]
    store.fetch(*keys[0]).array.block_until_ready()
    t = time.perf_counter()
    for key in keys:
        store.fetch(*key).array.block_until_ready()
    return len(keys) * store.expert_bytes / (time.perf_counter() - t)


def plain_expert_bytes(parts) -> int:
    """One routed expert's bytes in the model's dtype, quantized or not: what the paper link is
    calibrated on, so that a quantized copy of a model gets the same link (and moves fewer bytes)."""
    cfg = parts.config
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size * np.dtype(parts.glob["embed"].dtype).itemsize


def machine_key() -> str:
    """The machine a link calibration belongs to: device, architecture, core count, CPU model."""
    import jax

    dev = jax.devices()[0]
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   "")
    except OSError:
        pass
    key = f"{dev.platform}:{dev.device_kind}, {platform.machine()}, {os.cpu_count()} cores"
    return f"{key}, {cpu}" if cpu else key


def _read_calibrations(file: Path, fp: str) -> dict:
    """{machine key: calibration} stored for the model with fingerprint fp ({} if none or unreadable)."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("fingerprint") != fp or not isinstance(data.get("machines"), dict):
        return {}
    return data["machines"]


def paper_link(parts, path: str | Path | None = None, recalibrate: bool = False, log=None):
    """`--link emulated:paper`: an emulated link that gives this model on this machine the paper's
    transfer-to-compute ratio: bandwidth = expert bytes / (28 x time to compute one expert on one
    token here).

    The time is measured once per model and machine and stored in `path / LINK_FILE` (path: the
    converted checkpoint), so that every later command uses the same link instead of one that
    moves with the machine's load; recalibrate measures again (`moejax calibrate --link`).
    Without a path it is measured every time. log(line) reports the link and where it came from
    (default: stderr)."""
    from moejax.offload.similarity import fingerprint
    from moejax.offload.store import Link

    log = log or (lambda line: print(line, file=sys.stderr))
    cfg, store = parts.config, parts.store
    key, fp = machine_key(), fingerprint(cfg)
    file = Path(path) / LINK_FILE if path is not None else None
    machines = _read_calibrations(file, fp) if file is not None else {}
    entry = None if recalibrate else machines.get(key)
    eb = plain_expert_bytes(parts)
    if entry is not None and entry.get("expert_bytes") == eb and entry.get("bandwidth", 0) > 0:
        how = f"calibrated {entry['date']}, read from {file}"
    else:
        t = expert_compute_s(parts)
        entry = {"expert_compute_s": t, "expert_bytes": eb, "ratio": PAPER_TRANSFER_TO_COMPUTE,
                 "bandwidth": eb / (PAPER_TRANSFER_TO_COMPUTE * t), "date": date.today().isoformat()}
        how = "measured now"
        if file is not None:
            try:
                tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps({"fingerprint": fp, "machines": {**machines, key: entry}}, indent=2) + "\n")
                tmp.replace(file)
                how += f", stored in {file}"
            except OSError as e:
                how += f", not stored ({e.strerror or e})"
    link = Link(bandwidth=entry["bandwidth"], latency=0.0)
    q = parts.config.quant
    moved = f"; stored {q.describe()}: {store.expert_bytes / 2**10:.0f} KiB moved" if q else ""
    log(f"--link emulated:paper: one expert ({eb / 2**10:.0f} KiB{moved}) computes in "
        f"{1e6 * entry['expert_compute_s']:.1f} us on this machine -> {link.describe()} ({how}; "
        "`moejax calibrate --link` measures again)")
    return link


def machine() -> dict:
    import jax

    dev = jax.devices()[0]
    return {"date": date.today().isoformat(), "device": f"{dev.platform}:{dev.device_kind}",
            "host": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "jax": jax.__version__}


def markdown(records: list[dict]) -> str:
    lines = ["| budget | batch | policy | engine | pool slots | hit rate | subst. rate | MiB moved / token | TPOT ms | "
             "TTFT ms | prefetch precision | sched µs (median/layer) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    links = sorted({r["link"] for r in records if r["link"] != "none"})
    pools = sorted({r.get("pool", "shared pool") for r in records} - {"none"})
    head = ([f"Link: {', '.join(links)}"] if links else []) + ([f"Pool: {', '.join(pools)}"] if pools else [])
    if head:
        lines.insert(0, "; ".join(head) + "\n")
    for r in records:
        pp = "" if r["prefetch_precision"] != r["prefetch_precision"] else f"{r['prefetch_precision']:.2f}"
        policy = r["policy"] + (f" (prefetch width {r['prefetch_width']})" if r.get("prefetch_width") else "")
        lines.append(f"| {r['budget']} | {r['batch']} | {policy} | {r['engine']} | {r['pool_slots']} | "
                     f"{r['hit_rate']:.3f} | "
                     f"{r['substitution_rate']:.3f} | {r['bytes_h2d_per_token'] / 2**20:.3f} | {r['tpot_ms']:.2f} | {r['ttft_ms']:.1f} | {pp} | "
                     f"{r['sched_us_median']:.0f} |")
    return "\n".join(lines)
