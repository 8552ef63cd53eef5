"""`moejax convert|decode|bench|calibrate|trace|replay|eval`: thin argparse front ends; heavy
imports happen inside commands.

Bad input (a `MoejaxError`, or a flag argparse rejects) prints one line `error: ...` on
stderr and exits with code 2, never a traceback. Commands that compile keep the compiled
programs in $MOEJAX_CACHE/xla (`moejax.api.enable_compile_cache`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
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


def check_output(flag: str, path, force: bool | None = None) -> Path | None:
    """Refuse an output path before any work is done: its directory must exist and be
    writable, and the path must not be a directory. JSON records, tables and figures are
    replaced when they exist (force=None); outputs that have a --force flag (trace, similarity)
    are kept unless it is given."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise MoejaxError(f"{flag} {path} is a directory; name a file")
    if not p.parent.is_dir():
        raise MoejaxError(f"{flag} {path}: directory {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise MoejaxError(f"{flag} {path}: directory {p.parent} is not writable")
    if force is False and p.exists():
        raise MoejaxError(f"{path} exists (use --force to overwrite)")
    return p


def write_text(path, text: str) -> None:
    """Write atomically: a reader never sees a half-written file, a failed write leaves none."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MoejaxError(f"cannot write {path}: {e.strerror or e}") from None


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def parse_budget_arg(text: str, flag: str = "--vram-budget", plain: str = "bytes") -> tuple[str, float]:
    """Every budget flag: '25%' -> ('pct', 0.25), '2GiB' -> ('bytes', 2147483648), and a plain
    number is bytes, or with plain="slots" ('12' -> ('slots', 12)) a slot count (`replay --cache`,
    which takes no byte sizes). Shares above 100% are refused."""
    from moejax.offload.budget import parse_budget

    t = str(text).strip()
    if plain == "slots" and t.isdigit():
        if int(t) < 1:
            raise MoejaxError(f"{flag} {text}: at least 1 slot")
        return "slots", int(t)
    try:
        spec = parse_budget(t)
    except MoejaxError as e:  # the one parser; name the flag it came from
        raise MoejaxError(str(e).replace("--vram-budget", flag, 1)) from None
    if plain == "slots" and spec[0] == "bytes":
        raise MoejaxError(f"{flag} {text!r}: expected a slot count or a percentage like 25%")
    return spec


@dataclass(frozen=True)
class Substitution:
    """--alpha, --substitute, --similarity, --score-window and --prefetch-width, validated once
    when made: what score-aware eviction, substitution and prefetch (score-sub, smoe,
    lru-prefetch) are given."""

    alpha: float = DEFAULT_ALPHA
    mode: str = "window"
    similarity: str | None = None  # file; default: similarity.npz beside the checkpoint
    score_window: int = 16
    prefetch_width: int = 0  # 0: the paper's rule; P: the P most probable missing experts

    def __post_init__(self):
        from moejax.offload.importance import MODES

        if not 0 <= self.alpha < 1:
            raise MoejaxError(f"--alpha {self.alpha:g} must be in [0, 1)")
        if self.mode not in MODES:
            raise MoejaxError(f"--substitute {self.mode!r} is not one of {', '.join(MODES)}")
        if self.score_window < 1:
            raise MoejaxError("--score-window must be at least 1")
        if self.prefetch_width < 0:
            raise MoejaxError(f"--prefetch-width {self.prefetch_width} must be 0 or more")

    @classmethod
    def from_args(cls, args) -> "Substitution":
        return cls(getattr(args, "alpha", 0.0), args.substitute, args.similarity, args.score_window,
                   args.prefetch_width)

    def engine_kwargs(self, path, cfg) -> dict:
        """The engines' keyword arguments (make_engine), the similarity file read if needed."""
        import zipfile

        from moejax.offload import similarity
        from moejax.offload.importance import SIMILARITY_MODES

        sim = None
        if self.mode in SIMILARITY_MODES or self.similarity:
            file = Path(self.similarity) if self.similarity else Path(path) / similarity.FILE
            try:
                sim = similarity.load(file, cfg)
            except (EOFError, zipfile.BadZipFile):
                raise MoejaxError(f"{file} is not a moejax similarity file (truncated or empty)") from None
        return dict(alpha=self.alpha, substitute=self.mode, similarity=sim, score_window=self.score_window,
                    prefetch_width=self.prefetch_width)

    def describe(self) -> str:
        width = f", prefetch width {self.prefetch_width}" if self.prefetch_width else ""
        return f"alpha {self.alpha:g}, substitute {self.mode}{width}"


def rate_key(mode: str) -> str:
    """The rate a substitution mode is judged by: substitution_rate, or skip_rate for skip."""
    return "skip_rate" if mode == "skip" else "substitution_rate"


def rate_name(mode: str) -> str:
    return "skip rate" if mode == "skip" else "subst. rate"


def pool_kind(per_layer: bool) -> str:
    """How the expert pool is laid out, named in every output."""
    return "per-layer pool" if per_layer else "shared pool"


def read_text(path: str, flag: str = "--text") -> str:
    """A text file, refused before any model is loaded if it is missing, empty or not UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise MoejaxError(f"{flag} {path}: no such file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise MoejaxError(f"{flag} {path} is not UTF-8 text") from None
    if not text.strip():
        raise MoejaxError(f"{flag} {path} is empty")
    return text


def text_tokens(text: str, path: str, tok, min_tokens: int = 2):
    import numpy as np

    if tok is None:
        raise MoejaxError("the model has no tokenizer.json to read --text with")
    ids = np.array(tok.encode(text).ids, np.int32)
    if len(ids) < min_tokens:
        raise MoejaxError(f"--text {path} has {len(ids)} tokens; at least {min_tokens} are needed")
    return ids


def cmd_convert(args) -> None:
    from moejax.convert import convert

    cfg = convert(args.src, args.dst, dtype=args.dtype, force=args.force, experts=args.experts,
                  group_size=args.group_size)
    quant = f", routed experts {cfg.quant.describe()}" if cfg.quant else ""
    print(f"converted {cfg.model_type}: {cfg.num_layers} layers, {cfg.num_experts} experts/layer, "
          f"top-{cfg.top_k}{quant} -> {args.dst}", file=sys.stderr)


def engine_kind(args) -> str:
    """--engine, fused by default; an emulated --link runs the stepwise engine."""
    link = getattr(args, "link", "real")
    if link.startswith("emulated"):
        if args.engine == "fused":
            raise MoejaxError(f"--link {link} runs on the stepwise engine; "
                              "pass --engine stepwise or leave --engine out")
        return "stepwise"
    return args.engine or "fused"


def resident_plan(cfg, dtype: str, cache_len: int, spec):
    """--policy resident: the budget that holds every expert; a smaller --vram-budget is refused."""
    import jax.numpy as jnp

    from moejax.offload.budget import plan_budget

    plan = plan_budget(cfg, jnp.dtype(dtype).itemsize, 1, cache_len, None)
    if spec is not None and (spec[0] == "pct" and spec[1] < 1 or spec[0] == "bytes" and spec[1] < plan.budget_bytes):
        raise MoejaxError(f"--policy resident keeps all {plan.total_experts} experts on the device "
                          f"({plan.budget_bytes / 2**20:.1f} MiB); raise --vram-budget or choose another policy")
    return plan


def prefetch_width(engine) -> int:
    """The engine's --prefetch-width (0: the paper's rule, or no engine / no prefetching policy)."""
    return engine.policy.prefetch_width if engine is not None else 0


def pool_text(engine) -> str:
    """The pool kind, and a per-layer pool's slots per layer."""
    if engine is None:
        return "no pool (every expert resident)"
    if engine.layout.per_layer:
        return f"{pool_kind(True)} ({engine.layout.share} slots per layer)"
    return pool_kind(False)


