"""Precomputed per-layer expert similarity (our addition; the paper has none).

Two measures, each an [E, E] matrix per MoE layer with values in [-1, 1]:
  * "output": cosine similarity of two experts' outputs on the same inputs, averaged over
    calibration tokens that the router actually sends to this layer (the MLP inputs of a
    calibration text) -- what substitution cares about: does expert c compute what e would;
  * "weights": cosine similarity of the flattened [3, H, I] weights -- cheap, no data.
Stored as `similarity.npz` beside the checkpoint, with a fingerprint of the model so a file
made for another model is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError

FILE = "similarity.npz"


def fingerprint(cfg) -> str:
    return hashlib.sha256(cfg.to_json().encode()).hexdigest()[:16]


def weight_similarity(experts: np.ndarray) -> np.ndarray:
    """experts [E, 3, H, I] -> [E, E] cosine similarity of the flattened weights."""
    flat = experts.reshape(experts.shape[0], -1).astype(np.float32)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True) + 1e-12
    return flat @ flat.T


def output_similarity(experts: np.ndarray, h: np.ndarray) -> np.ndarray:
    """experts [E, 3, H, I], h [N, H] MLP inputs -> [E, E] mean over tokens of the cosine
    similarity between expert outputs."""
    import jax
    import jax.numpy as jnp

    w = jnp.asarray(experts, jnp.float32)
    x = jnp.asarray(h, jnp.float32)
    g = jnp.einsum("nh,ehi->nei", x, w[:, 0])
    u = jnp.einsum("nh,ehi->nei", x, w[:, 1])
    y = jnp.einsum("nei,ehi->neh", jax.nn.silu(g) * u, w[:, 2])  # [N, E, H]
    y = y / (jnp.linalg.norm(y, axis=-1, keepdims=True) + 1e-12)
    return np.asarray(jnp.einsum("neh,nfh->ef", y, y) / x.shape[0])


def mlp_inputs(model, tokens: np.ndarray) -> dict[int, np.ndarray]:
    """The resident model's MLP inputs h [N, H] at every MoE layer for tokens [1, T]."""
    import jax.numpy as jnp

    from moejax.model.decoder import empty_cache

    m = model.module
    T = tokens.shape[1]
    x = m.embed_tokens(jnp.asarray(tokens))
    cos, sin = m.rope(0, T, 1)
    kv = empty_cache(model.config, 1, T, model.dtype)
    out = {}
    for i, layer in enumerate(m.layers):
        if layer.is_moe:
            a, _ = layer.attention(x, kv[i], 0, cos, sin)
            out[i] = np.asarray(layer.mlp_input((x + a).reshape(T, -1)))
        x, _ = layer(x, kv[i], 0, cos, sin)
    return out


def calibrate(model, tokens: np.ndarray | None, method: str = "output") -> dict[int, np.ndarray]:
    layers = {}
    h = mlp_inputs(model, tokens) if method == "output" else {}
    for i, layer in enumerate(model.module.layers):
        if layer.is_moe:
            experts = np.asarray(layer.experts[...])
            if model.config.quant is not None:  # packed rows [E, B] -> [E, 3, H, I]
                from moejax.quant import dequantize_np

                experts = dequantize_np(experts, model.config.quant)
            layers[i] = output_similarity(experts, h[i]) if method == "output" else weight_similarity(experts)
    return layers


def save(path: Path, cfg, layers: dict[int, np.ndarray], method: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, fingerprint=fingerprint(cfg), method=method,
             **{f"layer_{i}": s.astype(np.float32) for i, s in layers.items()})
    tmp.replace(path)


def load(path: Path, cfg) -> dict[int, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise MoejaxError(f"no similarity file at {path}; run `moejax calibrate` first")
    try:
        data = np.load(path)
        fp = str(data["fingerprint"])
        layers = {int(k.split("_")[1]): data[k] for k in data.files if k.startswith("layer_")}
    except (OSError, ValueError, KeyError) as e:
        raise MoejaxError(f"{path} is not a moejax similarity file ({e})") from None
    if fp != fingerprint(cfg) or set(layers) != set(cfg.moe_layer_ids):
        raise MoejaxError(f"{path} was calibrated for another model")
    return layers
