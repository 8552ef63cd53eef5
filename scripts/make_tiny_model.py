"""Build a small random MoE checkpoint in Hugging Face format, with a trained tokenizer.

For smoke tests and for trying the CLI without the bundled model:

    python scripts/make_tiny_model.py /tmp/tiny-qwen2moe --family qwen2_moe
    moejax decode --model /tmp/tiny-qwen2moe --prompt "Hello"

The weights are random (the text it generates is noise); the tokenizer is a byte-level
BPE trained by `tokenizers` on a short built-in text. Needs torch + transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TEXT = """Mixture-of-Experts language models route every token to a few experts out of many.
When the device cannot hold every expert, the experts live in host memory and move to the
device when they are needed. A cache keeps the experts that are likely to be used again,
and a scheduler decides which experts to fetch, which to keep and which to replace with a
similar expert that is already on the device. The quick brown fox jumps over the lazy dog.
"""

SIZES = {
    "mixtral": dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_experts=16, num_experts_per_tok=4),
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                      norm_topk_prob=True),
    "olmoe": dict(intermediate_size=32, num_experts=16, num_experts_per_tok=4),
    "deepseek_v2": dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16, n_shared_experts=2,
                        num_experts_per_tok=4, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4),
    "deepseek_v3": dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16, n_shared_experts=1,
                        num_experts_per_tok=4, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=4, topk_group=2,
                        num_key_value_heads=4),
}


def train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    return tok


def make(out: Path, family: str, layers: int, hidden: int, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = train_tokenizer(512)
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|endoftext|>")
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=eos, eos_token_id=eos,
                  tie_word_embeddings=False)
    config = AutoConfig.for_model(family, **{**common, **SIZES[family]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"},
        indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--family", choices=sorted(SIZES), default="qwen2_moe")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    if a.out.exists() and not a.force:
        print(f"error: {a.out} exists (use --force)", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    make(a.out, a.family, a.layers, a.hidden, a.seed)
    print(f"wrote a random {a.family} model to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
