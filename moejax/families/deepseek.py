"""DeepSeekMoE (deepseek-ai/deepseek-moe-16b-base and -chat; hub remote code, model_type
"deepseek", no built-in transformers class).

LLaMA attention (q/k/v/o projections, bias only with `attention_bias`, plain rope) with the
DeepSeekMoE block: fine-grained routed experts, softmax top-k (greedy), `norm_topk_prob`,
`n_shared_experts` shared experts run as one ungated MLP of width n_shared x
moe_intermediate_size, and dense layers below `first_k_dense_replace` or off the
`moe_layer_freq` grid. No routed scaling.
"""

from moejax.families import _reject, common_fields
from moejax.families.deepseek_v2 import EXPERTS, moe_fields

__all__ = ["EXPERTS", "fields"]


def fields(hf: dict) -> dict:
    _reject(hf, "scoring_func", lambda v: v == "softmax")
    _reject(hf, "topk_method", lambda v: v == "greedy")
    moe = moe_fields(hf)
    moe["routed_scaling_factor"] = 1.0
    bias = bool(hf.get("attention_bias", False))
    return dict(**common_fields(hf), **moe, qkv_bias=bias, o_bias=bias)
