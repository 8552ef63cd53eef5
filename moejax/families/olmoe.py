"""OLMoE (allenai/OLMoE-1B-7B).

Differs from mixtral: RMSNorm over the whole q and k projections (`q_norm` of size
heads*head_dim) before the head split; optional `clip_qkv` clamp; `norm_topk_prob`
(default off); every layer is sparse.
"""

from moejax.families import ExpertNames, common_fields, num_experts

EXPERTS = ExpertNames(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")


def fields(hf: dict) -> dict:
    return dict(
        **common_fields(hf),
        num_experts=num_experts(hf, 64),
        top_k=hf.get("num_experts_per_tok", 8),
        moe_intermediate_size=hf.get("intermediate_size", 2048),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_layers=(True,) * hf["num_hidden_layers"],
        qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        qk_norm="proj",
        clip_qkv=hf.get("clip_qkv"),
    )
