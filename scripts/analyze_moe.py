"""Measure the exported model with transformers: held-out perplexity vs n-gram baselines,
greedy samples and routing health. Writes a JSON report and prints markdown tables.

  python scripts/analyze_moe.py checkpoints/moejax-shakespeare-moe \
      --report checkpoints/moejax-shakespeare-moe/report.json

Everything is computed from the shipped files (config.json, model.safetensors,
tokenizer.json) and the held-out works of scripts/fetch_data.py; nothing from training.

Routing definitions, per token and MoE layer, with p = softmax over all routed experts:
* load: share of the N*k routed assignments that go to each expert (uniform = 1/E);
* top-k probabilities: the j-th largest p among the selected experts, j = 1..k;
* low-score (alpha): with S the (k+1)-th largest p, a selected expert is low-score if
  p < (1 + alpha) * S.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("To be, or not to be", "Romeo.\n")
QUANTILES = (0.1, 0.5, 0.9)


def ngram_baselines(train, targets_prev, targets, vocab: int) -> dict:
    """Add-one smoothed unigram and bigram NLL (nats/token) on the given targets."""
    uni = np.bincount(train, minlength=vocab).astype(np.float64)
    uni_logp = np.log((uni + 1) / (uni.sum() + vocab))
    big = np.zeros((vocab, vocab), np.float64)
    np.add.at(big, (train[:-1].astype(np.int64), train[1:].astype(np.int64)), 1)
    big_logp = np.log((big + 1) / (big.sum(axis=1, keepdims=True) + vocab))
    return {"unigram_add1": float(-uni_logp[targets].mean()),
            "bigram_add1": float(-big_logp[targets_prev, targets].mean())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--report", type=Path, default=None)
    p.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--alpha", type=float, default=0.25)
    p.add_argument("--new-tokens", type=int, default=80)
    args = p.parse_args(argv)

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from _train_tokenizer import encode_works
    from fetch_data import load_split

    torch.manual_seed(0)
    ckpt = args.checkpoint
    model, info = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32,
                                                       output_loading_info=True)
    assert not any(info.values()), info
    model.eval()
    cfg = model.config
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    split = load_split(args.data_dir)
    train = encode_works(tok, split["train"])
    heldout = encode_works(tok, split["heldout"])

    T = args.seq_len
    n_win = (len(heldout) - 1) // T
    if args.max_windows:
        n_win = min(n_win, args.max_windows)
    win = np.stack([heldout[i * T:i * T + T + 1] for i in range(n_win)]).astype(np.int64)
    xs, ys = win[:, :-1], win[:, 1:]  # [W, T]

    nll_sum, n_tok = 0.0, 0
    load = np.zeros((cfg.num_hidden_layers, E))
    topk_p = [[] for _ in range(cfg.num_hidden_layers)]
    low = np.zeros((cfg.num_hidden_layers, k))  # low-score counts by selection rank
    with torch.no_grad():
        for i in range(0, n_win, args.batch_size):
            x = torch.from_numpy(xs[i:i + args.batch_size])
            out = model(x, output_router_logits=True)
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            y = torch.from_numpy(ys[i:i + args.batch_size])
            nll_sum += float(-logp.gather(-1, y[..., None]).sum())
            n_tok += y.numel()
            for layer, logits in enumerate(out.router_logits):
                probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
                top_v, top_i = torch.topk(probs, k + 1, dim=-1)  # [N, k+1]
                load[layer] += np.bincount(top_i[:, :k].reshape(-1).numpy(), minlength=E)
                topk_p[layer].append(top_v[:, :k].numpy())
                s = top_v[:, k:k + 1]
                low[layer] += (top_v[:, :k] < (1 + args.alpha) * s).sum(0).numpy()
    nll = nll_sum / n_tok
    base = ngram_baselines(train, xs.reshape(-1), ys.reshape(-1), cfg.vocab_size)
    ppl = {"model": float(np.exp(nll)), **{k_: float(np.exp(v)) for k_, v in base.items()}}

    # Routing summary per layer.
    n_assign = load.sum(axis=1, keepdims=True)
    share = load / n_assign  # [L, E]
    layers = []
    for layer in range(cfg.num_hidden_layers):
        tp = np.concatenate(topk_p[layer])  # [N, k]
        layers.append({
            "layer": layer,
            "load_share": share[layer].round(5).tolist(),
            "min_share_x_uniform": float(share[layer].min() * E),
            "max_share_x_uniform": float(share[layer].max() * E),
            "experts_below_quarter_uniform": int((share[layer] < 0.25 / E).sum()),
            "topk_prob_mean": tp.mean(0).round(4).tolist(),
            "topk_prob_quantiles": {str(q): np.quantile(tp, q, axis=0).round(4).tolist()
                                    for q in QUANTILES},
            "topk_prob_sum_mean": float(tp.sum(1).mean()),
            "low_score_share": float(low[layer].sum() / (tp.shape[0] * k)),
            "low_score_share_by_rank": (low[layer] / tp.shape[0]).round(4).tolist(),
        })
    all_tp = np.concatenate([np.concatenate(t) for t in topk_p])

    # Greedy samples (fixed prompts).
    hf_tok = AutoTokenizer.from_pretrained(str(ckpt))
    samples = {}
    for prompt in PROMPTS:
        ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=hf_tok.eos_token_id)
        samples[prompt] = hf_tok.decode(gen[0], skip_special_tokens=True)

    report = {
        "checkpoint": str(ckpt.name),
        "heldout_works": [w for w, _ in split["heldout"]],
        "heldout_tokens_scored": int(n_tok), "seq_len": T,
        "nll": {"model": nll, **base}, "perplexity": ppl,
        "routing": {"num_experts": E, "top_k": k, "alpha": args.alpha,
                    "uniform_share": 1 / E,
                    "experts_below_quarter_uniform_total":
                        sum(l["experts_below_quarter_uniform"] for l in layers),
                    "low_score_share_all_layers": float(low.sum() / (all_tp.shape[0] * k)),
                    "topk_prob_mean_all_layers": all_tp.mean(0).round(4).tolist(),
                    "layers": layers},
        "greedy_samples": samples,
    }
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    print_markdown(report)


def print_markdown(r):
    ppl = r["perplexity"]
    print(f"Held-out works: {', '.join(r['heldout_works'])}; {r['heldout_tokens_scored']:,} "
          f"tokens scored in {r['seq_len']}-token windows.\n")
    print("| model | held-out NLL (nats/token) | perplexity |\n|---|---|---|")
    for name, label in (("model", "this MoE"), ("bigram_add1", "bigram, add-one"),
                        ("unigram_add1", "unigram, add-one")):
        print(f"| {label} | {r['nll'][name]:.3f} | {ppl[name]:.1f} |")
    ro = r["routing"]
    k = ro["top_k"]
    print(f"\nRouting on held-out text (E = {ro['num_experts']}, k = {k}, uniform share "
          f"1/E = {ro['uniform_share']:.4f}; low-score at alpha = {ro['alpha']}):\n")
    ranks = " | ".join(f"p{j + 1} mean [p10, p50, p90]" for j in range(k))
    print(f"| layer | min load x E | max load x E | experts below 1/(4E) | {ranks} | "
          f"sum top-k | low-score share |")
    print("|---" * (6 + k) + "|")
    for l in ro["layers"]:
        q = l["topk_prob_quantiles"]
        cells = " | ".join(f"{l['topk_prob_mean'][j]:.3f} [{q['0.1'][j]:.3f}, {q['0.5'][j]:.3f}, "
                           f"{q['0.9'][j]:.3f}]" for j in range(k))
        print(f"| {l['layer']} | {l['min_share_x_uniform']:.2f} | {l['max_share_x_uniform']:.2f} "
              f"| {l['experts_below_quarter_uniform']} | {cells} | {l['topk_prob_sum_mean']:.3f} "
              f"| {l['low_score_share']:.3f} |")
    print(f"\nAll layers: low-score share {ro['low_score_share_all_layers']:.3f}; experts below "
          f"a quarter of the uniform share: {ro['experts_below_quarter_uniform_total']}.")
    for prompt, text in r["greedy_samples"].items():
        print(f"\nGreedy, prompt {prompt!r}:\n```\n{text}\n```")


if __name__ == "__main__":
    main()
