"""DeepSeek-V2 and DeepSeek-V2-Lite (and the helpers deepseek and deepseek_v3 share).

Differs from mixtral: multi-head latent attention (queries directly or through a
`q_lora_rank` bottleneck; keys and values from a `kv_lora_rank` latent plus one shared
rope key), rope dims stored as interleaved pairs (the converter de-interleaves them), YaRN
rope; the first `first_k_dense_replace` layers (and, in the hub's remote code, layers not
a multiple of `moe_layer_freq`) are dense; `n_shared_experts` shared experts run as one
ungated MLP; softmax router in float32 with greedy or group-limited top-k (`n_group`,
`topk_group`: groups ranked by their best expert), weights times `routed_scaling_factor`.

`norm_topk_prob`: the hub's remote code renormalises the top-k weights when it is set;
transformers' built-in DeepSeek-V2 ignores it. We follow the remote code (no released V2
checkpoint sets it).
"""

from moejax.errors import UnsupportedConfig
from moejax.families import ExpertNames, _reject, common_fields

EXPERTS = ExpertNames(block="mlp", gate="gate_proj", up="up_proj", down="down_proj", shared="shared_experts")


def moe_fields(hf: dict) -> dict:
    """DeepSeekMoE: routed experts, shared experts, which layers are dense."""
    _reject(hf, "mlp_bias", lambda v: not v)
    E = hf.get("n_routed_experts")
    if not isinstance(E, int) or E <= 0:
        raise UnsupportedConfig("n_routed_experts is missing or not a positive integer (a dense model?)")
    first_dense = hf.get("first_k_dense_replace") or 0
    freq = hf.get("moe_layer_freq") or 1
    I = hf.get("moe_intermediate_size", 1407)
    return dict(
        num_experts=E,
        top_k=hf.get("num_experts_per_tok") or 6,
        moe_intermediate_size=I,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_layers=tuple(i >= first_dense and i % freq == 0 for i in range(hf["num_hidden_layers"])),
        dense_intermediate_size=hf.get("intermediate_size", 11008),
        shared_intermediate_size=I * (hf.get("n_shared_experts") or 0),
        routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
    )


def mla_fields(hf: dict) -> dict:
    _reject(hf, "attention_bias", lambda v: not v)
    for field in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if not isinstance(hf.get(field), int) or hf[field] <= 0:
            raise UnsupportedConfig(f"config.json field {field} is missing or not a positive integer")
    return dict(attention="mla", q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
                qk_nope_head_dim=hf["qk_nope_head_dim"], v_head_dim=hf["v_head_dim"],
                head_dim=hf["qk_rope_head_dim"], num_kv_heads=hf["num_attention_heads"])


def fields(hf: dict) -> dict:
    _reject(hf, "scoring_func", lambda v: v == "softmax")
    method = hf.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedConfig(f"topk_method={method!r} is not supported for deepseek_v2 "
                                "(greedy, group_limited_greedy)")
    groups = dict(n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1)
    return dict(
        **{**common_fields(hf), **mla_fields(hf)},
        **moe_fields(hf),
        **(groups if method == "group_limited_greedy" else {}),
        topk_method=method,
        router_fp32=True,
        rope_interleave=True,
    )
