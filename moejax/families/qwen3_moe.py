"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B).

Differs from qwen2_moe: no shared expert; RMSNorm on each query/key head (`q_norm`,
`k_norm` of size head_dim) before RoPE; optional `attention_bias`; `head_dim` may differ
from hidden_size / heads.
"""

from moejax.families import ExpertNames, common_fields, num_experts, sparse_layers

EXPERTS = ExpertNames(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")


def fields(hf: dict) -> dict:
    return dict(
        **common_fields(hf),
        num_experts=num_experts(hf, 128),
        top_k=hf.get("num_experts_per_tok", 8),
        moe_intermediate_size=hf.get("moe_intermediate_size", 768),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_layers=sparse_layers(hf),
        dense_intermediate_size=hf.get("intermediate_size", 6144),
        qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        qk_norm="head",
    )
