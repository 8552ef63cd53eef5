"""Distil the dense SmolLM2 into its MoE (issue 12): train the student's experts on
KL(teacher || student) of the next-token distributions, in JAX with optax.

The teacher is `moefy_smollm2.py dense`'s checkpoint (the dense model as an all-experts-active
qwen2_moe), the student `moefy_smollm2.py build`'s. Both run through the project's JAX
qwen2_moe (`_train_model.py`: exact top-k routing, nothing dropped), the layers under one
`lax.scan`. What trains: the routed experts and the shared expert (`--train-router` adds the
routers, at `--router-lr`; their gradient reaches them only through the top-k weights, which the
build's temperature of 0.01 keeps near 1/k). Attention, norms and embeddings stay frozen.
`--router-scale S` first multiplies every router by S, so that the router probabilities carry
importance (the paper's alpha rule ranks experts by them; at the build's temperature they are
flat, ~1/E); `--rescale-experts N` then divides each expert's down projection by its mean top-k
weight x k over N training windows, so that on average each expert adds what it added before
(docs/accuracy.md, "The alpha table with importance-carrying routers").

Text: the build's training documents (Shakespeare without the held-out plays, five Austen
novels, five KJV books), random windows of `--seq-len`, corpora in turn. Held-out perplexity
is the build's: Macbeth, Persuasion and Luke, the same 512-token windows
(`corpus_windows(..., 16384, 6144, seed 0)`), geometric mean of the three.

  python scripts/distill_smollm2.py checkpoints/smollm2-moe-distilled --steps 150 --batch 1 --accum 2 \
      --lr 2e-4 --warmup 10 --json docs/results/smollm2_distill.json
  (stop it any time; the same command resumes from --run-dir; docs/accuracy.md has the numbers)

Each optimizer step accumulates `--accum` micro-batches; between micro-batches the loop waits
while /tmp/moejax_quiet exists (another user's timing run), doing no work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent
QUIET = Path("/tmp/moejax_quiet")
# what --train-router adds to the trained tensors, and what always trains
ROUTER = ("gate.weight",)
EXPERTS = ("experts.gate", "experts.up", "experts.down", "shared_expert.gate_proj",
           "shared_expert.up_proj", "shared_expert.down_proj")
HELD_TRAIN_TOKENS, HELD_EVAL_TOKENS, HELD_SEED = 16384, 6144, 0  # the build's held-out windows


def wait_quiet(poll_s: float = 2.0) -> float:
    """Sleep while QUIET exists; seconds waited."""
    t = time.perf_counter()
    while QUIET.exists():
        time.sleep(poll_s)
    return time.perf_counter() - t


# ---- the checkpoint as the JAX model's parameters ---------------------------------------------
def model_config(hf: dict):
    from _train_model import MoeConfig

    if hf.get("model_type") != "qwen2_moe" or hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ValueError("only qwen2_moe with every layer an MoE is supported")
    return MoeConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"], num_key_value_heads=hf["num_key_value_heads"],
        num_experts=hf["num_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        shared_expert_intermediate_size=hf["shared_expert_intermediate_size"],
        norm_topk_prob=hf["norm_topk_prob"], rms_norm_eps=hf["rms_norm_eps"], rope_theta=hf["rope_theta"],
        max_position_embeddings=hf["max_position_embeddings"])


def load_checkpoint(path: Path):
    """(MoeConfig, hub tensors {key: float32}, params) of a written qwen2_moe directory; params
    are `_train_model`'s tree with the layers stacked ([L, ...] each) for `lax.scan`. A tied
    lm_head is the embedding; absent q/k/v biases (qkv_bias false) are zeros."""
    import numpy as np
    from _train_export import EXPERT_KEYS, LAYER_KEYS, TOP_KEYS
    from _train_model import param_shapes
    from safetensors.numpy import load_file

    hf = json.loads((path / "config.json").read_text())
    cfg = model_config(hf)
    hub = load_file(str(path / "model.safetensors"))
    shapes = param_shapes(cfg)

    def get(key, shape, absent_zero=False):
        if key not in hub and absent_zero:
            return np.zeros(shape, np.float32)
        a = hub[key]
        assert a.shape == tuple(shape), (key, a.shape, shape)
        return a.astype(np.float32)

    tied = hf.get("tie_word_embeddings", False)
    top = {name: get(TOP_KEYS["embed_tokens" if name == "lm_head" and tied else name], shapes[name])
           for name in TOP_KEYS}
    layers = {}
    for name, key in LAYER_KEYS.items():
        shape = shapes["layers"][0][name]
        layers[name] = np.stack([get(f"model.layers.{i}.{key}", shape, absent_zero=key.endswith(".bias"))
                                 for i in range(cfg.num_hidden_layers)])
    for name, proj in EXPERT_KEYS.items():
        _, *shape = shapes["layers"][0][name]
        layers[name] = np.stack([np.stack([get(f"model.layers.{i}.mlp.experts.{e}.{proj}.weight", shape)
                                           for e in range(cfg.num_experts)])
                                 for i in range(cfg.num_hidden_layers)])  # [L, E, ...]
    return cfg, hub, dict(top, layers=layers)


def trained_hub(hub: dict, layers: dict, names) -> dict:
    """The hub tensors with the trained stacked layer tensors `names` written back (same keys,
    same layout: the input checkpoint's, so `moejax convert` and transformers read it alike)."""
    import numpy as np
    from _train_export import EXPERT_KEYS, LAYER_KEYS

    out = dict(hub)
    for name in names:
        a = np.asarray(layers[name], np.float32)  # [L, ...]
        for i in range(a.shape[0]):
            if name in EXPERT_KEYS:
                for e in range(a.shape[1]):
                    key = f"model.layers.{i}.mlp.experts.{e}.{EXPERT_KEYS[name]}.weight"
                    assert out[key].shape == a[i, e].shape, key
                    out[key] = np.ascontiguousarray(a[i, e])
            else:
                key = f"model.layers.{i}.{LAYER_KEYS[name]}"
                assert out[key].shape == a[i].shape, key
                out[key] = np.ascontiguousarray(a[i])
    return out


# ---- the model and the loss ------------------------------------------------------------------
def forward(params, ids, cfg):
    """ids [B, T] -> (logits [B, T, V] float32, residual stream after each layer [L, B, T, D]):
    `_train_model.forward`'s computation (dense MoE path: exact top-k), the layers under
    `lax.scan` so one layer compiles, not thirty."""
    import jax
    import jax.numpy as jnp
    from _train_model import attention, rms_norm, rope_cos_sin

    cos, sin = rope_cos_sin(cfg, jnp.arange(ids.shape[1]))

    def layer(x, p):
        x = x + attention(p, rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps), cfg, cos, sin)
        x = x + moe_ffn(p, rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps), cfg)
        return x, x

    x, hidden = jax.lax.scan(layer, params["embed_tokens"][ids], params["layers"])  # [B, T, D], [L, B, T, D]
    x = rms_norm(x, params["norm"], cfg.rms_norm_eps)
    return (x @ params["lm_head"].T).astype(jnp.float32), hidden


