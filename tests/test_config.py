"""MoEConfig.from_hf: both rope styles, family quirks, loud rejection of what we do not implement."""

import pytest

from moejax.config import MoEConfig
from moejax.errors import UnsupportedConfig

BASE = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, hidden_act="silu")


def test_rope_theta_legacy_and_v5_styles_agree():
    legacy = MoEConfig.from_hf({**BASE, "model_type": "mixtral", "rope_theta": 5e5, "intermediate_size": 8})
    v5 = MoEConfig.from_hf({**BASE, "model_type": "mixtral", "intermediate_size": 8,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert legacy == v5 and legacy.rope_theta == 5e5


def test_qwen2_moe_sparse_layers_and_shared_expert():
    cfg = MoEConfig.from_hf({**BASE, "model_type": "qwen2_moe", "decoder_sparse_step": 2, "num_experts": 8,
                             "num_experts_per_tok": 2, "shared_expert_intermediate_size": 16})
    assert cfg.moe_layers == (False, True, False, True)
    assert cfg.qkv_bias and cfg.shared_expert_gate and cfg.shared_intermediate_size == 16
    cfg = MoEConfig.from_hf({**BASE, "model_type": "qwen2_moe", "mlp_only_layers": [0, 2]})
    assert cfg.moe_layers == (False, True, False, True)


def test_family_flags():
    q3 = MoEConfig.from_hf({**BASE, "model_type": "qwen3_moe", "head_dim": 16, "num_local_experts": 8,
                            "num_experts_per_tok": 2})
    assert (q3.qk_norm, q3.head_dim, q3.num_experts, q3.shared_intermediate_size) == ("head", 16, 8, 0)
    ol = MoEConfig.from_hf({**BASE, "model_type": "olmoe", "num_experts": 8, "num_experts_per_tok": 2,
                            "clip_qkv": 8.0})
    assert (ol.qk_norm, ol.clip_qkv, ol.norm_topk_prob) == ("proj", 8.0, False)
    mx = MoEConfig.from_hf({**BASE, "model_type": "mixtral", "intermediate_size": 8})
    assert mx.norm_topk_prob and mx.num_experts == 8 and mx.top_k == 2


def test_json_round_trip():
    cfg = MoEConfig.from_hf({**BASE, "model_type": "qwen2_moe", "eos_token_id": [1, 2]})
    assert MoEConfig.from_json(cfg.to_json()) == cfg and cfg.eos_token_ids == (1, 2)


@pytest.mark.parametrize("field,value,message", [
    ("model_type", "gpt_oss", "model_type='gpt_oss' is not supported"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4}, "yarn rope needs original_max_position_embeddings"),
    ("rope_scaling", {"type": "dynamic", "factor": 4}, "rope type 'dynamic' is not supported"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, "rope type 'linear'"),
    ("quantization_config", {"quant_method": "gptq"}, "quant_method='gptq'"),
    ("use_sliding_window", True, "use_sliding_window=True"),
    ("num_hidden_layers", None, "num_hidden_layers is missing"),
    ("num_experts_per_tok", 99, "num_experts_per_tok=99"),
])
def test_rejects_unsupported(field, value, message):
    hf = {**BASE, "model_type": "qwen2_moe", "num_experts": 8, field: value}
    with pytest.raises(UnsupportedConfig, match=message.replace("[", r"\[").replace("(", r"\(")):
        MoEConfig.from_hf(hf)
