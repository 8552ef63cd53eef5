"""`moejax convert|decode`: thin argparse front ends; heavy imports happen inside commands.

Bad input (a `MoejaxError`, or a flag argparse rejects) prints one line `error: ...` on
stderr and exits with code 2, never a traceback. Commands that compile keep the compiled
programs in $MOEJAX_CACHE/xla (`moejax.api.enable_compile_cache`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moejax.errors import MoejaxError

BUNDLED = "moejax-shakespeare-moe"
# Chosen on the bundled model at a 25% budget (docs/benchmarks.md): the largest alpha whose
# top-1 agreement with the resident model stays >= 95% and perplexity within 2%.
DEFAULT_ALPHA = 0.3


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


def bundled_model() -> Path:
    """The default model shipped in the repository's checkpoints/ folder."""
    path = Path(__file__).resolve().parent.parent / "checkpoints" / BUNDLED
    if not path.is_dir():
        raise MoejaxError(f"the bundled model is not at {path}; pass --model DIR")
    return path


def write_json(path: str, obj) -> None:
    """Write atomically: a reader never sees a half-written file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise MoejaxError(f"--json: directory {path.parent} does not exist")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def cmd_convert(args) -> None:
    from moejax.convert import convert

    cfg = convert(args.src, args.dst, dtype=args.dtype, force=args.force)
    print(f"converted {cfg.model_type}: {cfg.num_layers} layers, {cfg.num_experts} experts/layer, "
          f"top-{cfg.top_k} -> {args.dst}", file=sys.stderr)


def engine_settings(args, path, cfg) -> dict:
    """--alpha/--substitute/--similarity/--score-window -> OffloadEngine keyword arguments."""
    from moejax.offload import similarity
    from moejax.offload.importance import MODES

    if not 0 <= args.alpha < 1:
        raise MoejaxError(f"--alpha {args.alpha} must be in [0, 1)")
    if args.substitute not in MODES:
        raise MoejaxError(f"--substitute {args.substitute!r} is not one of {', '.join(MODES)}")
    if args.score_window < 1:
        raise MoejaxError("--score-window must be at least 1")
    sim = None
    if args.substitute != "window" or args.similarity:
        sim = similarity.load(Path(args.similarity) if args.similarity else path / similarity.FILE, cfg)
    return dict(alpha=args.alpha, substitute=args.substitute, similarity=sim, score_window=args.score_window)


def engine_kind(args) -> str:
    """--engine, fused by default; an emulated --link runs the stepwise engine."""
    link = getattr(args, "link", "real")
    if link.startswith("emulated"):
        if args.engine == "fused":
            raise MoejaxError(f"--link {link} runs on the stepwise engine; "
                              "pass --engine stepwise or leave --engine out")
        return "stepwise"
    return args.engine or "fused"


def cmd_decode(args) -> None:
    import numpy as np

    from moejax import checkpoint
    from moejax.api import load_tokenizer, resolve
    from moejax.generate import cache_length
    from moejax.offload.budget import parse_budget, plan_budget
    from moejax.offload.policies import ALL_NAMES

    if not args.prompt:
        raise MoejaxError("--prompt is empty")
    if args.max_new_tokens < 1:
        raise MoejaxError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise MoejaxError("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        raise MoejaxError("--top-p must be in (0, 1]")
    spec = parse_budget(args.vram_budget) if args.vram_budget else None
    policy = args.policy or ("smoe" if spec else "resident")
    if policy not in ALL_NAMES:
        raise MoejaxError(f"--policy {policy!r} is not one of {', '.join(ALL_NAMES)}")
    kind = "none" if policy == "resident" else engine_kind(args)  # resident: the model itself, no engine
    path = resolve(args.model or bundled_model())
    cfg, dtype = checkpoint.read_meta(path)
    tok = load_tokenizer(path)
    if tok is None:
        raise MoejaxError(f"{path} has no tokenizer.json")
    prompt = tok.encode(args.prompt).ids
    if not prompt:
        raise MoejaxError("--prompt encodes to no tokens")
    if len(prompt) + args.max_new_tokens > cfg.max_position_embeddings:
        raise MoejaxError(f"prompt ({len(prompt)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds "
                          f"the model's context of {cfg.max_position_embeddings}")
    S = cache_length(len(prompt), args.max_new_tokens)
    from moejax.convert import DTYPES

    itemsize = DTYPES[dtype].itemsize
    settings = engine_settings(args, path, cfg)
    if policy == "resident":
        plan = plan_budget(cfg, itemsize, 1, S, None)
        if spec is not None and (spec[0] == "pct" and spec[1] < 1 or spec[0] == "bytes" and spec[1] < plan.budget_bytes):
            raise MoejaxError(f"--policy resident keeps all {plan.total_experts} experts on the device "
                              f"({plan.budget_bytes / 2**20:.1f} MiB); raise --vram-budget or choose another policy")
    else:
        from moejax.engine import make_engine

        engine = make_engine(kind, path, policy, spec, batch=1, cache_len=S, **settings)
        if hasattr(engine, "prepare"):  # compile first: the plan budgets the programs' temporaries
            engine.prepare(len(prompt), args.temperature, args.top_p)
        plan = engine.plan
    subst = f", alpha {args.alpha:g}, substitute {args.substitute}" if policy in ("score-sub", "smoe") else ""
    print(f"model {cfg.model_type} ({args.model or path}), {dtype}; policy {policy}{subst}; engine {kind}; "
          f"{plan.describe()}", file=sys.stderr)

    shown = ""
    generated: list[int] = []

    def stream(tok_ids):
        nonlocal shown
        generated.append(int(tok_ids[0]))
        text = tok.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    kw = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop_ids=cfg.eos_token_ids,
              on_token=stream, warmup=True)
    sys.stdout.write(args.prompt)
    if policy == "resident":
        import moejax

        g = moejax.load(path).generate(np.array([prompt]), args.max_new_tokens, **kw)
        stats = {"hit_rate": 1.0, "substitution_rate": 0.0, "bytes_h2d": 0, "bytes_h2d_prefill": 0, "transfers": 0,
                 "ttft_ms": 1e3 * g.ttft_s, "tpot_ms": g.tpot_ms, "peak_device_bytes": plan.budget_bytes}
    else:
        g = engine.generate(np.array([prompt]), args.max_new_tokens, **kw)
        stats = engine.telemetry.summary()
    sys.stdout.write("\n")
    tokens = g.tokens[0]
    # the fused engine compiled before the plan was printed (its own clock); otherwise the
    # warm-up (compilation plus a two-token run) is the compile time
    compile_s = getattr(engine, "compile_s", 0.0) if policy != "resident" else 0.0
    compile_s = compile_s or g.warmup_s
    tps = 1e3 / g.tpot_ms if g.step_s else float("nan")
    print(f"{len(tokens)} tokens | engine {kind} | hit rate {stats['hit_rate']:.3f} | "
          f"moved {stats['bytes_h2d'] / 2**20:.1f} MiB in {stats['transfers']} transfers | "
          f"TTFT {stats['ttft_ms']:.1f} ms | TPOT {g.tpot_ms:.2f} ms ({tps:.1f} tok/s) | compile {compile_s:.1f} s",
          file=sys.stderr)
    if args.json:
        write_json(args.json, {
            "tokens": tokens, "text": tok.decode(tokens), "prompt_tokens": len(prompt), "policy": policy,
            "engine": kind,
            "alpha": args.alpha if subst else 0.0, "substitute": args.substitute if subst else None,
            "budget_bytes": plan.budget_bytes, "pool_slots": plan.pool_slots,
            "pool_share": plan.pool_share, **stats, "compile_s": compile_s, "model": str(path),
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
        })


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise MoejaxError(f"{flag} {text!r}: expected comma-separated integers") from None
    if any(v < 1 for v in values):
        raise MoejaxError(f"{flag} {text!r}: values must be at least 1")
    return values


def cmd_bench(args) -> None:
    from moejax.api import resolve
    from moejax.bench import machine, markdown, run_bench
    from moejax.offload.budget import parse_budget
    from moejax.offload.policies import ALL_NAMES

    budgets = [(b, parse_budget(b)) for b in args.vram_budget.split(",")]
    batches = _int_list(args.batch, "--batch")
    policies = args.policies.split(",")
    for p in policies:
        if p not in ALL_NAMES:
            raise MoejaxError(f"--policies: {p!r} is not one of {', '.join(ALL_NAMES)}")
    if args.trials < 1 or args.new_tokens < 2:
        raise MoejaxError("--trials must be >= 1 and --new-tokens >= 2")
    asked = args.engine.split(",") if args.engine else [None]
    kinds = [engine_kind(argparse.Namespace(engine=k, link=args.link)) for k in asked]
    if any(k not in ("fused", "stepwise") for k in kinds):
        raise MoejaxError(f"--engine {args.engine!r}: expected fused, stepwise or fused,stepwise")
    kinds = list(dict.fromkeys(kinds))
    kind = ",".join(kinds)
    path = resolve(args.model or bundled_model())
    from moejax import checkpoint

    settings = engine_settings(args, path, checkpoint.read_meta(path)[0])
    from moejax.engine import load_parts

    parts = load_parts(path)
    link = _link(args, parts, path)
    from moejax.bench import h2d_bandwidth

    bw = None if link.emulated else h2d_bandwidth(parts)
    print(f"engine {kind}; link: {link.describe()}" + (f" (measured host -> device: {bw / 1e9:.2f} GB/s per "
                                                       "expert fetch)" if bw else ""), file=sys.stderr)
    records = run_bench(path, budgets, batches, policies, args.new_tokens, args.prompt_len, args.trials,
                        {**settings, "link": link}, parts=parts, engines=tuple(kinds))
    meta = {**machine(), "model": str(args.model or path), "command": "moejax " + " ".join(sys.argv[1:]),
            "engine": kind, "link": link.describe(), "h2d_bytes_per_s": bw}
    write_json(args.json, {"meta": meta, "records": records})
    table = markdown(records)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.figure:
        from moejax.plots import policy_bars

        policy_bars(records, args.figure)


def read_text_tokens(path: str, tok, min_tokens: int = 2):
    import numpy as np

    if tok is None:
        raise MoejaxError("the model has no tokenizer.json to read --text with")
    p = Path(path)
    if not p.is_file():
        raise MoejaxError(f"--text {path}: no such file")
    text = p.read_text(errors="replace")
    if not text.strip():
        raise MoejaxError(f"--text {path} is empty")
    ids = np.array(tok.encode(text).ids, np.int32)
    if len(ids) < min_tokens:
        raise MoejaxError(f"--text {path} has {len(ids)} tokens; at least {min_tokens} are needed")
    return ids


def cmd_calibrate(args) -> None:
    import moejax
    from moejax.offload import similarity

    if args.method not in ("output", "weights"):
        raise MoejaxError(f"--method {args.method!r} is not one of output, weights")
    if args.link:  # the emulated paper link instead of the similarity
        from moejax.api import resolve
        from moejax.bench import paper_link
        from moejax.offload.store import load_parts

        path = resolve(args.model or bundled_model())
        paper_link(load_parts(path), path, recalibrate=True)
        return
    model = moejax.load(args.model or bundled_model())
    out = Path(args.out) if args.out else model.path / similarity.FILE
    if out.exists() and not args.force:
        raise MoejaxError(f"{out} exists (use --force to overwrite)")
    tokens = None
    if args.method == "output":
        if not args.text:
            raise MoejaxError("--method output needs --text FILE (calibration text)")
        tokens = read_text_tokens(args.text, model.tokenizer, 2)[: args.max_tokens][None]
    layers = similarity.calibrate(model, tokens, args.method)
    similarity.save(out, model.config, layers, args.method)
    off = [float((s.sum() - s.trace()) / (s.size - len(s))) for s in layers.values()]
    print(f"wrote {args.method} similarity of {len(layers)} layers to {out} "
          f"(mean off-diagonal {sum(off) / len(off):.3f})", file=sys.stderr)


def cmd_eval_ppl(args) -> None:
    import moejax
    from moejax.engine import make_engine
    from moejax.eval.ppl import evaluate
    from moejax.generate import cache_length
    from moejax.offload.budget import parse_budget
    from moejax.offload.policies import POLICIES

    spec = parse_budget(args.vram_budget) if args.vram_budget else None
    if args.policy not in POLICIES:
        raise MoejaxError(f"--policy {args.policy!r} is not one of {', '.join(POLICIES)}")
    kind = engine_kind(args)
    model = moejax.load(args.model or bundled_model())
    settings = engine_settings(args, model.path, model.config)
    tokens = read_text_tokens(args.text, model.tokenizer, args.prefix + 1)[: args.max_tokens]
    engine = make_engine(kind, model.path, args.policy, spec, cache_len=cache_length(len(tokens), 0), **settings)
    result = evaluate(model, engine, tokens, args.prefix, progress=True)
    result.update(engine=kind, policy=args.policy, alpha=args.alpha, substitute=args.substitute,
                  budget_bytes=engine.plan.budget_bytes, pool_slots=engine.plan.pool_slots)
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    if args.json:
        write_json(args.json, result)


def cmd_trace_record(args) -> None:
    import numpy as np

    from moejax import checkpoint
    from moejax.api import load_tokenizer, resolve
    from moejax.engine import make_engine
    from moejax.eval.trace import TraceRecorder
    from moejax.generate import cache_length
    from moejax.offload.budget import parse_budget

    out = Path(args.out)
    if out.exists() and not args.force:
        raise MoejaxError(f"{out} exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise MoejaxError(f"--out: directory {out.parent} does not exist")
    if not args.prompt:
        raise MoejaxError("--prompt is empty")
    path = resolve(args.model or bundled_model())
    cfg, _ = checkpoint.read_meta(path)
    tok = load_tokenizer(path)
    if tok is None:
        raise MoejaxError(f"{path} has no tokenizer.json")
    ids = tok.encode(args.prompt).ids
    spec = parse_budget(args.vram_budget) if args.vram_budget else None
    engine = make_engine("stepwise", path, args.policy, spec, cache_len=cache_length(len(ids), args.max_new_tokens),
                         **engine_settings(args, path, cfg))
    engine.recorder = TraceRecorder()
    engine.generate(np.array([ids]), args.max_new_tokens, stop_ids=cfg.eos_token_ids)
    engine.recorder.save(out, cfg, 1)
    print(f"recorded {len(engine.recorder.steps)} decode steps x {len(cfg.moe_layer_ids)} MoE layers to {out} "
          f"(stepwise engine: policy {args.policy}, hit rate {engine.telemetry.hit_rate:.3f})", file=sys.stderr)


def cmd_replay(args) -> None:
    from moejax import checkpoint
    from moejax.api import resolve
    from moejax.eval.trace import REPLAYABLE, Trace, replay

    cfg = checkpoint.read_meta(resolve(args.model))[0] if args.model else None
    if not Path(args.trace).is_file():
        raise MoejaxError(f"no trace at {args.trace}")
    trace = Trace(Path(args.trace), cfg)
    policies = args.policy.split(",")
    for p in policies:
        if p not in REPLAYABLE:
            raise MoejaxError(f"--policy {p!r} cannot be replayed (replayable: {', '.join(REPLAYABLE)})")
    sizes = []
    for c in args.cache.split(","):
        c = c.strip()
        try:
            slots = round(float(c[:-1]) / 100 * trace.total_experts) if c.endswith("%") else int(c)
        except ValueError:
            raise MoejaxError(f"--cache {c!r}: expected a slot count or a percentage") from None
        sizes.append(slots)
    rows = [replay(trace, p, n, alpha=args.alpha) for n in sizes for p in policies]
    print("| policy | slots | share | hit rate | transfers |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['slots']} | {100 * r['share']:.1f}% | {r['hit_rate']:.3f} | {r['transfers']} |")
    if args.json:
        write_json(args.json, {"trace": str(args.trace), "rows": rows})
    if args.figure:
        from moejax.plots import hit_rate_curves

        hit_rate_curves(rows, args.figure, "hit rate vs cache size (trace replay)")


def cmd_eval_sweep(args) -> None:
    import moejax
    from moejax.engine import load_parts, make_engine
    from moejax.eval.ppl import evaluate
    from moejax.generate import cache_length
    from moejax.offload.budget import parse_budget

    try:
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        raise MoejaxError(f"--alphas {args.alphas!r}: expected comma-separated numbers") from None
    bad = [a for a in alphas if not 0 <= a < 1]
    if bad:
        raise MoejaxError(f"--alphas: {bad[0]} is not in [0, 1)")
    spec = parse_budget(args.vram_budget)
    kind = engine_kind(args)
    model = moejax.load(args.model or bundled_model())
    args.alpha = 0.0
    settings = engine_settings(args, model.path, model.config)
    tokens = read_text_tokens(args.text, model.tokenizer, args.prefix + 1)[: args.max_tokens]
    prompt = tokens[None, : args.prefix]
    parts = load_parts(model.path)
    link = _link(args, parts, model.path)
    rows = []
    for a in alphas:
        settings["alpha"] = a
        e = make_engine(kind, model.path, args.policy, spec, cache_len=cache_length(len(tokens), args.new_tokens),
                        parts=parts, link=link, **settings)
        row = {"alpha": a, **evaluate(model, e, tokens, args.prefix)}
        e.reset()
        g = e.generate(prompt, args.new_tokens, warmup=True)
        row.update(tpot_ms=g.tpot_ms, compile_s=g.warmup_s, tpot_hit_rate=e.telemetry.hit_rate, engine=kind,
                   link=link.describe())
        rows.append(row)
        print(f"{kind} engine, alpha {a:g}: ppl {row['ppl']:.3f} (resident {row['ppl_resident']:.3f}), top-1 "
              f"{row['top1_agreement']:.3f}, KL {row['kl']:.4f}, hit rate {row['hit_rate']:.3f}, "
              f"TPOT {row['tpot_ms']:.2f} ms, compile {g.warmup_s:.1f} s", file=sys.stderr)
    table = [f"Engine: {kind}, {link.describe()}\n",
             "| alpha | ppl | ppl change | top-1 agreement | KL | hit rate | subst. rate | TPOT ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['alpha']:g} | {r['ppl']:.3f} | {100 * (r['ppl'] / r['ppl_resident'] - 1):+.2f}% | "
                     f"{r['top1_agreement']:.3f} | {r['kl']:.4f} | {r['hit_rate']:.3f} | "
                     f"{r['substitution_rate']:.3f} | {r['tpot_ms']:.2f} |")
    print("\n".join(table))
    meta = {"engine": kind, "policy": args.policy, "budget": args.vram_budget, "substitute": args.substitute,
            "text": args.text, "link": link.describe(), "command": "moejax " + " ".join(sys.argv[1:])}
    if args.json:
        write_json(args.json, {"meta": meta, "rows": rows})
    if args.markdown:
        Path(args.markdown).write_text("\n".join(table) + "\n")
    if args.figure:
        from moejax.plots import alpha_sweep

        alpha_sweep(rows, args.figure, f"{args.policy} at {args.vram_budget} ({kind} engine, {link.describe()})")


def _link(args, parts, path):
    """--link real | emulated:BW,LAT | emulated:paper (moejax.bench.paper_link: calibrated once per
    model and machine, stored beside the checkpoint at path)."""
    from moejax.offload.store import parse_link

    if getattr(args, "link", "real") == "emulated:paper":
        from moejax.bench import paper_link

        return paper_link(parts, path)
    return parse_link(getattr(args, "link", "real"))


def _engine_flags(p, stepwise_only: bool = False, several: bool = False) -> None:
    if several:
        p.add_argument("--engine", default=None,
                       help="fused (default), stepwise, or fused,stepwise to compare them side by side in one "
                            "run; an emulated --link runs stepwise")
    elif stepwise_only:
        p.add_argument("--engine", choices=["stepwise"], default="stepwise",
                       help="stepwise only: recording is a research hook of the stepwise engine")
    else:
        p.add_argument("--engine", choices=["fused", "stepwise"], default=None,
                       help="fused (default: one XLA program per decode step) or stepwise (each layer driven "
                            "from Python: emulated links, research hooks); an emulated --link runs stepwise")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"importance threshold (docs/method.md 1) for score-sub/smoe; 0 disables substitution "
                        f"and makes every policy exact (default {DEFAULT_ALPHA}, see docs/benchmarks.md)")
    p.add_argument("--substitute", default="window",
                   help="window (default: the paper's rule, needs no calibration), hybrid or similarity")
    p.add_argument("--similarity", help="similarity file (default: similarity.npz beside the checkpoint)")
    p.add_argument("--score-window", type=int, default=16,
                   help="decode steps over which score-aware eviction averages router probabilities")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moejax", description="MoE inference with expert offloading in JAX")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("convert", help="convert a Hugging Face MoE checkpoint")
    c.add_argument("src", help="HF checkpoint directory (config.json + *.safetensors)")
    c.add_argument("dst", help="output directory")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weight dtype (default: the source's)")
    c.add_argument("--force", action="store_true", help="overwrite dst if it exists")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("decode", help="generate text from a prompt")
    d.add_argument("--model", help="converted or HF checkpoint directory (default: the bundled model)")
    d.add_argument("--prompt", required=True)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--vram-budget", help="device memory for weights + KV cache + expert pool (512MiB, 6GiB, "
                   "1.5GB), or PCT%% = share of routed experts the pool holds; default: everything resident")
    d.add_argument("--policy", help="resident, ondemand, lru, lfu, lru-prefetch, score, score-sub, smoe "
                   "(default: smoe with a budget, else resident)")
    _engine_flags(d)
    d.add_argument("--json", help="write a JSON record of the run here")
    d.set_defaults(func=cmd_decode)

    b = sub.add_parser("bench", help="compare policies side by side (TPOT, TTFT, hit rate, bytes moved)")
    b.add_argument("--model", help="converted or HF checkpoint (default: the bundled model)")
    b.add_argument("--vram-budget", default="25%,50%", help="comma-separated budgets (default 25%%,50%%)")
    b.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    b.add_argument("--policies", default="resident,ondemand,lru,lfu,lru-prefetch,score,score-sub,smoe")
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--prompt-len", type=int, default=16)
    b.add_argument("--trials", type=int, default=3)
    b.add_argument("--link", default="real", help="'real' (device_put as it is), 'emulated:BW,LAT', e.g. "
                   "emulated:2GB/s,10us (one transfer at a time, each at least LAT + bytes/BW), or "
                   "'emulated:paper' (the paper's transfer/compute ratio, see docs/benchmarks.md)")
    _engine_flags(b, several=True)
    b.add_argument("--json", required=True, help="write the records here")
    b.add_argument("--markdown", help="also write the markdown table here")
    b.add_argument("--figure", help="also write TPOT and hit rate per policy as a PNG")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("calibrate", help="precompute per-layer expert similarity")
    c.add_argument("--model", help="converted or HF checkpoint (default: the bundled model)")
    c.add_argument("--text", help="calibration text file (for --method output)")
    c.add_argument("--method", default="output", help="output (default; needs --text) or weights")
    c.add_argument("--max-tokens", type=int, default=512)
    c.add_argument("--out", help="output file (default: similarity.npz beside the checkpoint)")
    c.add_argument("--force", action="store_true")
    c.add_argument("--link", action="store_true",
                   help="instead of the similarity: time one expert on this machine and store the link that "
                        "--link emulated:paper uses beside the checkpoint (replacing a stored one)")
    c.set_defaults(func=cmd_calibrate)

    t = sub.add_parser("trace", help="record router traces")
    tsub = t.add_subparsers(dest="what", required=True, parser_class=_Parser)
    tr = tsub.add_parser("record", help="run the engine and record every layer's routing")
    tr.add_argument("--model")
    tr.add_argument("--prompt", required=True)
    tr.add_argument("--max-new-tokens", type=int, default=64)
    tr.add_argument("--vram-budget")
    tr.add_argument("--policy", default="lru")
    tr.add_argument("--out", required=True)
    tr.add_argument("--force", action="store_true")
    _engine_flags(tr, stepwise_only=True)
    tr.set_defaults(func=cmd_trace_record)

    r = sub.add_parser("replay", help="simulate policies on a trace, without the model (incl. belady)")
    r.add_argument("trace")
    r.add_argument("--model", help="check that the trace was recorded with this model")
    r.add_argument("--policy", default="lru,lfu,score,belady", help="comma-separated")
    r.add_argument("--cache", default="10%,25%,50%,75%", help="comma-separated slot counts or percentages")
    r.add_argument("--alpha", type=float, default=0.0, help="for score-sub")
    r.add_argument("--json")
    r.add_argument("--figure", help="write hit rate vs cache size as a PNG")
    r.set_defaults(func=cmd_replay)

    e = sub.add_parser("eval", help="accuracy of offloaded decoding")
    esub = e.add_subparsers(dest="what", required=True, parser_class=_Parser)
    ep = esub.add_parser("ppl", help="decode-mode perplexity, top-1 agreement and KL against the resident model")
    ep.add_argument("--model")
    ep.add_argument("--text", required=True)
    ep.add_argument("--vram-budget")
    ep.add_argument("--policy", default="smoe")
    ep.add_argument("--prefix", type=int, default=8, help="tokens prefilled before teacher forcing starts")
    ep.add_argument("--max-tokens", type=int, default=512)
    ep.add_argument("--json")
    _engine_flags(ep)
    ep.set_defaults(func=cmd_eval_ppl)
    es = esub.add_parser("sweep", help="accuracy, hit rate and TPOT across alpha at one budget")
    es.add_argument("--model")
    es.add_argument("--text", required=True)
    es.add_argument("--vram-budget", default="25%")
    es.add_argument("--policy", default="smoe")
    es.add_argument("--alphas", default="0,0.1,0.2,0.25,0.3,0.35,0.45,0.6")
    es.add_argument("--prefix", type=int, default=16)
    es.add_argument("--max-tokens", type=int, default=512)
    es.add_argument("--new-tokens", type=int, default=32, help="tokens generated to time TPOT")
    es.add_argument("--link", default="real", help="real, emulated:BW,LAT or emulated:paper")
    es.add_argument("--json")
    es.add_argument("--markdown")
    es.add_argument("--figure")
    _engine_flags(es)
    es.set_defaults(func=cmd_eval_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a flag argparse rejected (2, message already printed)
        return int(e.code or 0)
    try:
        if args.command not in ("convert", "replay"):  # the commands that compile
            from moejax.api import enable_compile_cache

            enable_compile_cache()
        args.func(args)
    except MoejaxError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