def moe_ffn(p, x, cfg):
    """`_train_model.moe_block` (dense path) as three plain matmuls over all experts' neurons
    side by side, the top-k weights broadcast over each expert's neurons: the same function,
    1.3x faster on the CPU than its per-expert einsums (one layer's forward and backward at
    256 tokens: 88 against 114 ms)."""
    import jax
    import jax.numpy as jnp
    from _train_model import route

    B, T, D = x.shape
    E, I = cfg.num_experts, cfg.moe_intermediate_size
    xf = x.reshape(B * T, D)  # [N, D]
    _, top_p, top_i = route(p, xf, cfg)
    w = jnp.sum(jax.nn.one_hot(top_i, E, dtype=x.dtype) * top_p[..., None], axis=1)  # [N, E]
    g = xf @ p["experts.gate"].reshape(E * I, D).T  # [N, E*I]
    u = xf @ p["experts.up"].reshape(E * I, D).T
    h = (jax.nn.silu(g) * u).reshape(-1, E, I) * w[..., None]  # [N, E, I]
    routed = h.reshape(-1, E * I) @ p["experts.down"].transpose(1, 0, 2).reshape(D, E * I).T  # [N, D]
    sh = (jax.nn.silu(xf @ p["shared_expert.gate_proj"].T) * (xf @ p["shared_expert.up_proj"].T)
          ) @ p["shared_expert.down_proj"].T
    sh = jax.nn.sigmoid(xf @ p["shared_expert_gate.weight"].T) * sh
    return (routed + sh).reshape(B, T, D)


