"""Tiny random Hugging Face MoE models for the tests, one builder per family."""

from __future__ import annotations

import sys
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
        # multi-head latent attention: kv_lora_rank 12, rope 8 (+ nope 8) per query head, v 12
        "deepseek_v2": dict(intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                            num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=12, q_lora_rank=None,
                            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=1.5),
        "deepseek_v3": dict(intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                            num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=12, q_lora_rank=10,
                            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_group=4, topk_group=2,
                            num_key_value_heads=heads),
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
    _randomise(model, scale)
    model.save_pretrained(path, save_original_format=not fused)
    return model


def deepseek_config(**overrides) -> dict:
    """config.json of a tiny deepseek-moe-16b-style checkpoint (hub remote code, model_type
    "deepseek"): the fields its configuration_deepseek.py writes."""
    cfg = dict(architectures=["DeepseekForCausalLM"], model_type="deepseek",
               auto_map={"AutoConfig": "configuration_deepseek.DeepseekConfig",
                         "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
               vocab_size=128, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
               n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1, moe_layer_freq=1,
               norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True,
               hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
               rope_scaling=None, attention_bias=False, attention_dropout=0.0, pretraining_tp=1,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32", use_cache=True)
    return {**cfg, **overrides}


def deepseek_reference(cfg: dict):
    """The PyTorch reference for a "deepseek" checkpoint, wired from transformers parts:
    LLaMA's decoder (attention, norms, rope, cache, generate) with each layer's MLP swapped for
    DeepSeek-V2's MoE block (softmax greedy top-k, shared experts) or DeepSeek-V2's dense MLP,
    on the remote code's layer rule: MoE iff layer >= first_k_dense_replace and
    layer % moe_layer_freq == 0."""
    from transformers import DeepseekV2Config, LlamaConfig, LlamaForCausalLM
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP, DeepseekV2Moe

    llama = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                        intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                        num_attention_heads=cfg["num_attention_heads"],
                        num_key_value_heads=cfg["num_key_value_heads"], rms_norm_eps=cfg["rms_norm_eps"],
                        rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]},
                        max_position_embeddings=cfg["max_position_embeddings"], attention_bias=cfg["attention_bias"],
                        tie_word_embeddings=False)
    assert not cfg["norm_topk_prob"], "transformers' DeepSeek-V2 MoE block does not renormalise"
    moe = DeepseekV2Config(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                           moe_intermediate_size=cfg["moe_intermediate_size"], n_routed_experts=cfg["n_routed_experts"],
                           n_shared_experts=cfg["n_shared_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
                           topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False)
    model = LlamaForCausalLM(llama)
    for i, layer in enumerate(model.model.layers):
        sparse = i >= cfg["first_k_dense_replace"] and i % cfg["moe_layer_freq"] == 0
        layer.mlp = DeepseekV2Moe(moe) if sparse else DeepseekV2MLP(moe)
    return model


def save_deepseek(path: Path, cfg: dict, seed: int = 0, fused: bool = False, scale: float = 0.5):
    """A random `deepseek_reference` model written in deepseek-moe-16b's on-disk layout:
    per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`, `mlp.gate.weight`,
    `mlp.shared_experts.*`, LLaMA attention keys; config.json as the hub has it."""
    import json

    import torch
    from safetensors.torch import save_file

    assert not fused
    torch.manual_seed(seed)
    model = deepseek_reference(cfg).float().eval()
    _randomise(model, scale)
    I = cfg["moe_intermediate_size"]
    tensors = {}
    for key, value in model.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            for e in range(value.shape[0]):
                tensors[f"{prefix}{e}.gate_proj.weight"] = value[e, :I]
                tensors[f"{prefix}{e}.up_proj.weight"] = value[e, I:]
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(value.shape[0]):
                tensors[f"{prefix}{e}.down_proj.weight"] = value[e]
        else:
            tensors[key] = value
    Path(path).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(path) / "model.safetensors"),
              metadata={"format": "pt"})
    (Path(path) / "config.json").write_text(json.dumps(cfg, indent=2))
    return model


def _randomise(model, scale: float):
    import torch

    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * scale / p.shape[-1] ** 0.5 * 2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # deepseek_v3's selection bias, zeros at init
                b.copy_(0.2 * torch.randn_like(b))


def make_tiny_hf(out: Path) -> Path:
    """The CLI tests' 2-layer, hidden-32 HF checkpoint with a tokenizer
    (scripts/make_tiny_model.py), written to out."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import make_tiny_model

    assert make_tiny_model.main([str(out), "--layers", "2", "--hidden", "32"]) == 0
    return out
