"""Tiny random Hugging Face MoE models for the tests, one builder per family."""

from __future__ import annotations

from pathlib import Path

# Head layouts: (heads, kv_heads, head_dim override or None)
LAYOUTS = {"gqa": (4, 2), "mha": (4, 4)}


def hf_config(family: str, layout: str = "gqa", **overrides):
    from transformers import AutoConfig

    heads, kv = LAYOUTS[layout]
    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=heads,
                  num_key_value_heads=kv, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=False)
    per_family = {
        "mixtral": dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
        "qwen2_moe": dict(intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                          num_experts=8, num_experts_per_tok=3, norm_topk_prob=False),
        "qwen3_moe": dict(intermediate_size=40, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                          norm_topk_prob=True, head_dim=16),
        "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False),
    }[family]
    return AutoConfig.for_model(family, **{**common, **per_family, **overrides})


def save_hf(path: Path, config, seed: int = 0, fused: bool = False, scale: float = 0.5):
    """Random model from `config` saved at path (per-expert hub layout unless fused).

    Weights are drawn wider than HF's init (std `scale` / sqrt(fan-in)) so that routing and
    logits are far from uniform and a wrong computation cannot hide in tiny numbers."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * scale / p.shape[-1] ** 0.5 * 2)
    model.save_pretrained(path, save_original_format=not fused)
    return model