def router_logits(params, ids, cfg):
    """ids [B, T] -> every layer's router logits [L, B*T, E] (the student's forward)."""
    import jax
    import jax.numpy as jnp
    from _train_model import attention, rms_norm, rope_cos_sin

    cos, sin = rope_cos_sin(cfg, jnp.arange(ids.shape[1]))

    def layer(x, p):
        x = x + attention(p, rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps), cfg, cos, sin)
        h = rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps)
        return x + moe_ffn(p, h, cfg), h.reshape(-1, h.shape[-1]) @ p["gate.weight"].T

    return jax.lax.scan(layer, params["embed_tokens"][ids], params["layers"])[1]


def sharpen_router(params, cfg, scale: float, windows=None) -> dict:
    """Multiply every router by `scale` (the build's temperature of 0.01 makes the router's
    probabilities flat, ~1/E, so the paper's alpha rule cannot rank experts on them). With
    `windows` ([N, T] token ids), also divide each expert's down projection by its mean top-k
    weight x k over those tokens when selected (one pass of the sharpened model, all layers at
    once), so that on average each expert adds what it added under ~1/k weights. Returns stats."""
    import jax
    import numpy as np

    params["layers"]["gate.weight"] = params["layers"]["gate.weight"] * np.float32(scale)
    if windows is None:
        return dict(router_scale=scale)
    k, E, L = cfg.num_experts_per_tok, cfg.num_experts, cfg.num_hidden_layers
    f = jax.jit(lambda p, ids: router_logits(p, ids, cfg))
    wsum, cnt = np.zeros((L, E)), np.zeros((L, E))
    for w in windows:
        lg = np.asarray(f(params, w[None]), np.float64)  # [L, T, E]
        idx = np.argsort(-lg, -1)[..., :k]
        top = np.take_along_axis(lg, idx, -1)
        wk = np.exp(top - top.max(-1, keepdims=True))
        wk = wk / wk.sum(-1, keepdims=True) * k  # norm_topk_prob weights x k
        for layer in range(L):
            np.add.at(wsum[layer], idx[layer].ravel(), wk[layer].ravel())
            np.add.at(cnt[layer], idx[layer].ravel(), 1.0)
    mean = np.where(cnt > 0, wsum / np.maximum(cnt, 1), 1.0)
    params["layers"]["experts.down"] = (params["layers"]["experts.down"]
                                        / mean[:, :, None, None].astype(np.float32))
    return dict(router_scale=scale, rescale_tokens=int(sum(w.size for w in windows)),
                mean_weight_x_k_min=float(mean.min()), mean_weight_x_k_max=float(mean.max()))


def logits(params, ids, cfg):
    return forward(params, ids, cfg)[0]


def merge(train: dict, frozen: dict) -> dict:
    return dict(frozen, layers={**frozen["layers"], **train})


