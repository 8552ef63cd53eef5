"""Export the JAX parameters to a Hugging Face qwen2_moe checkpoint and check parity.

The key map below is the only place that knows the hub layout (per-expert
`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`). The checkpoint is written by
transformers itself (`save_pretrained`) after loading our tensors, then reloaded from disk
with `output_loading_info=True`; any missing, unexpected or mismatched key, or a logits
difference above tolerance against the JAX model, fails the export.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

# JAX layer param -> HF key (relative to `model.layers.{i}.`); experts handled separately.
LAYER_KEYS = {
    "input_layernorm": "input_layernorm.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight", "q_proj.bias": "self_attn.q_proj.bias",
    "k_proj.weight": "self_attn.k_proj.weight", "k_proj.bias": "self_attn.k_proj.bias",
    "v_proj.weight": "self_attn.v_proj.weight", "v_proj.bias": "self_attn.v_proj.bias",
    "o_proj.weight": "self_attn.o_proj.weight",
    "gate.weight": "mlp.gate.weight",
    "shared_expert.gate_proj": "mlp.shared_expert.gate_proj.weight",
    "shared_expert.up_proj": "mlp.shared_expert.up_proj.weight",
    "shared_expert.down_proj": "mlp.shared_expert.down_proj.weight",
    "shared_expert_gate.weight": "mlp.shared_expert_gate.weight",
}
EXPERT_KEYS = {"experts.gate": "gate_proj", "experts.up": "up_proj", "experts.down": "down_proj"}
TOP_KEYS = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight",
            "lm_head": "lm_head.weight"}
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors",
                "tokenizer.json", "tokenizer_config.json", "export_info.json")
PARITY_RTOL = 1e-3  # max |logits diff| / max |logits|, fp32 on both sides


def hf_config(cfg, eos_id: int = 0, router_aux_loss_coef: float = 0.001):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.shared_expert_intermediate_size,  # unused: every layer is MoE
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=False, use_sliding_window=False, qkv_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        decoder_sparse_step=1, mlp_only_layers=[], num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
        norm_topk_prob=cfg.norm_topk_prob, router_aux_loss_coef=router_aux_loss_coef,
        initializer_range=cfg.initializer_range, bos_token_id=eos_id, eos_token_id=eos_id,
        architectures=["Qwen2MoeForCausalLM"])


def to_hub_state_dict(params, cfg) -> dict[str, np.ndarray]:
    """JAX tree -> {hub key: float32 array}, asserting every shape in config terms."""
    from _train_model import param_shapes

    shapes = param_shapes(cfg)
    out = {}
    for name, key in TOP_KEYS.items():
        a = np.asarray(params[name], np.float32)
        assert a.shape == shapes[name], (name, a.shape)
        out[key] = a
    for i, layer in enumerate(params["layers"]):
        assert set(layer) == set(LAYER_KEYS) | set(EXPERT_KEYS), sorted(layer)
        for name, key in LAYER_KEYS.items():
            a = np.asarray(layer[name], np.float32)
            assert a.shape == shapes["layers"][i][name], (i, name, a.shape)
            out[f"model.layers.{i}.{key}"] = a
        for name, proj in EXPERT_KEYS.items():
            a = np.asarray(layer[name], np.float32)  # [E, I, D] or [E, D, I]
            assert a.shape == shapes["layers"][i][name], (i, name, a.shape)
            for e in range(cfg.num_experts):
                out[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] = np.ascontiguousarray(a[e])
    return out


def round_params(params, dtype: str):
    """The parameters as they will be stored (bf16 rounding), back in float32."""
    import jax
    import jax.numpy as jnp

    if dtype == "float32":
        return params
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)


def _load_checked(path: Path, dtype):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                       output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise RuntimeError(f"loading {path} was not clean: {bad}")
    return model.eval()


def export_hf(params, cfg, tok_dir: Path, out: Path, save_dtype: str, heldout_tokens,
              train_info: dict, parity_tokens: int = 256,
              router_aux_loss_coef: float = 0.001) -> dict:
    import jax.numpy as jnp
    import safetensors.numpy
    import torch

    from _train_model import forward

    shipped = round_params(params, save_dtype)
    hub = to_hub_state_dict(shipped, cfg)
    config = hf_config(cfg, router_aux_loss_coef=router_aux_loss_coef)

    # 1. Our key map -> a staging checkpoint that transformers must load cleanly.
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        safetensors.numpy.save_file(hub, str(Path(tmp) / "model.safetensors"),
                                    metadata={"format": "pt"})
        model = _load_checked(Path(tmp), torch.float32)
    # 2. transformers writes the shipped checkpoint (hub layout) in the storage dtype.
    # Replace only the files this export writes (README.md / report.json stay).
    out.mkdir(parents=True, exist_ok=True)
    for f in EXPORT_FILES:
        (out / f).unlink(missing_ok=True)
    model.to(getattr(torch, save_dtype)).save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out / f)
    with safetensors.safe_open(str(out / "model.safetensors"), "np") as f:
        saved_keys = set(f.keys())
    if saved_keys != set(hub):
        raise RuntimeError(f"saved keys differ from the hub map: "
                           f"missing {sorted(set(hub) - saved_keys)[:5]}, "
                           f"extra {sorted(saved_keys - set(hub))[:5]}")

    # 3. Parity: transformers (fp32, from disk) vs the JAX model on a held-out snippet.
    ref = _load_checked(out, torch.float32)
    ids = np.asarray(heldout_tokens[:parity_tokens], np.int32)[None, :]
    with torch.no_grad():
        hf_logits = ref(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()
    jax_logits = np.asarray(forward(shipped, jnp.asarray(ids), cfg, moe="dense")[0])
    max_abs = float(np.max(np.abs(hf_logits - jax_logits)))
    rel = max_abs / float(np.max(np.abs(hf_logits)))
    parity = {"tokens": int(ids.size), "max_abs_diff": max_abs, "rel_diff": rel,
              "argmax_agreement": float(np.mean(hf_logits.argmax(-1) == jax_logits.argmax(-1)))}
    print(f"parity vs transformers on {ids.size} held-out tokens: max |diff| {max_abs:.2e} "
          f"(relative {rel:.2e}), argmax agreement {parity['argmax_agreement']:.4f}")
    if not rel < PARITY_RTOL:
        raise RuntimeError(f"logits parity failed: relative diff {rel:.2e} >= {PARITY_RTOL}")

    # 4. Tokenizer loads both ways and round-trips.
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(out))
    raw_tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    sample = "To be, or not to be, that is the question:\n"
    assert hf_tok.decode(hf_tok(sample)["input_ids"]) == sample
    assert raw_tok.decode(raw_tok.encode(sample).ids) == sample

    info = {"save_dtype": save_dtype, "parity": parity, "training": train_info}
    (out / "export_info.json").write_text(json.dumps(info, indent=2) + "\n")
    written = sorted(p.name for p in out.iterdir())
    assert set(written) <= set(EXPORT_FILES) | {"README.md", "report.json"}, written
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"exported {out} ({size / 2**20:.1f} MiB): {written}")
    return info
