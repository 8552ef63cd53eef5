"""Resident decode throughput: moejax against transformers' `generate`, side by side.

Both run the same random checkpoint (qwen2_moe, or with --family deepseek_v2 the same sizes
with multi-head latent attention) in float32 on the CPU, greedy, batch 1:
the HF model is saved with `save_pretrained`, converted with `moejax convert`, and each
engine generates from the same prompt. Each engine reports every token to a callback (a
transformers streamer; moejax's on_token), which stamps the time: decode tokens/s is the
number of tokens after the first divided by the time from the first token to the last, so
prefill is excluded. Trials alternate between the engines so that machine drift hits both. Writes JSON records and prints a markdown table.

    python scripts/bench_resident.py --json out/bench_resident.json
    python scripts/bench_resident.py --family deepseek_v2 --sizes small --json out/bench_resident_mla.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

SIZES = {
    # name: (hidden, layers, experts, top_k, expert width, shared width, heads, kv heads, vocab)
    "small": (256, 4, 16, 4, 128, 256, 4, 2, 4096),
    "medium": (768, 8, 32, 4, 384, 768, 12, 4, 8192),
}


def build(size: str, root: Path, family: str = "qwen2_moe"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    H, L, E, k, I, S, nh, kv, V = SIZES[size]
    common = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=nh, num_experts_per_tok=k,
                  moe_intermediate_size=I, intermediate_size=S, max_position_embeddings=1024)
    if family == "qwen2_moe":
        config = AutoConfig.for_model(family, **common, num_key_value_heads=kv, num_experts=E,
                                      shared_expert_intermediate_size=S)
    else:  # deepseek_v2: V2-Lite's proportions (latent = H / 4, head dims nope 2:1 rope), all layers sparse
        D = H // nh
        config = AutoConfig.for_model(family, **common, num_key_value_heads=nh, n_routed_experts=E,
                                      n_shared_experts=S // I, first_k_dense_replace=0, q_lora_rank=None,
                                      kv_lora_rank=H // 4, qk_nope_head_dim=D, qk_rope_head_dim=D // 2, v_head_dim=D)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(root / "hf")
    n_params = sum(p.numel() for p in model.parameters())
    return model, n_params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="small,medium")
    p.add_argument("--family", choices=["qwen2_moe", "deepseek_v2"], default="qwen2_moe")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)

    import torch
    from transformers.generation.streamers import BaseStreamer

    import moejax
    from moejax.convert import convert

    records = []
    for size in a.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            hf_model, n_params = build(size, root, a.family)
            convert(root / "hf", root / "mj", progress=False)
            model = moejax.load(root / "mj")
            V = model.config.vocab_size
            prompt = np.random.default_rng(0).integers(0, V, (1, a.prompt_len))
            tprompt = torch.tensor(prompt)
            mask = torch.ones_like(tprompt)

            class Stamps(BaseStreamer):
                def __init__(self):
                    self.t = []

                def put(self, value):
                    self.t.append(time.perf_counter())

                def end(self):
                    pass

            def rate(stamps):  # tokens after the first / time from first to last token
                return (len(stamps) - 1) / (stamps[-1] - stamps[0])

            def run_hf(n):
                s = Stamps()
                with torch.no_grad():
                    out = hf_model.generate(tprompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                            do_sample=False, pad_token_id=0, streamer=s)
                return rate(s.t[1:]), out[0, a.prompt_len:].tolist()  # s.t[0] is the prompt

            def run_mj(n):
                s = Stamps()
                g = model.generate(prompt, n, on_token=s.put)  # the token is on the host: synchronised
                return rate(s.t), g.tokens[0]

            engines = {"transformers": run_hf, "moejax": run_mj}
            for run in engines.values():  # warm-up: compilation, allocator, caches
                run(a.new_tokens + 1)
            rates = {name: [] for name in engines}
            same_tokens = None
            for _ in range(a.trials):
                outs = {}
                for name, run in engines.items():
                    r, toks = run(a.new_tokens + 1)
                    rates[name].append(r)
                    outs[name] = toks
                same_tokens = outs["transformers"] == outs["moejax"]
            rec = {
                "size": size, "family": a.family, "params": n_params, "config": dict(zip(
                    ["hidden", "layers", "experts", "top_k", "expert_width", "shared_width", "heads", "kv_heads",
                     "vocab"], SIZES[size])),
                "new_tokens": a.new_tokens, "prompt_len": a.prompt_len, "trials": a.trials,
                "tokens_per_s": {n: statistics.median(r) for n, r in rates.items()},
                "tokens_per_s_all": rates, "greedy_tokens_equal": same_tokens,
            }
            rec["speedup"] = rec["tokens_per_s"]["moejax"] / rec["tokens_per_s"]["transformers"]
            records.append(rec)
            print(json.dumps(rec), file=sys.stderr)

    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
            "torch": torch.__version__, "jax": __import__("jax").__version__,
            "torch_threads": torch.get_num_threads()}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    print("| model | params | transformers tok/s | moejax tok/s | speed-up | same greedy tokens |")
    print("|---|---|---|---|---|---|")
    for r in records:
        t = r["tokens_per_s"]
        print(f"| {r['size']} {r['family']} | {r['params'] / 1e6:.1f} M | {t['transformers']:.1f} | {t['moejax']:.1f} | "
              f"{r['speedup']:.2f}x | {r['greedy_tokens_equal']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