def kl_loss(train, frozen, teacher, ids, cfg, teacher_cfg, hidden_mse: float = 0.0):
    """(loss, KL): KL is the mean over tokens of KL(teacher || student) of the next-token
    distributions; the loss adds hidden_mse x the mean over layers of
    |student - teacher residual stream|^2 / |teacher's|^2."""
    import jax
    import jax.numpy as jnp

    t_logits, t_hidden = jax.lax.stop_gradient(forward(teacher, ids, teacher_cfg))
    t = jax.nn.log_softmax(t_logits, -1)  # [B, T, V]
    s_logits, s_hidden = forward(merge(train, frozen), ids, cfg)
    kl = jnp.mean(jnp.sum(jnp.exp(t) * (t - jax.nn.log_softmax(s_logits, -1)), -1))
    if not hidden_mse:
        return kl, kl
    err = jnp.sum((s_hidden - t_hidden) ** 2, (1, 2, 3)) / jnp.sum(t_hidden ** 2, (1, 2, 3))  # [L]
    return kl + hidden_mse * jnp.mean(err), kl


def split(params: dict, names) -> tuple[dict, dict]:
    """(trained layer tensors {name: [L, ...]}, the rest)."""
    train = {n: params["layers"][n] for n in names}
    return train, dict(params, layers={k: v for k, v in params["layers"].items() if k not in names})


def make_optimizer(lr, router_lr, names, steps: int, warmup: int, clip: float):
    """AdamW (no decay: the weights are a fit to keep) on the experts, its own rate on the
    routers; linear warm-up, cosine to 10%."""
    import optax

    def schedule(peak):
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), peak * 0.1)

    labels = {n: "router" if n in ROUTER else "experts" for n in names}
    return optax.chain(optax.clip_by_global_norm(clip), optax.multi_transform(
        {"experts": optax.adam(schedule(lr), b2=0.99), "router": optax.adam(schedule(router_lr), b2=0.99)},
        labels))


class Distiller:
    """The jitted pieces over one (teacher, student) pair: micro-batch gradients, the update,
    the held-out log-likelihood. Mechanism only; the loop below decides when."""

    def __init__(self, teacher, teacher_cfg, student, cfg, names, opt, hidden_mse: float = 0.0):
        import jax

        self.cfg, self.names, self.opt = cfg, tuple(names), opt
        self.teacher = jax.device_put(teacher)  # once: numpy arguments would be copied every call
        self.train, self.frozen = jax.device_put(split(student, self.names))
        self.grad = jax.jit(jax.value_and_grad(
            lambda tr, fr, te, ids: kl_loss(tr, fr, te, ids, cfg, teacher_cfg, hidden_mse), has_aux=True))
        self.kl = jax.jit(lambda tr, fr, te, ids: kl_loss(tr, fr, te, ids, cfg, teacher_cfg)[1])
        self.add = jax.jit(lambda a, b: jax.tree_util.tree_map(lambda x, y: x + y, a, b))

        def update(train, state, grads, n):
            import optax

            grads = jax.tree_util.tree_map(lambda g: g / n, grads)
            updates, state = opt.update(grads, state, train)
            return optax.apply_updates(train, updates), state, optax.tree_utils.tree_norm(grads)

        self.update = jax.jit(update)
        self.nll = jax.jit(token_nll_sum, static_argnums=2)

    def step(self, state, batches):
        """One optimizer step over micro-batches (a list of [B, T] windows), waiting for quiet
        before each; returns (state, mean KL before the update, grad norm, quiet seconds)."""
        grads, loss, quiet = None, 0.0, 0.0
        for ids in batches:
            quiet += wait_quiet()
            (_, l), g = self.grad(self.train, self.frozen, self.teacher, ids)
            grads = g if grads is None else self.add(grads, g)
            loss += float(l)
        self.train, state, gnorm = self.update(self.train, state, grads, len(batches))
        return state, loss / len(batches), float(gnorm), quiet

    def student(self) -> dict:
        return merge(self.train, self.frozen)

    def held_ppl(self, params, cfg, held: dict) -> dict:
        """{corpus: perplexity over its windows, mean: geometric mean}, one window per call."""
        import numpy as np

        ppl = {}
        for corpus, wins in held.items():
            nll, n = 0.0, 0
            for w in wins:
                wait_quiet()
                nll += float(self.nll(params, w[None], cfg))
                n += w.size - 1
            ppl[corpus] = float(np.exp(nll / n))
        ppl["mean"] = float(np.exp(np.mean([np.log(v) for v in ppl.values()])))
        return ppl