def cmd_decode(args) -> None:
    import numpy as np

    from moejax import checkpoint
    from moejax.api import load_tokenizer, resolve
    from moejax.generate import cache_length

    if not args.prompt:
        raise MoejaxError("--prompt is empty")
    if args.max_new_tokens < 1:
        raise MoejaxError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise MoejaxError("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        raise MoejaxError("--top-p must be in (0, 1]")
    spec = parse_budget_arg(args.vram_budget) if args.vram_budget else None
    sub = Substitution.from_args(args)
    check_output("--json", args.json)
    policy = args.policy or ("smoe" if spec else "resident")
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
    engine = None
    if policy == "resident":
        plan = resident_plan(cfg, dtype, S, spec)
    else:
        from moejax.engine import make_engine

        engine = make_engine(kind, path, policy, spec, batch=1, cache_len=S, per_layer=args.per_layer,
                             **sub.engine_kwargs(path, cfg))
        if hasattr(engine, "prepare"):  # compile first: the plan budgets the programs' temporaries
            engine.prepare(len(prompt), args.temperature, args.top_p)
        plan = engine.plan
    substitutes = policy in ("score-sub", "smoe")
    subst = f", {sub.describe()}" if substitutes else ""
    print(f"model {cfg.model_type} ({args.model or path}), {dtype}; policy {policy}{subst}; engine {kind}; "
          f"{pool_text(engine)}; {plan.describe()}", file=sys.stderr)
    if engine is not None and engine.policy.prefetch_width:
        width, spare = engine.policy.prefetch_width, engine.layout.share - min(cfg.top_k, cfg.num_experts)
        if spare < width:
            print(f"note: --prefetch-width {width}, but a layer's prefetches are sure of only {max(spare, 0)} free "
                  "slots at this budget: the fused engine's copies for slots it cannot fill move bytes for nothing "
                  "(counted as prefetch_idle)", file=sys.stderr)

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
    if engine is None:
        import moejax

        g = moejax.load(path).generate(np.array([prompt]), args.max_new_tokens, **kw)
        stats = {"hit_rate": 1.0, "substitution_rate": 0.0, "skip_rate": 0.0, "bytes_h2d": 0, "bytes_h2d_prefill": 0,
                 "transfers": 0, "ttft_ms": 1e3 * g.ttft_s, "tpot_ms": g.tpot_ms, "peak_device_bytes": plan.budget_bytes}
    else:
        g = engine.generate(np.array([prompt]), args.max_new_tokens, **kw)
        stats = engine.telemetry.summary()
    sys.stdout.write("\n")
    tokens = g.tokens[0]
    # the fused engine compiled before the plan was printed (its own clock); otherwise the
    # warm-up (compilation plus a two-token run) is the compile time
    compile_s = getattr(engine, "compile_s", 0.0) or g.warmup_s
    tps = 1e3 / g.tpot_ms if g.step_s else float("nan")
    print(f"{len(tokens)} tokens | engine {kind} | {pool_text(engine)} | hit rate {stats['hit_rate']:.3f} | "
          f"moved {stats['bytes_h2d'] / 2**20:.1f} MiB in {stats['transfers']} transfers | "
          f"TTFT {stats['ttft_ms']:.1f} ms | TPOT {g.tpot_ms:.2f} ms ({tps:.1f} tok/s) | compile {compile_s:.1f} s",
          file=sys.stderr)
    if args.json:
        write_json(args.json, {
            "tokens": tokens, "text": tok.decode(tokens), "prompt_tokens": len(prompt), "policy": policy,
            "engine": kind, "pool": "none" if engine is None else pool_kind(args.per_layer),
            "alpha": sub.alpha if substitutes else 0.0, "substitute": sub.mode if substitutes else None,
            "prefetch_width": prefetch_width(engine), "budget_bytes": plan.budget_bytes, "pool_slots": plan.pool_slots,
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
    from moejax.bench import machine, markdown, run_bench, split_policy
    from moejax.offload.policies import ALL_NAMES

    budgets = [(b, parse_budget_arg(b)) for b in args.vram_budget.split(",")]
    batches = _int_list(args.batch, "--batch")
    policies = args.policies.split(",")
    for p in policies:
        if split_policy(p)[0] not in ALL_NAMES:
            raise MoejaxError(f"--policies: {p!r} is not one of {', '.join(ALL_NAMES)}")
    if args.trials < 1 or args.new_tokens < 2:
        raise MoejaxError("--trials must be >= 1 and --new-tokens >= 2")
    asked = args.engine.split(",") if args.engine else [None]
    kinds = [engine_kind(argparse.Namespace(engine=k, link=args.link)) for k in asked]
    if any(k not in ("fused", "stepwise") for k in kinds):
        raise MoejaxError(f"--engine {args.engine!r}: expected fused, stepwise or fused,stepwise")
    kinds = list(dict.fromkeys(kinds))
    kind = ",".join(kinds)
    sub = Substitution.from_args(args)
    check_output("--json", args.json)
    check_output("--markdown", args.markdown)
    if args.figure:
        from moejax.plots import check_figure

        check_figure(check_output("--figure", args.figure))
    path = resolve(args.model or bundled_model())
    from moejax import checkpoint

    settings = sub.engine_kwargs(path, checkpoint.read_meta(path)[0])
    from moejax.engine import load_parts

    parts = load_parts(path)
    link = _link(args, parts, path)
    from moejax.bench import h2d_bandwidth

    bw = None if link.emulated else h2d_bandwidth(parts)
    print(f"engine {kind}; {pool_kind(args.per_layer)}; link: {link.describe()}"
          + (f" (measured host -> device: {bw / 1e9:.2f} GB/s per expert fetch)" if bw else ""), file=sys.stderr)
    meta = {**machine(), "model": str(args.model or path), "command": "moejax " + " ".join(sys.argv[1:]),
            "engine": kind, "pool": pool_kind(args.per_layer), "link": link.describe(), "h2d_bytes_per_s": bw}
    # each finished record is written at once, so an interrupted run keeps what it did
    records = run_bench(path, budgets, batches, policies, args.new_tokens, args.prompt_len, args.trials,
                        {**settings, "link": link, "per_layer": args.per_layer}, parts=parts, engines=tuple(kinds),
                        on_record=lambda done: write_json(args.json, {"meta": meta, "records": done}))
    table = markdown(records)
    print(table)
    if args.markdown:
        write_text(args.markdown, table + "\n")
    if args.figure:
        from moejax.plots import policy_bars

        policy_bars(records, args.figure)


def cmd_calibrate(args) -> None:
    import moejax
    from moejax.offload import similarity

    if args.link:  # the emulated paper link instead of the similarity
        from moejax.api import resolve
        from moejax.bench import paper_link
        from moejax.offload.store import load_parts

        path = resolve(args.model or bundled_model())
        paper_link(load_parts(path), path, recalibrate=True)
        return
    text = None
    if args.method == "output":
        if not args.text:
            raise MoejaxError("--method output needs --text FILE (calibration text)")
        text = read_text(args.text)
    check_output("--out", args.out, force=args.force)
    model = moejax.load(args.model or bundled_model())
    out = check_output("--out", args.out or model.path / similarity.FILE, force=args.force)
    tokens = None if text is None else text_tokens(text, args.text, model.tokenizer, 2)[: args.max_tokens][None]
    layers = similarity.calibrate(model, tokens, args.method)
    similarity.save(out, model.config, layers, args.method)
    off = [float((s.sum() - s.trace()) / (s.size - len(s))) for s in layers.values()]
    print(f"wrote {args.method} similarity of {len(layers)} layers to {out} "
          f"(mean off-diagonal {sum(off) / len(off):.3f})", file=sys.stderr)


def same_model(a, b) -> bool:
    """Two configs of one model, whatever their routed experts are stored as."""
    import dataclasses

    plain = lambda c: dataclasses.replace(c, expert_quant="none", expert_group=0)  # noqa: E731
    return plain(a) == plain(b)


def cmd_eval_ppl(args) -> None:
    import moejax
    from moejax.engine import make_engine
    from moejax.eval.ppl import evaluate
    from moejax.generate import cache_length

    spec = parse_budget_arg(args.vram_budget) if args.vram_budget else None
    sub = Substitution.from_args(args)
    kind = "none" if args.policy == "resident" else engine_kind(args)
    text = read_text(args.text)
    check_output("--json", args.json)
    model = moejax.load(args.model or bundled_model())
    reference = moejax.load(args.reference) if args.reference else None
    if reference is not None and not same_model(reference.config, model.config):
        raise MoejaxError(f"--reference {args.reference} is not the same model as --model (configs differ "
                          "in more than how the routed experts are stored)")
    tokens = text_tokens(text, args.text, model.tokenizer, args.prefix + 1)[: args.max_tokens]
    S = cache_length(len(tokens), 0)
    if args.policy == "resident":  # the model scored against itself (or --reference): the reference point
        engine, plan = None, resident_plan(model.config, model.dtype, S, spec)
    else:
        engine = make_engine(kind, model.path, args.policy, spec, cache_len=S, per_layer=args.per_layer,
                             **sub.engine_kwargs(model.path, model.config))
        plan = engine.plan
    result = evaluate(model, engine, tokens, args.prefix, progress=True, reference=reference)
    quant = model.config.quant
    result.update(experts=quant.describe() if quant else model.dtype.name,
                  reference=str(args.reference or "the same model, resident"), engine=kind, policy=args.policy,
                  pool="none" if engine is None else pool_kind(args.per_layer),
                  alpha=sub.alpha, substitute=sub.mode, prefetch_width=prefetch_width(engine),
                  budget_bytes=plan.budget_bytes, pool_slots=plan.pool_slots)
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    if args.json:
        write_json(args.json, result)


def _prefix_arg(text: str) -> int | None:
    """--prefix of eval tasks: a token count, or "all" (None: the whole context is prefilled)."""
    if str(text).strip() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise MoejaxError(f"--prefix {text!r}: expected a token count or 'all'") from None
    if n < 1:
        raise MoejaxError("--prefix must be at least 1 (or 'all')")
    return n


def task_steps(model, policy: str, kind: str, spec, cache_len: int, per_layer: bool, sub: "Substitution"):
    """-> (what prefill/step run on, the engine or None, the plan): the resident model or an
    offloaded engine, built as `eval ppl` builds them."""
    from moejax.eval.ppl import _ResidentSteps

    if policy == "resident":
        return _ResidentSteps(model, cache_len), None, resident_plan(model.config, model.dtype, cache_len, spec)
    from moejax.engine import make_engine

    engine = make_engine(kind, model.path, policy, spec, cache_len=cache_len, per_layer=per_layer,
                         **sub.engine_kwargs(model.path, model.config))
    return engine, engine, engine.plan


def cmd_eval_tasks(args) -> None:
    import moejax
    from moejax.eval import tasks as T
    from moejax.generate import PAD, cache_length

    if args.limit is not None and args.limit < 1:
        raise MoejaxError("--limit must be at least 1")
    if args.skip < 0:
        raise MoejaxError("--skip must be at least 0")
    prefix = _prefix_arg(args.prefix)
    spec = parse_budget_arg(args.vram_budget) if args.vram_budget else None
    sub = Substitution.from_args(args)
    policy = args.policy or ("smoe" if spec else "resident")
    kind = "none" if policy == "resident" else engine_kind(args)
    check_output("--json", args.json)
    check_output("--markdown", args.markdown)
    names = [n.strip() for n in args.tasks.split(",") if n.strip()] if args.tasks else None
    tasks = T.load_tasks(args.path, names, args.limit, args.skip)
    model = moejax.load(args.model or bundled_model())
    tok, cfg = model.tokenizer, model.config
    if tok is None:
        raise MoejaxError(f"{model.path} has no tokenizer.json")
    fallback = cfg.eos_token_ids[0] if cfg.eos_token_ids else (cfg.bos_token_id or 0)
    prepared = [T.prepare(t, tok, cfg.max_position_embeddings, fallback) for t in tasks]
    S = min(cache_length(max(p.longest for p in prepared), 0), -(-cfg.max_position_embeddings // PAD) * PAD)
    steps, engine, plan = task_steps(model, policy, kind, spec, S, args.per_layer, sub)
    if hasattr(engine, "prepare"):  # compile every prefill length first: the plan is final before scoring
        lengths = {-(-(len(c) if prefix is None else min(prefix, len(c))) // PAD) * PAD
                   for p in prepared for c in p.contexts}
        for n in sorted(lengths):
            engine.prepare(n, chunk=1)  # scoring runs one decode step per call
    substitutes = policy in ("score-sub", "smoe")
    subst = f", {sub.describe()}" if substitutes else ""
    header = (f"model {args.model or model.path} ({cfg.model_type}, {model.dtype.name}); policy {policy}{subst}; "
              f"engine {kind}; {pool_text(engine)}; {plan.describe()}; prefix "
              f"{'all' if prefix is None else prefix} tokens")
    print(header, file=sys.stderr)
    meta = {"model": str(args.model or model.path), "path": str(args.path), "policy": policy, "engine": kind,
            "pool": "none" if engine is None else pool_kind(args.per_layer), "alpha": sub.alpha if substitutes else 0.0,
            "substitute": sub.mode if substitutes else None, "prefetch_width": prefetch_width(engine),
            "budget_bytes": plan.budget_bytes, "pool_slots": plan.pool_slots, "prefix": prefix, "limit": args.limit, "skip": args.skip,
            "command": "moejax " + " ".join(sys.argv[1:])}
    rows = []
    for p in prepared:
        rows.append(T.evaluate_task(steps, p, prefix, engine))
        r = rows[-1]
        print(f"{r['task']}: acc {r['acc']:.3f} (per token {r['acc_per_token']:.3f}, per char "
              f"{r['acc_per_char']:.3f}), chance {r['chance']:.3f}, n {r['n']}, hit rate {r['hit_rate']:.3f}, "
              f"subst. rate {r['substitution_rate']:.3f}, skip rate {r['skip_rate']:.3f}, {r['seconds']:.1f} s",
              file=sys.stderr)
        run = engine.telemetry.summary() if engine is not None else {
            "hit_rate": 1.0, "substitution_rate": 0.0, "skip_rate": 0.0, "bytes_h2d": 0}
        if args.json:  # each finished task at once, so an interrupted run keeps what it did
            write_json(args.json, {"meta": meta, "run": run, "tasks": rows})
    table = T.markdown(rows, header)
    print(table)
    if args.markdown:
        write_text(args.markdown, table + "\n")


def cmd_trace_record(args) -> None:
    import numpy as np

    from moejax import checkpoint
    from moejax.api import load_tokenizer, resolve
    from moejax.engine import make_engine
    from moejax.eval.trace import TraceRecorder
    from moejax.generate import cache_length

    out = check_output("--out", args.out, force=args.force)
    if not args.prompt:
        raise MoejaxError("--prompt is empty")
    spec = parse_budget_arg(args.vram_budget) if args.vram_budget else None
    sub = Substitution.from_args(args)
    path = resolve(args.model or bundled_model())
    cfg, _ = checkpoint.read_meta(path)
    tok = load_tokenizer(path)
    if tok is None:
        raise MoejaxError(f"{path} has no tokenizer.json")
    ids = tok.encode(args.prompt).ids
    engine = make_engine("stepwise", path, args.policy, spec, cache_len=cache_length(len(ids), args.max_new_tokens),
                         per_layer=args.per_layer, **sub.engine_kwargs(path, cfg))
    engine.recorder = TraceRecorder()
    engine.generate(np.array([ids]), args.max_new_tokens, stop_ids=cfg.eos_token_ids)
    engine.recorder.save(out, cfg, 1)
    hits = (f"hit rate {engine.telemetry.hit_rate:.3f}" if spec else
            "no --vram-budget given, so every expert stayed on the device: no hit rate to report")
    print(f"recorded {len(engine.recorder.steps)} decode steps x {len(cfg.moe_layer_ids)} MoE layers to {out} "
          f"(stepwise engine: policy {args.policy}, {pool_text(engine)}, {hits})", file=sys.stderr)


def cmd_replay(args) -> None:
    from moejax import checkpoint
    from moejax.api import resolve
    from moejax.eval.trace import REPLAYABLE, Trace, replay

    policies = args.policy.split(",")
    for p in policies:
        if p not in REPLAYABLE:
            raise MoejaxError(f"--policy {p!r} cannot be replayed (replayable: {', '.join(REPLAYABLE)})")
    caches = [parse_budget_arg(c, "--cache", plain="slots") for c in args.cache.split(",")]
    alpha = Substitution(alpha=args.alpha).alpha
    check_output("--json", args.json)
    if args.figure:
        from moejax.plots import check_figure

        check_figure(check_output("--figure", args.figure))
    if not Path(args.trace).is_file():
        raise MoejaxError(f"no trace at {args.trace}")
    cfg = checkpoint.read_meta(resolve(args.model))[0] if args.model else None
    trace = Trace(Path(args.trace), cfg)
    sizes = []
    for text, (unit, value) in zip(args.cache.split(","), caches):
        slots = round(value * trace.total_experts) if unit == "pct" else int(value)
        if slots > trace.total_experts:
            raise MoejaxError(f"--cache {text.strip()}: the trace has only {trace.total_experts} experts")
        sizes.append(slots)
    rows = [replay(trace, p, n, per_layer=args.per_layer, alpha=alpha, mode=args.substitute)
            for n in sizes for p in policies]
    print(f"| policy | pool | slots | share | hit rate | transfers | {rate_name(args.substitute)} |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        slots = f"{r['slots']} ({r['slots_per_layer']} per layer)" if args.per_layer else r["slots"]
        print(f"| {r['policy']} | {r['pool']} | {slots} | {100 * r['share']:.1f}% | {r['hit_rate']:.3f} | "
              f"{r['transfers']} | {r[rate_key(args.substitute)]:.3f} |")
    if args.json:
        write_json(args.json, {"trace": str(args.trace), "pool": pool_kind(args.per_layer), "rows": rows})
    if args.figure:
        from moejax.plots import hit_rate_curves

        hit_rate_curves(rows, args.figure, f"hit rate vs cache size (trace replay, {pool_kind(args.per_layer)})")


def cmd_eval_sweep(args) -> None:
    import moejax
    from moejax.engine import load_parts, make_engine
    from moejax.eval.ppl import evaluate
    from moejax.generate import cache_length
    from moejax.offload.policies import make_policy

    try:
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        raise MoejaxError(f"--alphas {args.alphas!r}: expected comma-separated numbers") from None
    bad = [a for a in alphas if not 0 <= a < 1]
    if bad:
        raise MoejaxError(f"--alphas: {bad[0]} is not in [0, 1)")
    sub = Substitution.from_args(args)
    spec = parse_budget_arg(args.vram_budget)
    kind = engine_kind(args)
    text = read_text(args.text)
    check_output("--json", args.json)
    check_output("--markdown", args.markdown)
    if args.figure:
        from moejax.plots import check_figure

        check_figure(check_output("--figure", args.figure))
    model = moejax.load(args.model or bundled_model())
    settings = sub.engine_kwargs(model.path, model.config)
    tokens = text_tokens(text, args.text, model.tokenizer, args.prefix + 1)[: args.max_tokens]
    prompt = tokens[None, : args.prefix]
    parts = load_parts(model.path)
    link = _link(args, parts, model.path)
    pool = pool_kind(args.per_layer)
    meta = {"engine": kind, "policy": args.policy, "budget": args.vram_budget, "substitute": sub.mode, "pool": pool,
            "prefetch_width": make_policy(args.policy, prefetch_width=sub.prefetch_width).prefetch_width,
            "text": args.text, "link": link.describe(), "command": "moejax " + " ".join(sys.argv[1:])}
    rows = []
    for a in alphas:
        e = make_engine(kind, model.path, args.policy, spec, cache_len=cache_length(len(tokens), args.new_tokens),
                        parts=parts, link=link, per_layer=args.per_layer, **{**settings, "alpha": a})
        row = {"alpha": a, **evaluate(model, e, tokens, args.prefix)}
        e.reset()
        g = e.generate(prompt, args.new_tokens, warmup=True)
        compile_s = e.compile_s or g.warmup_s  # the fused engine compiles ahead of its warm-up
        row.update(tpot_ms=g.tpot_ms, compile_s=compile_s, tpot_hit_rate=e.telemetry.hit_rate, engine=kind,
                   pool=pool, link=link.describe())
        rows.append(row)
        if args.json:  # each finished row at once, so an interrupted sweep keeps what it did
            write_json(args.json, {"meta": meta, "rows": rows})
        print(f"{kind} engine, alpha {a:g}: ppl {row['ppl']:.3f} (resident {row['ppl_resident']:.3f}), top-1 "
              f"{row['top1_agreement']:.3f}, KL {row['kl']:.4f}, hit rate {row['hit_rate']:.3f}, "
              f"TPOT {row['tpot_ms']:.2f} ms, compile {compile_s:.1f} s", file=sys.stderr)
    table = [f"Engine: {kind}, {pool}, {link.describe()}\n",
             f"| alpha | ppl | ppl change | top-1 agreement | KL | hit rate | {rate_name(sub.mode)} | TPOT ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['alpha']:g} | {r['ppl']:.3f} | {100 * (r['ppl'] / r['ppl_resident'] - 1):+.2f}% | "
                     f"{r['top1_agreement']:.3f} | {r['kl']:.4f} | {r['hit_rate']:.3f} | "
                     f"{r[rate_key(sub.mode)]:.3f} | {r['tpot_ms']:.2f} |")
    print("\n".join(table))
    if args.markdown:
        write_text(args.markdown, "\n".join(table) + "\n")
    if args.figure:
        from moejax.plots import alpha_sweep

        alpha_sweep(rows, args.figure, f"{args.policy} at {args.vram_budget} ({kind} engine, {pool}, "
                                       f"{link.describe()})")


def _link(args, parts, path):
    """--link real | emulated:BW,LAT | emulated:paper (moejax.bench.paper_link: calibrated once per
    model and machine, stored beside the checkpoint at path)."""
    from moejax.offload.store import parse_link

    if getattr(args, "link", "real") == "emulated:paper":
        from moejax.bench import paper_link

        return paper_link(parts, path)
    return parse_link(getattr(args, "link", "real"))


MODEL_HELP = ("converted or Hugging Face checkpoint directory, or a Hugging Face Hub id owner/name "
              "(downloaded and converted into $MOEJAX_CACHE; default: the bundled model)")
BUDGET_HELP = ("device memory for weights + KV cache + expert pool (512MiB, 6GiB, 1.5GB; a plain number is "
               "bytes), or PCT%% = the share of routed experts the pool holds")


def _engine_flags(p, stepwise_only: bool = False, several: bool = False, alpha: bool = True) -> None:
    from moejax.offload.importance import MODES

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
    p.add_argument("--per-layer", action="store_true",
                   help="split the expert pool into one pool per MoE layer, each with an equal share of the "
                        "slots (as mixtral-offloading's k experts per layer); default: one pool shared by all layers")
    if alpha:
        p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                       help=f"importance threshold (docs/method.md 1) for score-sub/smoe; 0 disables substitution "
                            f"and makes every policy exact (default {DEFAULT_ALPHA}, see docs/benchmarks.md)")
    p.add_argument("--substitute", choices=MODES, default="window",
                   help="window (default: the paper's rule, needs no calibration), hybrid or similarity (need "
                        "`moejax calibrate`), or skip (the paper's baseline: drop the missed low-score experts "
                        "and renormalise the kept ones' weights)")
    p.add_argument("--similarity", help="similarity file (default: similarity.npz beside the checkpoint)")
    p.add_argument("--score-window", type=int, default=16,
                   help="decode steps over which score-aware eviction averages router probabilities")
    p.add_argument("--prefetch-width", type=int, default=0, metavar="P",
                   help="prefetching policies (smoe, lru-prefetch): 0 (default) prefetches the predicted experts "
                        "the paper's rule selects; P > 0 always the P most probable missing experts of the next "
                        "layer, which the fused engine copies outside any loop so that the copies can overlap "
                        "compute on a GPU (docs/benchmarks.md)")


def build_parser() -> argparse.ArgumentParser:
    from moejax.offload.policies import ALL_NAMES, POLICIES

    offloaded = list(POLICIES)  # every policy of an offloading engine; ALL_NAMES adds resident
    p = _Parser(prog="moejax", description="MoE inference with expert offloading in JAX")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                           help="run `moejax COMMAND -h` for its flags")

    c = sub.add_parser("convert", help="convert a Hugging Face MoE checkpoint")
    c.add_argument("src", help="HF checkpoint directory (config.json + *.safetensors)")
    c.add_argument("dst", help="output directory")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weight dtype (default: the source's)")
    c.add_argument("--experts", choices=["int8", "int4"], default=None,
                   help="quantize the routed experts (weight-only; shared experts and dense weights stay in "
                        "--dtype): int8 with a scale per output channel, int4 with group-wise scales "
                        "(default: --dtype like the rest)")
    c.add_argument("--group-size", type=int, default=None,
                   help="int4: weights per scale along each matrix's input dimension; must divide the hidden "
                        "and expert intermediate sizes, or exceed one (one group per row) (default 64)")
    c.add_argument("--force", action="store_true", help="overwrite dst if it exists")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("decode", help="generate text from a prompt")
    d.add_argument("--model", help=MODEL_HELP)
    d.add_argument("--prompt", required=True, help="the text to continue")
    d.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    d.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches this (default 1: all)")
    d.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    d.add_argument("--vram-budget", help=BUDGET_HELP + "; default: everything resident")
    d.add_argument("--policy", choices=ALL_NAMES, help="expert cache policy (default: smoe with a budget, "
                   "else resident)")
    _engine_flags(d)
    d.add_argument("--json", help="write a JSON record of the run here")
    d.set_defaults(func=cmd_decode)

    b = sub.add_parser("bench", help="compare policies side by side (TPOT, TTFT, hit rate, bytes moved)")
    b.add_argument("--model", help=MODEL_HELP)
    b.add_argument("--vram-budget", default="25%,50%", help="comma-separated budgets, each as in decode: "
                   "512MiB, 6GiB or PCT%% (default 25%%,50%%)")
    b.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    b.add_argument("--policies", default=",".join(ALL_NAMES),
                   help=f"comma-separated policies (default: all of {', '.join(ALL_NAMES)}); NAME:P runs a "
                        "prefetching policy with --prefetch-width P, so that widths compare side by side (smoe,smoe:2)")
    b.add_argument("--new-tokens", type=int, default=32, help="tokens generated per trial (default 32)")
    b.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    b.add_argument("--trials", type=int, default=3, help="timed runs per policy; the median is reported (default 3)")
    b.add_argument("--link", default="real", help="'real' (device_put as it is), 'emulated:BW,LAT', e.g. "
                   "emulated:2GB/s,10us (one transfer at a time, each at least LAT + bytes/BW), or "
                   "'emulated:paper' (the paper's transfer/compute ratio, see docs/benchmarks.md)")
    _engine_flags(b, several=True)
    b.add_argument("--json", required=True, help="write the records here (rewritten as each one finishes)")
    b.add_argument("--markdown", help="also write the markdown table here")
    b.add_argument("--figure", help="also write TPOT and hit rate per policy as a figure (PNG, SVG, PDF)")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("calibrate", help="precompute per-layer expert similarity")
    c.add_argument("--model", help=MODEL_HELP)
    c.add_argument("--text", help="calibration text file (for --method output)")
    c.add_argument("--method", choices=["output", "weights"], default="output",
                   help="output (default: expert outputs on --text) or weights (the weights alone)")
    c.add_argument("--max-tokens", type=int, default=512, help="calibration tokens read from --text (default 512)")
    c.add_argument("--out", help="output file (default: similarity.npz beside the checkpoint)")
    c.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    c.add_argument("--link", action="store_true",
                   help="instead of the similarity: time one expert on this machine and store the link that "
                        "--link emulated:paper uses beside the checkpoint (replacing a stored one)")
    c.set_defaults(func=cmd_calibrate)

    t = sub.add_parser("trace", help="record router traces")
    tsub = t.add_subparsers(dest="what", required=True, parser_class=_Parser, metavar="WHAT",
                            help="record")
    tr = tsub.add_parser("record", help="run the engine and record every layer's routing")
    tr.add_argument("--model", help=MODEL_HELP)
    tr.add_argument("--prompt", required=True, help="the text to continue")
    tr.add_argument("--max-new-tokens", type=int, default=64, help="decode steps to record (default 64)")
    tr.add_argument("--vram-budget", help=BUDGET_HELP + "; default: everything resident (routing is the same)")
    tr.add_argument("--policy", choices=offloaded, default="lru", help="policy the engine runs (default lru)")
    tr.add_argument("--out", required=True, help="trace file to write (.npz)")
    tr.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _engine_flags(tr, stepwise_only=True)
    tr.set_defaults(func=cmd_trace_record)

    r = sub.add_parser("replay", help="simulate policies on a trace, without the model (incl. belady)")
    r.add_argument("trace", help="a trace written by `moejax trace record`")
    r.add_argument("--model", help="check that the trace was recorded with this model")
    r.add_argument("--policy", default="lru,lfu,score,belady",
                   help="comma-separated, of ondemand, lru, lfu, score, score-sub, belady "
                        "(default lru,lfu,score,belady)")
    r.add_argument("--cache", default="10%,25%,50%,75%",
                   help="comma-separated pool sizes: slot counts or percentages of all routed experts")
    r.add_argument("--per-layer", action="store_true",
                   help="one pool per MoE layer, each with an equal share of the slots; default: one shared pool")
    r.add_argument("--alpha", type=float, default=0.0, help="importance threshold for score-sub (default 0)")
    r.add_argument("--substitute", choices=["window", "skip"], default="window",
                   help="score-sub's low-score experts: window (default: substituted) or skip (dropped)")
    r.add_argument("--json", help="write the rows here")
    r.add_argument("--figure", help="write hit rate vs cache size as a figure (PNG, SVG, PDF)")
    r.set_defaults(func=cmd_replay)

    e = sub.add_parser("eval", help="accuracy of offloaded decoding")
    esub = e.add_subparsers(dest="what", required=True, parser_class=_Parser, metavar="WHAT",
                            help="ppl, sweep or tasks")
    ep = esub.add_parser("ppl", help="decode-mode perplexity, top-1 agreement and KL against the resident model")
    ep.add_argument("--model", help=MODEL_HELP)
    ep.add_argument("--text", required=True, help="UTF-8 text file to score")
    ep.add_argument("--vram-budget", help=BUDGET_HELP + "; default: everything resident")
    ep.add_argument("--policy", choices=ALL_NAMES, default="smoe", help="expert cache policy (default smoe)")
    ep.add_argument("--prefix", type=int, default=8, help="tokens prefilled before teacher forcing starts")
    ep.add_argument("--max-tokens", type=int, default=512, help="tokens of --text scored (default 512)")
    ep.add_argument("--reference", help="score against this checkpoint's resident model instead of --model's "
                    "(e.g. the bfloat16 original of a copy with quantized experts)")
    ep.add_argument("--json", help="write the result here")
    _engine_flags(ep)
    ep.set_defaults(func=cmd_eval_ppl)
    es = esub.add_parser("sweep", help="accuracy, hit rate and TPOT across alpha at one budget")
    es.add_argument("--model", help=MODEL_HELP)
    es.add_argument("--text", required=True, help="UTF-8 text file to score")
    es.add_argument("--vram-budget", default="25%", help=BUDGET_HELP + " (default 25%%)")
    es.add_argument("--policy", choices=offloaded, default="smoe", help="expert cache policy (default smoe)")
    es.add_argument("--alphas", default="0,0.1,0.2,0.25,0.3,0.35,0.45,0.6",
                    help="comma-separated alphas, each in [0, 1)")
    es.add_argument("--prefix", type=int, default=16, help="tokens prefilled before teacher forcing starts")
    es.add_argument("--max-tokens", type=int, default=512, help="tokens of --text scored (default 512)")
    es.add_argument("--new-tokens", type=int, default=32, help="tokens generated to time TPOT")
    es.add_argument("--link", default="real", help="real, emulated:BW,LAT or emulated:paper")
    es.add_argument("--json", help="write the rows here (rewritten as each alpha finishes)")
    es.add_argument("--markdown", help="also write the markdown table here")
    es.add_argument("--figure", help="also write the sweep as a figure (PNG, SVG, PDF)")
    _engine_flags(es, alpha=False)
    es.set_defaults(func=cmd_eval_sweep)
    et = esub.add_parser("tasks", help="multiple-choice accuracy on BIG-bench JSON tasks (log-likelihood of each "
                         "choice), resident or offloaded")
    et.add_argument("path", help="a BIG-bench task.json, a task's directory, or a directory of task directories "
                    "(e.g. bigbench/benchmark_tasks); tasks without multiple-choice examples are left out")
    et.add_argument("--model", help=MODEL_HELP)
    et.add_argument("--tasks", help="comma-separated task names to run (a task, or task:subtask; default: all)")
    et.add_argument("--limit", type=int, help="the first N examples of each task (default: all)")
    et.add_argument("--skip", type=int, default=0,
                    help="leave out the first N examples of each task (with --limit: a run in parts)")
    et.add_argument("--vram-budget", help=BUDGET_HELP + "; default: everything resident")
    et.add_argument("--policy", choices=ALL_NAMES, help="expert cache policy (default: smoe with a budget, "
                    "else resident)")
    et.add_argument("--prefix", default="8", help="context tokens prefilled; the rest of the context and every "
                    "choice are decoded token by token (as eval ppl); 'all' prefills the whole context, so that "
                    "only choice tokens after the first are decoded (resident: all choices in one batched call, "
                    "the same log-likelihoods, faster) (default 8)")
    et.add_argument("--json", help="write the rows here (rewritten as each task finishes)")
    et.add_argument("--markdown", help="also write the markdown table here")
    _engine_flags(et)
    et.set_defaults(func=cmd_eval_tasks)
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
