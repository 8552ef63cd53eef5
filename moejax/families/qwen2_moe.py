"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B).

Differs from mixtral: q/k/v projections have a bias; a shared expert of its own width runs
on every token, scaled by sigmoid(shared_expert_gate(x)); `norm_topk_prob` (default off);
dense layers chosen by `mlp_only_layers` / `decoder_sparse_step`.
"""

from moejax.families import ExpertNames, common_fields, num_experts, sparse_layers

EXPERTS = ExpertNames(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")


def fields(hf: dict) -> dict:
    return dict(
        **common_fields(hf),
        num_experts=num_experts(hf, 60),
        top_k=hf.get("num_experts_per_tok", 4),
        moe_intermediate_size=hf.get("moe_intermediate_size", 1408),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_layers=sparse_layers(hf),
        dense_intermediate_size=hf.get("intermediate_size", 5632),
        shared_intermediate_size=hf.get("shared_expert_intermediate_size", 5632),
        shared_expert_gate=True,
        qkv_bias=bool(hf.get("qkv_bias", True)),
    )
