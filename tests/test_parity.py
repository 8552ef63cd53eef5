"""The resident model against transformers' PyTorch implementation (fp32).

Each case: tiny random HF model -> save_pretrained -> moejax convert -> moejax.load, then
compare the full forward, 8 incremental decode steps through the KV cache, and greedy
generations. Tolerance: max |diff| <= 1e-4 * max |logit|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moejax  # noqa: E402
from moejax.generate import decode_step, pad_prompt, prefill_step  # noqa: E402
from moejax.model.decoder import empty_cache  # noqa: E402
from tiny import hf_config  # noqa: E402

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
MLA_FAMILIES = ["deepseek_v2", "deepseek_v3"]
CASES = [(f, seed, layout, {}) for f in FAMILIES for seed in (0, 1) for layout in ("gqa", "mha")]
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, beta_fast=32,
            beta_slow=1, mscale=0.707, mscale_all_dim=0.707)
# Multi-head latent attention (always "mha": one latent for all heads). tiny.py's defaults:
# deepseek_v2 without q LoRA, greedy top-k, routed_scaling_factor 1.5; deepseek_v3 with q
# LoRA, sigmoid + correction bias, group-limited (2 of 4 groups), norm_topk_prob, scaling
# 2.5, interleaved rope. Both have a dense first layer and a shared expert.
MLA_CASES = [(f, seed, "mha", over) for seed in (0, 1) for f, over in (
    ("deepseek_v2", {}),
    ("deepseek_v2", dict(q_lora_rank=10, topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    ("deepseek_v3", {}),
    ("deepseek_v3", dict(q_lora_rank=None, norm_topk_prob=False, rope_interleave=False, n_group=1, topk_group=1)),
)] + [
    ("deepseek_v2", 2, "mha", dict(rope_parameters=YARN, num_hidden_layers=3, n_shared_experts=2)),
    ("deepseek_v3", 2, "mha", dict(rope_parameters={**YARN, "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.8})),
    ("qwen3_moe", 2, "gqa", dict(rope_parameters={k: YARN[k] for k in ("rope_type", "rope_theta", "factor",
                                                                        "original_max_position_embeddings")})),
]
VARIANTS = [
    ("qwen2_moe", 2, "gqa", dict(norm_topk_prob=True)),
    ("qwen2_moe", 3, "gqa", dict(num_hidden_layers=3, mlp_only_layers=[1])),
    ("qwen2_moe", 4, "mha", dict(num_hidden_layers=4, decoder_sparse_step=2, qkv_bias=False)),
    ("qwen3_moe", 2, "gqa", dict(norm_topk_prob=False, attention_bias=True)),
    ("olmoe", 2, "gqa", dict(norm_topk_prob=True, clip_qkv=0.5)),
    ("mixtral", 2, "gqa", dict(tie_word_embeddings=True)),
]
PROMPT_LEN, STEPS = 9, 8


def _close(ours, ref):
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert err <= 1e-4 * scale, f"max |diff| {err:.3g} > 1e-4 * {scale:.3g}"


def _name(family, seed, layout, over, fused=False):
    tag = "-".join(f"{k}{v}" for k, v in over.items()).translate(str.maketrans("", "", " [],="))
    return f"{family}-{seed}-{layout}-{tag}-{'fused' if fused else 'hub'}"


def _check(tiny_store, family, seed, layout, over, fused=False):
    _, path, ref_model = tiny_store(_name(family, seed, layout, over, fused),
                                    hf_config(family, layout, **over), seed=seed, fused=fused)
    compare(path, ref_model, seed)


def compare(path, ref_model, seed):
    """Converted checkpoint at path against the PyTorch model it came from: full forward,
    prefill + STEPS cached decode steps (teacher-forced), greedy generations."""
    model = moejax.load(path)
    V = model.config.vocab_size
    prompt = np.random.default_rng(seed).integers(0, V, (2, PROMPT_LEN))

    # 1. full forward
    with torch.no_grad():
        ref = ref_model(torch.tensor(prompt)).logits.numpy()
    _close(model.forward(prompt), ref)

    # 2. prefill + incremental decode through the KV cache, teacher-forced with HF's greedy tokens
    with torch.no_grad():
        out = ref_model(torch.tensor(prompt), use_cache=True)
        past, ref_logits = out.past_key_values, [out.logits[:, -1].numpy()]
        feed = []
        for _ in range(STEPS):
            nxt = torch.tensor(ref_logits[-1].argmax(-1))[:, None]
            feed.append(nxt.numpy()[:, 0])
            out = ref_model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            ref_logits.append(out.logits[:, -1].numpy())
    cache = empty_cache(model.config, 2, 64, model.dtype)
    key = jax.random.PRNGKey(0)
    _, logits, cache = prefill_step(model.graphdef, model.state, jnp.asarray(pad_prompt(prompt)), cache,
                                    jnp.int32(PROMPT_LEN - 1), key, 0.0, 1.0)
    _close(np.asarray(logits), ref_logits[0])
    for i, tok in enumerate(feed):
        _, logits, cache = decode_step(model.graphdef, model.state, jnp.asarray(tok, jnp.int32), cache,
                                       jnp.int32(PROMPT_LEN + i), key, 0.0, 1.0)
        _close(np.asarray(logits), ref_logits[i + 1])

    # 3. greedy generations are equal
    with torch.no_grad():
        hf_gen = ref_model.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                                    max_new_tokens=STEPS, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[:, PROMPT_LEN:].numpy()
    g = model.generate(prompt, STEPS)
    assert np.array_equal(np.array(g.tokens), hf_gen)


@pytest.mark.parametrize("family,seed,layout,over", CASES + VARIANTS + MLA_CASES,
                         ids=lambda v: v if isinstance(v, str) else None)
def test_parity_hub_layout(tiny_store, family, seed, layout, over):
    _check(tiny_store, family, seed, layout, over)


@pytest.mark.parametrize("family", FAMILIES + MLA_FAMILIES)
def test_parity_fused_layout(tiny_store, family):
    """transformers 5's fused expert layout (save_original_format=False)."""
    _check(tiny_store, family, 5, "mha" if family in MLA_FAMILIES else "gqa", {}, fused=True)
