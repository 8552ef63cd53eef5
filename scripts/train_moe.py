"""Train the bundled qwen2_moe model on Shakespeare in JAX and export it in HF format.

Steps: tokenizer (byte-level BPE on the training works) -> AdamW training with a
wall-time budget, periodic held-out evaluation and resumable orbax checkpoints in
--run-dir -> export to --out (config.json, model.safetensors, tokenizer) with a logits
parity check against transformers.Qwen2MoeForCausalLM.

  python scripts/fetch_data.py
  python scripts/train_moe.py --minutes 50 --out checkpoints/moejax-shakespeare-moe
  python scripts/train_moe.py --smoke              # ~1 minute end-to-end check
  python scripts/train_moe.py --export-only ...    # re-export the latest checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "checkpoints/moejax-shakespeare-moe")
    p.add_argument("--run-dir", type=Path, default=REPO_ROOT / "data/runs/shakespeare-moe",
                   help="orbax checkpoints, tokenizer and logs (not committed)")
    p.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data")
    p.add_argument("--minutes", type=float, default=50.0,
                   help="wall-time budget for the training loop (sets the step count)")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--aux-loss-coef", type=float, default=0.02)
    p.add_argument("--z-loss-coef", type=float, default=1e-3)
    p.add_argument("--capacity-factor", type=float, default=1.5)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-width", type=int, default=64)
    p.add_argument("--shared-width", type=int, default=256)
    p.add_argument("--norm-topk-prob", action="store_true")
    p.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--smoke", action="store_true",
                   help="1-minute check: tiny budget, separate run dir, export to /tmp")
    p.add_argument("--export-only", action="store_true")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    args = p.parse_args(argv)
    if args.smoke:
        args.minutes = min(args.minutes, 1.0)
        args.run_dir = Path("/tmp/moejax-smoke-run")
        args.out = Path("/tmp/moejax-smoke-export")
        args.eval_every, args.ckpt_every, args.eval_windows = 20, 20, 4
        args.warmup_steps = 10
    return args


def model_config(args):
    from _train_model import MoeConfig

    cfg = MoeConfig(vocab_size=args.vocab_size, hidden_size=args.hidden,
                    num_hidden_layers=args.layers, num_attention_heads=args.heads,
                    num_key_value_heads=args.kv_heads, num_experts=args.experts,
                    num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width,
                    shared_expert_intermediate_size=args.shared_width,
                    norm_topk_prob=args.norm_topk_prob)
    cfg.validate()
    return cfg


def lr_at(step, total, args):
    """Linear warm-up then cosine decay to min_lr_ratio * lr."""
    import math

    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = min(1.0, (step - args.warmup_steps) / max(1, total - args.warmup_steps))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(args):
    import jax
    import optax

    def decay_mask(params):
        # Decay weight matrices only, not norms or biases.
        return jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)

    return optax.chain(
        optax.clip_by_global_norm(args.clip_norm),
        optax.inject_hyperparams(optax.adamw)(
            learning_rate=args.lr, b1=0.9, b2=0.95, eps=1e-8,
            weight_decay=args.weight_decay, mask=decay_mask),
    )


def set_lr(opt_state, lr):
    import jax.numpy as jnp

    opt_state[1].hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return opt_state


def batch_at(tokens, step, args):
    """Deterministic random windows for a step (resumable): ([B, T], [B, T])."""
    import numpy as np

    rng = np.random.default_rng((args.seed, step))
    starts = rng.integers(0, len(tokens) - args.seq_len - 1, size=args.batch_size)
    win = np.stack([tokens[s:s + args.seq_len + 1] for s in starts]).astype(np.int32)
    return win[:, :-1], win[:, 1:]


def eval_windows(tokens, seq_len, n=None):
    """Consecutive non-overlapping windows of the held-out stream (first n, or all)."""
    import numpy as np

    count = (len(tokens) - 1) // seq_len
    if n is not None:
        count = min(count, n)
    win = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)])
    return win[:, :-1].astype(np.int32), win[:, 1:].astype(np.int32)


def prepare_data(args):
    """Tokenizer (trained once, cached in run dir) and token streams."""
    import numpy as np
    from _train_tokenizer import encode_works, train_tokenizer
    from fetch_data import load_split
    from tokenizers import Tokenizer

    split = load_split(args.data_dir)
    tok_dir = args.run_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    else:
        tok = train_tokenizer([t for _, t in split["train"]], args.vocab_size, tok_dir)
    cache = args.run_dir / "tokens.npz"
    if cache.exists():
        z = np.load(cache)
        train, heldout = z["train"], z["heldout"]
    else:
        train, heldout = encode_works(tok, split["train"]), encode_works(tok, split["heldout"])
        np.savez(cache, train=train, heldout=heldout)
    return tok_dir, train, heldout


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from _train_model import (forward, init_params, load_balance_loss, param_shapes, token_nll,
                              z_loss)

    t_start = time.time()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args)
    tok_dir, train_tokens, heldout_tokens = prepare_data(args)
    n_params = sum(int(np.prod(s)) for s in jax.tree_util.tree_leaves(
        param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)))
    print(f"config: {dataclasses.asdict(cfg)}")
    print(f"params: {n_params / 1e6:.2f}M | train tokens {len(train_tokens):,} | held-out tokens "
          f"{len(heldout_tokens):,} | batch {args.batch_size}x{args.seq_len} | budget "
          f"{args.minutes:g} min | run dir {args.run_dir} | out {args.out}", flush=True)

    opt = make_optimizer(args)

    def loss_fn(params, x, y):
        logits, router = forward(params, x, cfg, moe="capacity",
                                 capacity_factor=args.capacity_factor)
        ce = jnp.mean(token_nll(logits, y))
        lb = jnp.mean(jnp.stack([load_balance_loss(l, i, cfg.num_experts) for l, i, _ in router]))
        zl = jnp.mean(jnp.stack([z_loss(l) for l, _, _ in router]))
        kept = jnp.mean(jnp.stack([k for _, _, k in router]))
        total = ce + args.aux_loss_coef * lb + args.z_loss_coef * zl
        return total, {"ce": ce, "lb": lb, "z": zl, "kept": kept}

    @jax.jit
    def train_step(params, opt_state, x, y):
        (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
        m["gnorm"] = optax.global_norm(grads)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, m

    @jax.jit
    def eval_nll(params, x, y):
        logits, _ = forward(params, x, cfg, moe="dense")
        return jnp.sum(token_nll(logits, y)), y.size

    def evaluate(params, windows):
        tot, n = 0.0, 0
        xs, ys = windows
        for i in range(0, len(xs), 4):
            s, c = eval_nll(params, xs[i:i + 4], ys[i:i + 4])
            tot, n = tot + float(s), n + int(c)
        return tot / n

    # --- state: fresh or restored -------------------------------------------------
    mngr = ocp.CheckpointManager(
        (args.run_dir / "ckpt").resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    params = init_params(cfg, jax.random.PRNGKey(args.seed))
    opt_state = opt.init(params)
    step, total_steps, train_seconds = 0, None, 0.0
    run_args = {k: str(v) for k, v in vars(args).items()}  # of the run that trained it
    latest = None if args.fresh else mngr.latest_step()
    if latest is not None:
        restored = mngr.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonRestore()))
        params, opt_state = restored["state"]["params"], restored["state"]["opt_state"]
        meta = restored["meta"]
        assert meta["config"] == dataclasses.asdict(cfg), "checkpoint config differs from flags"
        step, total_steps, train_seconds = meta["step"], meta["total_steps"], meta["train_seconds"]
        run_args = meta["args"]
        print(f"resumed from step {step} (planned {total_steps} steps)", flush=True)
    elif args.export_only:
        raise SystemExit(f"--export-only: no checkpoint in {args.run_dir / 'ckpt'}")

    def save(step):
        if step in mngr.all_steps():
            return
        meta = {"step": step, "total_steps": total_steps, "train_seconds": train_seconds,
                "config": dataclasses.asdict(cfg), "args": run_args}
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)), force=True)

    log_path = args.run_dir / "train_log.jsonl"
    eval_set = eval_windows(heldout_tokens, args.seq_len, args.eval_windows)
    budget = args.minutes * 60.0
    tokens_per_step = args.batch_size * args.seq_len

    if not args.export_only:
        # Calibrate the step count from the measured step time once (after compilation),
        # unless it was fixed by a previous run being resumed.
        calib_from, calib_t0 = None, None
        rate_mark = (step, time.time())
        pbar = tqdm(total=total_steps or args.max_steps, initial=step, dynamic_ncols=True,
                    mininterval=2.0)
        loop_t0 = time.time() - train_seconds
        while True:
            if total_steps is not None and step >= total_steps:
                break
            elapsed = time.time() - loop_t0
            if elapsed > budget:
                print(f"\nwall-time budget reached at step {step} (planned {total_steps})")
                break
            opt_state = set_lr(opt_state, lr_at(step, total_steps or args.max_steps, args))
            x, y = batch_at(train_tokens, step, args)
            t0 = time.time()
            params, opt_state, m = train_step(params, opt_state, x, y)
            m = {k: float(v) for k, v in m.items()}
            dt = time.time() - t0
            step += 1
            train_seconds = time.time() - loop_t0
            if step == 3:
                calib_from, calib_t0 = step, time.time()
            if total_steps is None and calib_from is not None and step == calib_from + 20:
                per_step = (time.time() - calib_t0) / 20
                eval_cost = per_step * 0.5 * args.eval_windows / args.batch_size
                per_step_all = per_step + eval_cost / args.eval_every
                total_steps = min(args.max_steps,
                                  int(step + 0.95 * (budget - train_seconds) / per_step_all))
                pbar.total = total_steps
                print(f"\ncalibrated: {per_step:.2f} s/step ({tokens_per_step / per_step:,.0f} "
                      f"tok/s) -> {total_steps} steps", flush=True)
            pbar.update(1)
            pbar.set_postfix(loss=f"{m['ce']:.3f}", lb=f"{m['lb']:.2f}", kept=f"{m['kept']:.3f}",
                             tok_s=f"{tokens_per_step / dt:,.0f}")
            rec = {"step": step, "lr": lr_at(step - 1, total_steps or args.max_steps, args),
                   "time": round(train_seconds, 1), **{k: round(v, 5) for k, v in m.items()}}
            if (step % args.eval_every == 0 and total_steps is not None
                    and step < 0.6 * total_steps and step > rate_mark[0]):
                # Re-plan from the recent rate (the machine is shared); only early in the
                # run, so the cosine schedule moves little.
                per_step_all = (time.time() - rate_mark[1]) / (step - rate_mark[0])
                total_steps = min(args.max_steps, int(step + 0.97 * (budget - train_seconds)
                                                      / per_step_all))
                pbar.total = total_steps
                tqdm.write(f"re-planned: {per_step_all:.2f} s/step -> {total_steps} steps")
            if step % args.eval_every == 0:
                rate_mark = (step, time.time())
            if step % args.eval_every == 0 or step == total_steps:
                ho = evaluate(params, eval_set)
                rec["heldout_nll"], rec["heldout_ppl"] = ho, float(np.exp(ho))
                tqdm.write(f"step {step}: train ce {m['ce']:.3f} | held-out nll {ho:.3f} "
                           f"ppl {np.exp(ho):.1f} | {train_seconds / 60:.1f} min")
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if step % args.ckpt_every == 0:
                save(step)
        pbar.close()
        save(step)
        mngr.wait_until_finished()
        print(f"training: {step} steps, {step * tokens_per_step:,} tokens, "
              f"{train_seconds / 60:.1f} min", flush=True)

    # --- export + parity -------------------------------------------------------------
    from _train_export import export_hf

    export_hf(params, cfg, tok_dir, args.out, save_dtype=args.save_dtype,
              heldout_tokens=heldout_tokens, router_aux_loss_coef=args.aux_loss_coef,
              train_info={"steps": step, "tokens": step * tokens_per_step,
                          "train_minutes": round(train_seconds / 60, 1),
                          "batch_size": args.batch_size, "seq_len": args.seq_len,
                          "train_args": {k: v.replace(f"{REPO_ROOT}/", "")
                                         for k, v in run_args.items()},
                          "argv": sys.argv[1:] if argv is None else argv})
    print(f"total wall time {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