def token_nll_sum(params, ids, cfg):
    from _train_model import token_nll

    return token_nll(logits(params, ids, cfg)[:, :-1], ids[:, 1:]).sum()


def checkpoint(path: Path, train, state, meta: dict):
    """The trained tensors, the optimizer state (leaves in tree order) and meta in one .npz,
    written beside and renamed over `path`, so a stop at any moment leaves the last one whole."""
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves((train, state))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **{f"l{i}": np.asarray(x) for i, x in enumerate(leaves)})
    os.replace(tmp, path)


def restore(path: Path, train, state):
    """(train, state, meta) from `checkpoint`'s file, shaped like the given fresh ones."""
    import jax
    import numpy as np

    z = np.load(path)
    leaves, treedef = jax.tree_util.tree_flatten((train, state))
    got = [z[f"l{i}"] for i in range(len(leaves))]
    assert len(z.files) == len(leaves) + 1 and all(a.shape == b.shape for a, b in zip(got, leaves)), path
    train, state = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(a) for a in got])
    return train, state, json.loads(str(z["meta"]))


# ---- text --------------------------------------------------------------------------------------
def training_streams(tokenizer, data: Path) -> list:
    """One token stream per corpus (its training documents joined), the build's documents."""
    import numpy as np
    import moefy_smollm2 as mf

    return [np.concatenate([np.asarray(tokenizer.encode(t).ids, np.int32) for t in train])
            for train, _ in mf.ensure_texts(data).values()]


def batch_at(streams, micro: int, batch: int, seq: int, seed: int):
    """[batch, seq] windows for micro-batch `micro` (deterministic, so a resumed run continues
    the same sequence); rows take the corpora in turn."""
    import numpy as np

    rng = np.random.default_rng((seed, micro))
    rows = []
    for b in range(batch):
        s = streams[(micro * batch + b) % len(streams)]
        start = int(rng.integers(0, len(s) - seq))
        rows.append(s[start:start + seq])
    return np.stack(rows)


