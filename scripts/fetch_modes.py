"""The fused engine's fetch modes side by side (--modes): "cond" (each in-program fetch inside a
lax.cond, so a resident expert moves no bytes), "cond-write" (the fetch and its write into the
pool inside the lax.cond), "loop" (a while loop over the layer's fetches; the default) and
"always" (every fetch slot copies, branch-free). A mode with "@graphs" ("cond@graphs") compiles
its programs with XLA:GPU command buffers that hold conditionals and loops (GRAPHS below).

    python scripts/fetch_modes.py --trials 7 --new-tokens 64 --json docs/results/cpu_fetch_modes.json \
        [--h200-plugin DIR]

Bundled model, batch 1 and 3; budget 100% and 25% with policy lru, 25% with smoe (alpha 0.3,
window substitution). One engine per (budget, policy, batch, mode), reused across trials;
trials interleave the two modes (the order alternates per trial), each from an empty pool,
the first one preceded by the engine's warm-up (compiles both programs). TPOT: median over
trials of the trial's mean synchronised decode step; the mode ratio pairs each trial's median
step with the other mode's in the same trial.

Bytes per decode step: "needed" = experts the decisions fetch (the counter `fetched`, prefetches
included) x expert bytes; "moved" = what the program copies host -> device: in mode cond the
same (the copy runs only for a real fetch), in mode always every fetch slot copies every step:
per MoE layer U = min(batch * top_k, E) slots, plus U' = min(batch * top_k, E) prefetch slots
for each MoE layer followed by a MoE layer when the policy prefetches (smoe). That count comes
from the config and is checked against the HLO (dynamic-update-slices into the pool). A pool
that holds every expert (100%) has no fetch slots at all: both modes compile to one program.

HLO checks on each compiled decode program (CPU, `Compiled.as_text()`): instructions whose
result has the pool's full shape, by opcode (a `copy` of it would be a whole-pool copy per
step: must be 0); conditionals; dynamic-update-slices. With --h200-plugin (a folder where
`pip install --no-deps --target DIR jax-cuda12-plugin==<jax version> jax-cuda12-pjrt==<jax
version>` put the CUDA plugin), the same decode program is also compiled for an H200 target by
scripts/gpu_hlo.py and its async host->device copies and conditionals are counted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRIVIAL = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}
HLO_TYPES = {"uint16": "u16", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # pool dtype -> HLO
# "MODE@graphs": the mode's programs compiled with XLA:GPU command buffers (CUDA graphs) that may
# hold conditionals and while loops, so that a branch or a loop's next iteration is decided on
# the device. Without them every conditional and every loop iteration makes the GPU wait while
# the host reads the predicate. Ignored by XLA:CPU.
GRAPHS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"}


def engine_mode(mode: str) -> tuple[str, dict]:
    """"cond" -> ("cond", {}); "cond@graphs" -> ("cond", GRAPHS): the engine's fetch mode and
    compiler options."""
    base, _, extra = mode.partition("@")
    if extra not in ("", "graphs"):
        raise SystemExit(f"unknown fetch mode suffix in {mode!r}: only @graphs")
    return base, GRAPHS if extra else {}


def _options(mode: str) -> dict:
    """FusedEngine's xla_options for a mode, only where it has some (so that this script also
    runs against an engine from before xla_options, for a before/after of its HLO)."""
    options = engine_mode(mode)[1]
    return {"xla_options": options} if options else {}


# ---- HLO text ---------------------------------------------------------------------------
_COMP = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$")
_INSTR = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")


def parse_hlo(text: str) -> dict[str, list[dict]]:
    """Computation name ('ENTRY' for the entry) -> its instructions in text order (the
    schedule order in a scheduled module): name, shape, opcode, root, rest of the line."""
    comps, cur = {}, None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            cur = "ENTRY" if m.group(1) else m.group(2)
            comps[cur] = []
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            m = _INSTR.match(line)
            if m:
                comps[cur].append({"name": m.group(2), "shape": m.group(3), "op": m.group(4),
                                   "root": bool(m.group(1)), "rest": m.group(5)})
    return comps


def _dims(shape: str) -> str | None:
    """'u16[49,3,192,64]{3,2,1,0}' -> '49,3,192,64' (None for tuples)."""
    m = re.fullmatch(r"\w+\[([\d,]*)\](\{[^}]*\})?", shape.strip())
    return m.group(1) if m else None


def _called(instr) -> list[str]:
    """Computations an instruction calls (fusion body, conditional branches)."""
    found = re.findall(r"(?:calls|branch_computations|true_computation|false_computation)=(\{[^}]*\}|%?[\w.\-]+)",
                       instr["rest"])
    return [c.strip(" {}%") for g in found for c in g.split(",")]


def cpu_hlo_check(text: str, pool_shape: tuple[int, ...], pool_dtype: str) -> dict:
    """Whole-pool instructions and the counts the brief asks for, over every computation."""
    comps = parse_hlo(text)
    pool_dims = ",".join(map(str, pool_shape))
    ops, pool_ops, pool_fusions_in_place = Counter(), Counter(), 0
    for instrs in comps.values():
        for i in instrs:
            ops[i["op"]] += 1
            if _dims(i["shape"]) == pool_dims:
                pool_ops[i["op"]] += 1
                if i["op"] == "fusion":  # in place when its fused root is the pool's dynamic-update-slice
                    roots = [j["op"] for c in _called(i) for j in comps.get(c, []) if j["root"]]
                    pool_fusions_in_place += roots == ["dynamic-update-slice"]
    pool_copies = sum(1 for instrs in comps.values() for i in instrs
                      if i["op"] == "copy" and i["shape"].startswith(f"{pool_dtype}[{pool_dims}]"))
    return {"pool_shape": f"{pool_dtype}[{pool_dims}]", "pool_shaped_copies": pool_copies,
            "pool_shaped_ops": dict(pool_ops), "pool_shaped_fusions_rooted_in_dus": pool_fusions_in_place,
            "pool_dus": pool_ops.get("dynamic-update-slice", 0), "conditionals": ops.get("conditional", 0),
            "dynamic_update_slices": ops.get("dynamic-update-slice", 0), "copies": ops.get("copy", 0)}


def step_inventory(comps: dict[str, list[dict]]) -> dict:
    """What one decode step launches on a GPU: the instructions of the step loop's body (the
    while loop whose metadata is the decode program's own `while`), with nested loops' bodies
    and each conditional's larger branch (every fetch taken), counted once; trivial ones
    (parameters, constants, bitcasts, tuples) left out. Each conditional, and each iteration of
    a loop, makes the GPU wait for the host to read the predicate unless CUDA graphs hold it
    (XLA's ConditionalThunk and WhileThunk; a loop whose trip count XLA knows does not wait, but
    the fetch loops' counts are data): `host_waits` = conditionals + loops (+ one per loop
    iteration, which depends on the data)."""
    def count(name, acc):
        for i in comps.get(name, []):
            if i["op"] in TRIVIAL:
                continue
            if i["op"] == "call":  # an outlined computation: count what it runs
                count(re.search(r"to_apply=%?([\w.\-]+)", i["rest"]).group(1), acc)
                continue
            acc[i["op"]] += 1
            if i["op"] == "while":
                for key in ("condition", "body"):
                    count(re.search(key + r"=%?([\w.\-]+)", i["rest"]).group(1), acc)
            elif i["op"] == "conditional":
                branches = []
                for b in _called(i):
                    branches.append(Counter())
                    count(b, branches[-1])
                acc.update(max(branches, key=lambda c: sum(c.values())))
        return acc

    outer = [i for instrs in comps.values() for i in instrs
             if i["op"] == "while" and 'op_name="jit(steps)/while"' in i["rest"]]
    if len(outer) != 1:
        return {"error": f"{len(outer)} step loops found"}
    ops = count(re.search(r"body=%?([\w.\-]+)", outer[0]["rest"]).group(1), Counter())
    return {"ops": sum(ops.values()), "conditionals": ops["conditional"], "loops": ops["while"],
            "host_waits_without_graphs": f"{ops['conditional'] + ops['while']} + loop iterations",
            "by_op": dict(ops.most_common(8))}


def async_h2d_copies(comps: dict[str, list[dict]]) -> list[dict]:
    """Every asynchronous host -> device copy (an async start whose operand is in host memory,
    S(5)): its computation and that computation's size, "start/done" opcodes, and the
    non-trivial instructions the scheduler put between its start and its done (None if no
    done was found)."""
    out = []
    for cname, instrs in comps.items():
        for k, i in enumerate(instrs):
            if not i["op"].endswith("-start") or "S(5)" not in i["shape"]:
                continue
            done = next((j for j in range(k + 1, len(instrs))
                         if instrs[j]["op"].endswith("-done") and re.match(rf"%?{re.escape(i['name'])}\b",
                                                                           instrs[j]["rest"])), None)
            between = None if done is None else [
                x["op"] for x in instrs[k + 1:done] if x["op"] not in TRIVIAL and not x["op"].endswith(("-start", "-done"))]
            out.append({"computation": cname, "computation_size": len(instrs), "between": between,
                        "pair": f"{i['op']}/{instrs[done]['op'] if done is not None else 'missing'}"})
    return out


def h200_hlo_check(text: str, pool_shape: tuple[int, ...]) -> dict:
    """Async host->device copies (an async start whose operand is in host memory, S(5)), where
    they are scheduled, and what remains of conditionals and whole-pool copies."""
    comps = parse_hlo(text)
    branches = {c for instrs in comps.values() for i in instrs if i["op"] == "conditional" for c in _called(i)}
    pool_dims = ",".join(map(str, pool_shape))
    copies = async_h2d_copies(comps)
    pairs = [c["pair"] for c in copies]
    in_branch = sum(c["computation"] in branches for c in copies)
    in_entry = sum(c["computation"] == "ENTRY" for c in copies)
    between = [len(c["between"]) for c in copies if c["between"] is not None]
    ops = Counter(i["op"] for instrs in comps.values() for i in instrs)
    entry = Counter(i["op"] for i in comps.get("ENTRY", []))
    return {
        "per_step": step_inventory(comps),
        "host_params_S5": sum(1 for i in comps.get("ENTRY", []) if i["op"] == "parameter" and "S(5)" in i["shape"]),
        "async_h2d_pairs": dict(Counter(pairs)), "async_h2d_pairs_in_cond_branches": in_branch,
        "async_h2d_pairs_in_entry": in_entry,
        "ops_between_start_and_done": {"min": min(between), "median": statistics.median(between),
                                       "max": max(between)} if between else None,
        "conditionals": ops.get("conditional", 0), "conditionals_in_entry": entry.get("conditional", 0),
        "copy_start": ops.get("copy-start", 0), "pool_shaped_copies": sum(
            1 for instrs in comps.values() for i in instrs if i["op"] == "copy" and _dims(i["shape"]) == pool_dims),
        "host_compute_ops": text.count("_xla_compute_type"), "gathers_on_host": sum(
            1 for instrs in comps.values() for i in instrs if i["op"] == "gather" and "S(5)" in i["shape"]),
        "pool_dus": sum(1 for instrs in comps.values() for i in instrs
                        if i["op"] == "dynamic-update-slice" and _dims(i["shape"]) == pool_dims),
    }


# ---- the benchmark ----------------------------------------------------------------------
def fetch_slots(engine) -> int:
    """Fetch slots one decode step of this engine's program has (each copies in mode always)."""
    cfg = engine.config
    if engine.full:
        return 0
    U = min(engine.batch * cfg.top_k, cfg.num_experts)
    prefetching = [i for i in engine.moe_ids if i + 1 < cfg.num_layers and cfg.moe_layers[i + 1]]
    return U * len(engine.moe_ids) + (U * len(prefetching) if engine.policy.prefetch else 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "checkpoints/moejax-shakespeare-moe"))
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--trials", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batches", default="1,3")
    p.add_argument("--configs", default="100%:lru,25%:lru,25%:smoe", help="budget:policy pairs")
    p.add_argument("--modes", default="cond,always", help="fetch modes, cond first (ratios are to it)")
    p.add_argument("--alpha", type=float, default=0.3, help="smoe's substitution threshold")
    p.add_argument("--h200-plugin", type=Path, default=None,
                   help="folder holding jax_plugins/xla_cuda12 (pip --target); enables the H200 HLO check")
    p.add_argument("--gpu-hlo", type=Path, default=ROOT / "scripts", help="folder holding gpu_hlo.py")
    a = p.parse_args(argv)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT) if argv is None else "scripts/fetch_modes.py",
                                    *(sys.argv[1:] if argv is None else argv)])

    if a.h200_plugin:  # before jax is imported: the plugin registers itself at backend discovery
        sys.path.insert(0, str(a.h200_plugin.resolve()))
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # never try to start CUDA here
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    import jax
    import numpy as np

    from moejax.api import load_tokenizer, resolve
    from moejax.bench import machine, prompt_tokens
    from moejax.fused import FusedEngine
    from moejax.generate import NO_HOIST, cache_length
    from moejax.offload.budget import parse_budget
    from moejax.offload.store import load_parts

    h200, h200_why = None, None
    if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        h200_why = (f"no CUDA plugin importable: install jax-cuda12-plugin and jax-cuda12-pjrt {jax.__version__} "
                    "(pip install --no-deps --target DIR ...) and pass --h200-plugin DIR")
    else:
        sys.path.insert(0, str(a.gpu_hlo))
        try:
            from gpu_hlo import h200_hlo as h200
        except ImportError as exc:
            h200_why = f"cannot import gpu_hlo from {a.gpu_hlo}: {exc}"

    path = resolve(a.model)
    parts = load_parts(path)
    cfg = parts.config
    tok = load_tokenizer(path)
    S = cache_length(a.prompt_len, a.new_tokens)
    modes = tuple(a.modes.split(","))
    if modes[0] != "cond":
        raise SystemExit("--modes must start with cond (the reference of the ratios)")
    configs = [tuple(c.split(":")) for c in a.configs.split(",")]
    rows, hlo = [], []
    load0 = os.getloadavg()
    print(f"{path}: {len(cfg.moe_layer_ids)} MoE layers x {cfg.num_experts} experts, top-{cfg.top_k}, "
          f"expert {parts.store.expert_bytes} B; {a.trials} trials x {a.new_tokens} tokens", file=sys.stderr)
    for batch in [int(b) for b in a.batches.split(",")]:
        prompt = prompt_tokens(tok, cfg.vocab_size, batch, a.prompt_len)
        for budget, policy in configs:
            settings = {"alpha": a.alpha, "substitute": "window"} if policy == "smoe" else {}
            engines = {m: FusedEngine(path, policy, parse_budget(budget), batch=batch, cache_len=S, parts=parts,
                                      fetch_mode=engine_mode(m)[0], **settings, **_options(m)) for m in modes}
            runs = {m: [] for m in modes}
            for trial in range(a.trials):
                for m in (modes if trial % 2 == 0 else modes[::-1]):
                    e = engines[m]
                    e.reset()
                    g = e.generate(prompt, a.new_tokens, warmup=trial == 0)
                    runs[m].append((g, e.telemetry))
            for m in modes:
                e, gens, t = engines[m], [g for g, _ in runs[m]], runs[m][-1][1]  # counters: same every trial
                steps = len(gens[-1].step_s)
                slots = fetch_slots(e)
                needed = t.bytes_h2d_decode / steps
                moved = slots * e.store.expert_bytes if e.fetch_mode == "always" else needed
                rows.append({
                    "batch": batch, "budget": budget, "policy": policy, "alpha": settings.get("alpha", 0.0),
                    "fetch_mode": m, "pool_slots": e.plan.pool_slots, "fetch_slots_per_step": slots,
                    "tpot_ms": statistics.median(g.tpot_ms for g in gens),
                    "tpot_ms_trials": [g.tpot_ms for g in gens],
                    # the median step of each trial: robust to the odd step preempted by other load
                    "step_ms_median_trials": [1e3 * statistics.median(g.step_s) for g in gens],
                    "ttft_ms": statistics.median(1e3 * g.ttft_s for g in gens),
                    "compile_s": e.compile_s, "hit_rate": t.hit_rate, "substitution_rate": t.substitution_rate,
                    "decode_steps": steps, "transfers": t.transfers, "transfers_per_step": t.transfers / steps,
                    "prefetch_issued": t.prefetch_issued, "bytes_h2d_decode": t.bytes_h2d_decode,
                    "bytes_needed_per_step": needed, "bytes_moved_per_step": moved,
                    "bytes_moved_source": "config: fetch slots x expert bytes, every step" if e.fetch_mode == "always" else
                    "counters (fetched x expert bytes)",
                    "same_tokens_as_cond": all(g.tokens == c.tokens for (g, _), (c, _) in zip(runs[m], runs["cond"])),
                })
                print(json.dumps({k: rows[-1][k] for k in ("batch", "budget", "policy", "fetch_mode", "tpot_ms",
                                                           "hit_rate", "bytes_needed_per_step",
                                                           "bytes_moved_per_step")}), file=sys.stderr)
                (program,) = [c for k, c in e.compiled_programs.items() if k[0] == "decode"]
                rec = {"batch": batch, "budget": budget, "policy": policy, "fetch_mode": m,
                       "fetch_slots_per_step": slots,
                       "cpu": cpu_hlo_check(program.as_text(), e.pool.shape, HLO_TYPES[np.dtype(e.pool.dtype).name])}
                # a loop has one write per layer, whatever the number of fetch slots
                rec["fetch_slots_match_hlo"] = None if e.fetch_mode == "loop" else rec["cpu"]["pool_dus"] == slots
                if h200 and not e.full:  # a full pool's program has no fetches: nothing to see
                    # the engine's own decode function and arguments, as FusedEngine._ensure compiles them
                    fn = jax.jit(e._decode_fn(0.0, 1.0), donate_argnums=(2, 3, 4), compiler_options=NO_HOIST)
                    args = e._decode_args(np.zeros(batch, np.int32), 0)
                    t0 = time.perf_counter()
                    rec["h200"] = h200_hlo_check(h200(fn, *args), e.pool.shape)
                    rec["h200"]["compile_s"] = time.perf_counter() - t0
                hlo.append(rec)
                print(json.dumps(rec), file=sys.stderr)
            del engines, runs

    out = {**machine(), "command": command, "model": a.model if not Path(a.model).is_absolute()
           else os.path.relpath(a.model, ROOT), "converted": str(path),
           "load_avg_1min_start_end": [load0[0], os.getloadavg()[0]],
           "settings": {"trials": a.trials, "new_tokens": a.new_tokens, "prompt_len": a.prompt_len,
                        "temperature": 0.0, "cache_len": S, "expert_bytes": parts.store.expert_bytes,
                        "moe_layers": len(cfg.moe_layer_ids), "experts": cfg.num_experts, "top_k": cfg.top_k},
           "h200_check": f"scripts/gpu_hlo.py, jax-cuda12-plugin {_version('jax-cuda12-plugin')}"
           if h200 else h200_why,
           "rows": rows, "hlo": hlo}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2) + "\n")
    print(markdown(rows))
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def markdown(rows: list[dict]) -> str:
    """The table. "mode / cond": median over trials of the ratio of the two modes' median step
    in the same trial (run back to back), which cancels most of a shared machine's drift."""
    cond = {(r["batch"], r["budget"], r["policy"]): r for r in rows if r["fetch_mode"] == "cond"}
    lines = ["| budget | batch | policy | fetch mode | hit rate | transfers / step | KiB needed / step | "
             "KiB moved / step | TPOT ms (median) | mode / cond (paired) | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = cond[(r["batch"], r["budget"], r["policy"])]
        pairs = zip(r["step_ms_median_trials"], c["step_ms_median_trials"])
        ratio = "" if r["fetch_mode"] == "cond" else f"{statistics.median(x / y for x, y in pairs):.2f}"
        lines.append(f"| {r['budget']} | {r['batch']} | {r['policy']} | {r['fetch_mode']} | {r['hit_rate']:.3f} | "
                     f"{r['transfers_per_step']:.2f} | {r['bytes_needed_per_step'] / 1024:.0f} | "
                     f"{r['bytes_moved_per_step'] / 1024:.0f} | {r['tpot_ms']:.2f} | {ratio} | "
                     f"{'yes' if r['same_tokens_as_cond'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
