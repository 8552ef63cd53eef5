"""DeepSeek families beyond the transformers parity cases in test_parity.py: the remote-code
"deepseek" family against a reference wired from transformers parts, config mapping and
rejections, conversion details, and the offloaded engine with every policy."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moejax  # noqa: E402
from moejax.config import MoEConfig  # noqa: E402
from moejax.convert import convert  # noqa: E402
from moejax.engine import OffloadEngine, make_engine  # noqa: E402
from moejax.errors import ConversionError, UnsupportedConfig  # noqa: E402
from moejax.offload.policies import POLICIES  # noqa: E402
from test_parity import compare  # noqa: E402
from tiny import deepseek_config, hf_config, save_deepseek, save_hf  # noqa: E402


# ---- deepseek (deepseek-moe-16b layout, remote code) ---------------------------------------
@pytest.mark.parametrize("seed,over", [
    (0, {}),
    (1, dict(num_key_value_heads=2)),
    (2, dict(num_hidden_layers=4, moe_layer_freq=2, n_shared_experts=1)),  # MoE at layer 2 only
])
def test_deepseek_remote_code_layout_parity(tiny_store, seed, over):
    cfg = deepseek_config(**over)
    _, path, ref = tiny_store(f"deepseek-{seed}", cfg, seed=seed, builder=save_deepseek)
    model_cfg = moejax.load(path).config
    expected = tuple(i >= cfg["first_k_dense_replace"] and i % cfg["moe_layer_freq"] == 0
                     for i in range(cfg["num_hidden_layers"]))
    assert model_cfg.moe_layers == expected
    assert model_cfg.shared_intermediate_size == cfg["n_shared_experts"] * cfg["moe_intermediate_size"]
    compare(path, ref, seed)


def test_deepseek_norm_topk_prob_renormalises():
    """norm_topk_prob (the reference block cannot): weights of the chosen k sum to 1."""
    import jax.numpy as jnp

    from moejax.model.moe import route

    cfg = MoEConfig.from_hf(deepseek_config(norm_topk_prob=True))
    w_router = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32)
    scores, weights, idx = route(cfg, jnp.asarray(x), jnp.asarray(w_router))
    probs = np.asarray(scores)
    assert np.allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)
    top = np.sort(np.argsort(-probs, axis=-1)[:, :3], axis=-1)
    assert np.array_equal(np.sort(np.asarray(idx), axis=-1), top)


# ---- config mapping and rejections ---------------------------------------------------------
def _hf(family, **over):
    return hf_config(family, "mha", **over).to_dict()


def test_config_mapping():
    v2 = MoEConfig.from_hf(_hf("deepseek_v2", num_hidden_layers=4, first_k_dense_replace=2))
    assert (v2.attention, v2.q_lora_rank, v2.kv_lora_rank, v2.head_dim, v2.num_kv_heads) == ("mla", 0, 12, 8, 4)
    assert v2.moe_layers == (False, False, True, True) and v2.router == "softmax" and v2.router_fp32
    assert (v2.routed_scaling_factor, v2.shared_intermediate_size, v2.rope_interleave) == (1.5, 16, True)
    v3 = MoEConfig.from_hf(_hf("deepseek_v3"))
    assert (v3.router, v3.topk_method, v3.n_group, v3.topk_group) == ("sigmoid", "noaux_tc", 4, 2)
    assert v3.norm_topk_prob
    assert v3.q_lora_rank == 10 and v3.routed_scaling_factor == 2.5
    v1 = MoEConfig.from_hf(deepseek_config(moe_layer_freq=2, num_hidden_layers=5))
    assert v1.moe_layers == (False, False, True, False, True) and v1.attention == "gqa"
    assert MoEConfig.from_json(v3.to_json()) == v3


@pytest.mark.parametrize("hf,message", [
    (lambda: {**_hf("deepseek_v3"), "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}},
     "quant_method='fp8'"),
    (lambda: {**_hf("deepseek_v2"), "topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
    (lambda: {**_hf("deepseek_v3"), "scoring_func": "softmax"}, "scoring_func='softmax'"),
    (lambda: {**_hf("deepseek_v2"), "attention_bias": True}, "attention_bias=True"),
    (lambda: {**_hf("deepseek_v2"), "mlp_bias": True}, "mlp_bias=True"),
    (lambda: {**_hf("deepseek_v3"), "n_group": 3}, "n_group=3"),
    (lambda: {**_hf("deepseek_v3"), "n_group": 8, "topk_group": 4}, "groups need at least 2 experts"),
    (lambda: {**_hf("deepseek_v2"), "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "'linear'"),
    (lambda: deepseek_config(n_routed_experts=None), "n_routed_experts"),
    (lambda: deepseek_config(scoring_func="sigmoid"), "scoring_func='sigmoid'"),
    (lambda: deepseek_config(rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic'"),
])
def test_unsupported_variants_rejected_by_name(hf, message):
    with pytest.raises(UnsupportedConfig, match=message.replace("(", r"\(").replace("[", r"\[")):
        MoEConfig.from_hf(hf())


# ---- conversion ----------------------------------------------------------------------------
def test_v3_multi_token_prediction_layers_skipped(tmp_path):
    """Real V3 checkpoints carry the MTP module as layer num_hidden_layers; it is not decoded."""
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "hf"
    save_hf(src, hf_config("deepseek_v3", "mha"), seed=0)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.2.eh_proj.weight"] = np.zeros((32, 64), np.float32)
    tensors["model.layers.2.enorm.weight"] = np.ones(32, np.float32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    convert(src, tmp_path / "mj", progress=False)
    tensors["model.layers.1.stray.weight"] = np.ones(3, np.float32)  # a real unknown key still fails
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="unknown tensor model.layers.1.stray.weight"):
        convert(src, tmp_path / "mj2", progress=False)


def test_bf16_checkpoint_keeps_router_and_selection_bias_in_float32(tmp_path):
    """As transformers does (gate.weight is kept in float32); the budget counts them so."""
    from moejax.offload.budget import dense_bytes

    src = tmp_path / "hf"
    save_hf(src, hf_config("deepseek_v3", "mha"), seed=0)
    convert(src, tmp_path / "mj", dtype="bfloat16", progress=False)
    model = moejax.load(tmp_path / "mj")
    layer = model.module.layers[1]
    assert layer.router_bias[...].dtype == np.float32 and layer.router[...].dtype == np.float32
    assert layer.wq[...].dtype.name == "bfloat16"
    assert np.isfinite(np.asarray(model.forward(np.arange(6)[None]))).all()
    e = OffloadEngine(tmp_path / "mj", "lru", ("pct", 1.0), cache_len=16)
    assert e._dense_bytes == dense_bytes(model.config, 2)


# ---- the offloaded engine ------------------------------------------------------------------
ENGINE_MODELS = {
    "deepseek_v2": lambda: (hf_config("deepseek_v2", "mha", num_hidden_layers=3, topk_method="group_limited_greedy",
                                      n_group=4, topk_group=2), save_hf),
    "deepseek_v3": lambda: (hf_config("deepseek_v3", "mha", num_hidden_layers=3), save_hf),
    "deepseek": lambda: (deepseek_config(), save_deepseek),
}
NEW = 8


@pytest.fixture(scope="module")
def engine_models(tiny_store):
    out = {}
    for name, make in ENGINE_MODELS.items():
        config, builder = make()
        _, path, _ = tiny_store(f"engine-{name}", config, seed=11, builder=builder)
        out[name] = (path, moejax.load(path))
    return out


@pytest.mark.parametrize("name", sorted(ENGINE_MODELS))
def test_every_policy_exact_at_alpha_zero_quarter_budget(engine_models, name):
    path, model = engine_models[name]
    assert len(model.config.moe_layer_ids) == 2  # prefetching policies have a next layer to predict
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 7))
    ref = model.generate(prompt, NEW)
    runs = ([("stepwise", p, 0) for p in POLICIES] + [("fused", "lru", 0), ("fused", "smoe", 0)]
            + [(kind, "smoe", 2) for kind in ("stepwise", "fused")])  # --prefetch-width 2 as well
    for kind, policy, width in runs:
        e = make_engine(kind, path, policy, ("pct", 0.25), cache_len=64, alpha=0.0, prefetch_width=width)
        g = e.generate(prompt, NEW)
        assert g.tokens == ref.tokens, (kind, policy, width)
        assert e.telemetry.substituted == 0 and e.telemetry.peak_device_bytes <= e.plan.budget_bytes, (kind, policy)
        assert e.telemetry.decode_unique > e.telemetry.decode_hits, (kind, policy)  # the quarter pool really missed


# a budget where each tiny model misses low-score experts with resident ones in the window
SUBSTITUTING_BUDGET = {"deepseek": 0.375, "deepseek_v2": 0.5, "deepseek_v3": 0.375}


@pytest.mark.parametrize("name", sorted(ENGINE_MODELS))
def test_smoe_substitutes_within_budget(engine_models, name):
    path, model = engine_models[name]
    prompt = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, 7))
    for width in (0, 2):  # the paper's prefetch rule and --prefetch-width 2
        out = {}
        for kind in ("stepwise", "fused"):  # sigmoid routers, group-limited selection: the same decisions
            e = make_engine(kind, path, "smoe", ("pct", SUBSTITUTING_BUDGET[name]), cache_len=64, alpha=0.5,
                            prefetch_width=width)
            g = e.generate(prompt, NEW)
            t = e.telemetry
            assert len(g.tokens[0]) == NEW and t.substituted > 0
            assert t.routed == (NEW - 1) * len(model.config.moe_layer_ids) * model.config.top_k
            assert t.peak_device_bytes <= e.plan.budget_bytes
            # fused: its idle fixed-width copies are transfers too (stepwise makes none)
            moved = t.transfers - (t.prefetch_idle if kind == "fused" else 0)
            out[kind] = (g.tokens, t.decode_hits, t.substituted, moved, t.prefetch_issued, t.prefetch_idle)
        assert out["fused"] == out["stepwise"], width


# ---- the released checkpoints' config.json files (as on the hub, abridged of auto_map) -----
V2_LITE = {"architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "aux_loss_alpha": 0.001,
           "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
           "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
           "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
           "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
           "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
           "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
           "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                            "original_max_position_embeddings": 4096, "type": "yarn"},
           "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
           "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
           "v_head_dim": 128, "vocab_size": 102400}
V3 = {**V2_LITE, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "bos_token_id": 0,
      "eos_token_id": 1, "first_k_dense_replace": 3, "hidden_size": 7168, "intermediate_size": 18432,
      "moe_intermediate_size": 2048, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
      "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
      "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
      "rope_scaling": {**V2_LITE["rope_scaling"], "mscale": 1.0, "mscale_all_dim": 1.0},
      "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_group": 4, "topk_method": "noaux_tc",
      "vocab_size": 129280}
MOE_16B = deepseek_config(bos_token_id=100000, eos_token_id=100001, hidden_size=2048, intermediate_size=10944,
                          moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2, num_attention_heads=16,
                          num_key_value_heads=16, num_experts_per_tok=6, num_hidden_layers=28, vocab_size=102400,
                          max_position_embeddings=4096, torch_dtype="bfloat16")


def test_released_configs_map():
    import math

    lite = MoEConfig.from_hf(V2_LITE)
    mscale = 0.1 * 0.707 * math.log(40) + 1.0
    assert lite.rope_yarn == (40.0, 4096.0, 32.0, 1.0, 1.0, 1.0)  # mscale == mscale_all_dim: cos/sin unscaled
    assert lite.softmax_scale == pytest.approx(192 ** -0.5 * mscale ** 2)
    assert lite.moe_layer_ids == tuple(range(1, 27)) and lite.shared_intermediate_size == 2816
    assert lite.kv_cache_shapes == ((1, 512), (1, 64)) and lite.n_group == 1 and lite.top_k == 6
    v3 = MoEConfig.from_hf(V3)
    assert (v3.num_experts, v3.top_k, v3.n_group, v3.topk_group, v3.router) == (256, 8, 8, 4, "sigmoid")
    assert v3.moe_layer_ids == tuple(range(3, 61)) and v3.q_lora_rank == 1536
    with pytest.raises(UnsupportedConfig, match="quant_method='fp8'"):
        MoEConfig.from_hf({**V3, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    v1 = MoEConfig.from_hf(MOE_16B)
    assert (v1.attention, v1.num_experts, v1.top_k, v1.shared_intermediate_size) == ("gqa", 64, 6, 2816)
    assert v1.moe_layer_ids == tuple(range(1, 28)) and v1.eos_token_ids == (100001,)