# ---- the command -------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill_smollm2.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="HF checkpoint directory to write (the student's layout)")
    p.add_argument("--student", default=str(REPO / "checkpoints/smollm2-moe"))
    p.add_argument("--teacher", default=str(REPO / "checkpoints/smollm2-dense"))
    p.add_argument("--data-dir", default=str(REPO / "data"))
    p.add_argument("--run-dir", default=str(REPO / "data/runs/smollm2-distill"),
                   help="the resumable state (state.npz), token cache, compile cache (not committed)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (the schedule's length)")
    p.add_argument("--batch", type=int, default=2, help="windows per micro-batch")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the experts")
    p.add_argument("--hidden-mse", type=float, default=0.0,
                   help="add this x the per-layer relative MSE of the residual stream (0: KL only)")
    p.add_argument("--train-router", action="store_true", help="train the routers too")
    p.add_argument("--router-lr", type=float, default=1e-6)
    p.add_argument("--router-scale", type=float, default=1.0,
                   help="multiply the student's routers by this before training (sharper router probabilities)")
    p.add_argument("--rescale-experts", type=int, default=0, metavar="N",
                   help="with --router-scale: divide each expert's down projection by its mean top-k weight x k "
                        "over N training windows of --seq-len (0: no)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--ckpt-every", type=int, default=10, help="save the run every N steps")
    p.add_argument("--minutes", type=float, help="stop (saving, writing OUT) after this much wall time")
    p.add_argument("--stop-step", type=int, metavar="N",
                   help="stop (saving, writing OUT) after step N, the schedule still spanning --steps: "
                        "repeats a run that --minutes cut short, step for step")
    p.add_argument("--no-eval", action="store_true", help="skip held-out perplexity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the record here")
    p.add_argument("--force", action="store_true", help="replace OUT / --json")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    out, run_dir = Path(args.out), Path(args.run_dir)
    for target in (out, args.json):
        if target and Path(target).exists() and not args.force:
            print(f"error: {target} exists (use --force to replace it)", file=sys.stderr)
            return 2
    import jax
    import numpy as np
    from tokenizers import Tokenizer
    from tqdm import tqdm

    import moefy_smollm2 as mf

    t0, cpu0 = time.perf_counter(), time.process_time()
    run_dir.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(run_dir / "jax-cache"))
    teacher_cfg, _, teacher = load_checkpoint(Path(args.teacher))
    cfg, hub, student = load_checkpoint(Path(args.student))
    tokenizer = Tokenizer.from_file(str(Path(args.student) / "tokenizer.json"))
    names = EXPERTS + (ROUTER if args.train_router else ())
    tokens_per_step = args.batch * args.accum * args.seq_len
    print(f"student {args.student}: {cfg.num_experts} experts top-{cfg.num_experts_per_tok} + shared "
          f"{cfg.shared_expert_intermediate_size}; teacher {args.teacher}; training {', '.join(names)}; "
          f"{args.steps} steps x {tokens_per_step} tokens ({args.batch}x{args.seq_len}, accum {args.accum}) "
          f"= {args.steps * tokens_per_step:,} tokens; lr {args.lr:g}; run dir {run_dir}", flush=True)

    cache = run_dir / "tokens.npz"
    if cache.exists():
        z = np.load(cache)
        streams = [z[k] for k in sorted(z.files)]
    else:
        streams = training_streams(tokenizer, Path(args.data_dir))
        np.savez(cache, **{f"c{i}": s for i, s in enumerate(streams)})
    texts = mf.ensure_texts(Path(args.data_dir))
    _, held = mf.corpus_windows(tokenizer, texts, HELD_TRAIN_TOKENS, HELD_EVAL_TOKENS, HELD_SEED)
    print(f"training tokens per corpus {[len(s) for s in streams]}; held-out windows "
          f"{ {c: w.shape for c, w in held.items()} }", flush=True)

    sharpen = None
    if args.router_scale != 1.0 or args.rescale_experts:
        wins = [batch_at(streams, 10**6 + i, 1, args.seq_len, args.seed + 1000)[0] for i in range(args.rescale_experts)]
        sharpen = sharpen_router(student, cfg, args.router_scale, wins or None)
        print(f"sharpened the student: {sharpen}", flush=True)
        # the student's output keeps the sharpened, unscaled-by-training tensors too
        hub = trained_hub(hub, {n: student["layers"][n] for n in ("gate.weight", "experts.down")},
                          ("gate.weight", "experts.down"))

    opt = make_optimizer(args.lr, args.router_lr, names, args.steps, args.warmup, args.clip)
    d = Distiller(teacher, teacher_cfg, student, cfg, names, opt, args.hidden_mse)
    state = opt.init(d.train)
    ckpt = run_dir / "state.npz"
    meta = dict(step=0, train_s=0.0, cpu_s=0.0, quiet_s=0.0, log=[])
    if ckpt.exists():
        d.train, state, meta = restore(ckpt, d.train, state)
        if meta["args"]["student"] != args.student or meta["args"]["train_router"] != args.train_router:
            raise SystemExit(f"{run_dir} holds a run of {meta['args']}: use another --run-dir")
        print(f"resumed at step {meta['step']}", flush=True)
    meta["args"] = vars(args)

    def save():
        wait_quiet()
        checkpoint(ckpt, d.train, state, meta)

    before = None
    if not args.no_eval:
        before_path = run_dir / "before.json"
        if before_path.exists():
            before = json.loads(before_path.read_text())
        else:
            before = dict(dense=d.held_ppl(teacher, teacher_cfg, held), moe=d.held_ppl(student, cfg, held))
            before_path.write_text(json.dumps(before, indent=2) + "\n")
        print(f"before: dense ppl {before['dense']['mean']:.3f}, MoE ppl {before['moe']['mean']:.3f} "
              f"({before['moe']['mean'] / before['dense']['mean']:.3f}x)", flush=True)

    seg_t, seg_cpu, seg_quiet = time.perf_counter(), time.process_time(), 0.0
    start_train_s, start_cpu_s = meta["train_s"], meta["cpu_s"]
    pbar = tqdm(total=args.steps, initial=meta["step"], dynamic_ncols=True, mininterval=2.0, desc="distill")
    stop_at = t0 + 60 * args.minutes if args.minutes is not None else None
    last = args.steps if args.stop_step is None else min(args.steps, args.stop_step)
    while meta["step"] < last and (stop_at is None or time.perf_counter() < stop_at):
        micro = meta["step"] * args.accum
        batches = [batch_at(streams, micro + a, args.batch, args.seq_len, args.seed) for a in range(args.accum)]
        t = time.perf_counter()
        state, kl, gnorm, quiet = d.step(state, batches)
        busy = time.perf_counter() - t - quiet
        seg_quiet += quiet
        meta["step"] += 1
        meta["train_s"] = start_train_s + time.perf_counter() - seg_t - seg_quiet
        meta["cpu_s"] = start_cpu_s + time.process_time() - seg_cpu
        meta["quiet_s"] += quiet
        meta["log"].append(dict(step=meta["step"], kl=round(kl, 5), gnorm=round(gnorm, 4), s=round(busy, 2)))
        pbar.update(1)
        pbar.set_postfix(kl=f"{kl:.4f}", tok_s=f"{tokens_per_step / busy:.0f}", quiet=f"{meta['quiet_s']:.0f}s")
        if meta["step"] % args.ckpt_every == 0:
            save()
    pbar.close()
    save()
    tokens = meta["step"] * tokens_per_step
    print(f"trained {meta['step']} steps, {tokens:,} tokens, {meta['train_s'] / 60:.1f} min wall (busy), "
          f"{meta['cpu_s'] / 60:.1f} min CPU, {meta['quiet_s'] / 60:.1f} min waiting for quiet", flush=True)

    if out.exists():
        shutil.rmtree(out)
    layers = {n: np.asarray(v) for n, v in d.train.items()}
    record = dict(student=args.student, teacher=args.teacher, trained=list(names), steps=meta["step"],
                  tokens=tokens, seq_len=args.seq_len, sharpen=sharpen, tokens_per_step=tokens_per_step, lr=args.lr,
                  router_lr=args.router_lr if args.train_router else None,
                  train_wall_s=round(meta["train_s"], 1), train_cpu_s=round(meta["cpu_s"], 1),
                  quiet_wait_s=round(meta["quiet_s"], 1),
                  kl_first=meta["log"][0]["kl"] if meta["log"] else None,
                  kl_last10=float(np.mean([r["kl"] for r in meta["log"][-10:]])) if meta["log"] else None)
    config = json.loads((Path(args.student) / "config.json").read_text())
    extra = json.loads((Path(args.student) / "moefy.json").read_text()) if (Path(args.student) / "moefy.json").exists() else {}
    mf.write_checkpoint(out, config, trained_hub(hub, layers, names), tokenizer,
                        extra=dict(extra, distill={k: v for k, v in record.items()}))
    if before is not None:
        after = d.held_ppl(d.student(), cfg, held)
        record.update(dense_ppl=before["dense"], moe_before_ppl=before["moe"], moe_distilled_ppl=after,
                      ratio_before=before["moe"]["mean"] / before["dense"]["mean"],
                      ratio=after["mean"] / before["dense"]["mean"])
        print(f"held-out ppl: dense {before['dense']['mean']:.3f}, MoE before {before['moe']['mean']:.3f} "
              f"({record['ratio_before']:.3f}x), distilled {after['mean']:.3f} ({record['ratio']:.3f}x)", flush=True)
    record.update(out=str(out), log=meta["log"],
                  command=" ".join(["python scripts/distill_smollm2.py", *(argv or sys.argv[1:])]),
                  date=time.strftime("%Y-%m-%d"), total_s=round(time.perf_counter() - t0, 1),
                  process_cpu_s=round(time.process_time() - cpu0, 1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
