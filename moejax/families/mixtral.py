"""Mixtral: the reference sparse MoE.

Differs from the shared layers only in naming: experts are `block_sparse_moe.experts.{e}.w1`
(gate) / `w3` (up) / `w2` (down) on the hub; top-k weights are always renormalised.
"""

from moejax.families import ExpertNames, common_fields, num_experts

EXPERTS = ExpertNames(block="block_sparse_moe", gate="w1", up="w3", down="w2")


def fields(hf: dict) -> dict:
    n = hf["num_hidden_layers"]
    return dict(
        **common_fields(hf),
        num_experts=num_experts(hf, 8),
        top_k=hf.get("num_experts_per_tok", 2),
        moe_intermediate_size=hf["intermediate_size"],
        norm_topk_prob=True,
        moe_layers=(True,) * n,
    )
