"""The MoE decoder as Flax NNX modules.

One decoder serves every family; family quirks are `MoEConfig` flags (attention kind: GQA or
DeepSeek's latent attention; qkv bias, q/k norm kind, shared expert, dense layers, router
kind). With all experts resident this is the reference model that every offloaded path is
tested against. A layer exposes its stages separately (`attention`, `mlp_input`, `route`,
`dense_output`) so the offloaded engine can stop between the router and the experts to plan
transfers on the host.

KV cache: per layer a pair of [B, S, heads, dim] arrays, S static: keys and values, or for
multi-head latent attention the latent and the rope key (`MoEConfig.kv_cache_shapes`);
`pos` is the absolute position of the first new token. All batch rows share positions (no
ragged batches).
"""

from __future__ import annotations

from functools import cache

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from moejax.config import MoEConfig
from moejax.model import layers as L
from moejax.model import moe
from moejax.model.params import OPTIONAL, global_shapes, layer_shapes


def _param(value):
    return nnx.Param(jnp.asarray(value))


class DecoderLayer(nnx.Module):
    """One decoder layer. With offloaded=True its routed experts are not held here (they
    live in the engine's host store and device pool), only everything else. The layer index
    is deliberately not stored, so all layers of one kind share one compiled program."""

    def __init__(self, cfg: MoEConfig, index: int, p: dict, offloaded: bool = False):
        self.cfg = cfg
        self.is_moe = cfg.moe_layers[index]
        names = set(layer_shapes(cfg, index))
        if offloaded and self.is_moe:
            names.discard("experts")
        if set(p) != names:
            raise ValueError(f"layer {index}: expected params {sorted(names)}, got {sorted(p)}")
        for name, value in p.items():
            setattr(self, name, _param(value))
        for name in OPTIONAL:
            if name not in p:
                setattr(self, name, None)

    # ---- attention ----------------------------------------------------------------------
    def attention(self, x, kv, pos, cos, sin):
        """x [B, T, H] (pre-norm residual stream) -> attention output [B, T, H], new kv."""
        h = L.rms_norm(x, self.attn_norm[...], self.cfg.rms_norm_eps)
        if self.cfg.attention == "mla":
            return self._latent_attention(h, kv, pos, cos, sin)
        return self._gqa_attention(h, kv, pos, cos, sin)

    def _gqa_attention(self, h, kv, pos, cos, sin):
        cfg = self.cfg
        B, T, _ = h.shape
        q, k, v = L.linear(h, self.wq[...]), L.linear(h, self.wk[...]), L.linear(h, self.wv[...])  # [B, T, Q*D], [B, T, K*D] x2
        if cfg.qkv_bias:
            q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
        if cfg.qk_norm == "proj":
            q = L.rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = L.rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
        k = k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q = L.rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = L.rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
        k_cache, v_cache = kv
        k_cache = _write(k_cache, k, pos)
        v_cache = _write(v_cache, v, pos)
        out = L.linear(L.attend(q, k_cache, v_cache, pos + jnp.arange(T)), self.wo[...])  # [B, T, H]
        if cfg.o_bias:
            out = out + self.bo[...]
        return out, (k_cache, v_cache)

    def _latent_attention(self, h, kv, pos, cos, sin):
        """DeepSeek-V2/V3 multi-head latent attention. The cache holds the normalised latent
        [B, S, 1, R] and the rotated rope key [B, S, 1, Dr] (Dr = head_dim)."""
        cfg = self.cfg
        B, T, _ = h.shape
        Dn, R = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank:
            h_q = L.rms_norm(L.linear(h, self.wq_a[...]), self.q_a_norm[...], cfg.rms_norm_eps)  # [B, T, q_lora_rank]
        else:
            h_q = h
        q = L.linear(h_q, self.wq[...]).reshape(B, T, cfg.num_heads, Dn + cfg.head_dim)
        q_nope, q_rope = q[..., :Dn], L.apply_rope(q[..., Dn:], cos, sin)
        ckv = L.linear(h, self.wkv_a[...])  # [B, T, R + Dr]
        latent = L.rms_norm(ckv[..., :R], self.kv_a_norm[...], cfg.rms_norm_eps)
        k_rope = L.apply_rope(ckv[:, :, None, R:], cos, sin)  # [B, T, 1, Dr]
        c_cache, r_cache = kv
        c_cache = _write(c_cache, latent[:, :, None, :], pos)
        r_cache = _write(r_cache, k_rope, pos)
        w_kv = self.wkv_b[...].reshape(R, cfg.num_heads, Dn + cfg.v_head_dim)
        out = L.attend_latent(q_nope, q_rope, L.kv_view(c_cache)[:, :, 0], L.kv_view(r_cache)[:, :, 0], w_kv, pos + jnp.arange(T),
                              cfg.softmax_scale)
        return L.linear(out, self.wo[...]), (c_cache, r_cache)

    # ---- MLP stages ---------------------------------------------------------------------
    def mlp_input(self, x):
        """Residual stream [N, H] -> normalised MLP input [N, H]."""
        return L.rms_norm(x, self.mlp_norm[...], self.cfg.rms_norm_eps)

    def route(self, h):
        """h [N, H] -> (router scores over all experts [N, E], top-k weights [N, k] float32,
        top-k expert ids [N, k])."""
        bias = None if self.router_bias is None else self.router_bias[...]
        return moe.route(self.cfg, h, self.router[...], bias)

    def dense_output(self, h):
        """Everything in the MLP block that is not a routed expert: the dense MLP of a
        non-MoE layer, or the (gated) shared expert of a MoE layer; zeros if neither."""
        if not self.is_moe:
            return moe.ffn(h, self.mlp[...])
        if self.shared is None:
            return jnp.zeros_like(h)
        out = moe.ffn(h, self.shared[...])
        if self.shared_gate is not None:
            out = out * nnx.sigmoid(h @ self.shared_gate[...])  # [N, 1] gate
        return out

    def __call__(self, x, kv, pos, cos, sin):
        """Resident layer: x [B, T, H] -> x [B, T, H], new kv."""
        B, T, H = x.shape
        a, kv = self.attention(x, kv, pos, cos, sin)
        x = x + a
        flat = x.reshape(B * T, H)
        h = self.mlp_input(flat)
        out = self.dense_output(h)
        if self.is_moe:
            _, weights, idx = self.route(h)
            out = out + moe.experts_resident(h, self.experts[...], idx, weights, decode=T == 1, quant=self.cfg.quant)
        return x + out.reshape(B, T, H), kv


def rope(cfg: MoEConfig, pos, T: int, B: int, dtype):
    """cos, sin [B, T, head_dim] for positions pos .. pos + T - 1."""
    positions = jnp.broadcast_to(pos + jnp.arange(T), (B, T))
    return L.rope_cos_sin(positions, *L.rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_yarn), dtype)


def kv_storage(dtype):
    """The KV cache's element type: bfloat16 is stored as its uint16 bits, because XLA:CPU
    turns a bfloat16 dynamic_update_slice into a convert of the WHOLE cache to float32 and
    back, every layer and step (bundled model, 2,048 positions: 8.42 ms per resident decode
    step in bfloat16 against 5.59 ms in float32; docs/benchmarks.md). As the expert pool."""
    return jnp.uint16 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def _write(cache, new, pos):
    """Write new [B, T, K, D] (any float dtype: rounded to the cache's) into cache
    [B, S, K, D] at sequence position pos."""
    new = new.astype(L.kv_dtype(cache))
    if cache.dtype == jnp.uint16:
        new = lax.bitcast_convert_type(new, jnp.uint16)
    zero = jnp.zeros((), jnp.int32)
    return lax.dynamic_update_slice(cache, new, (zero, jnp.asarray(pos, jnp.int32), zero, zero))


class Decoder(nnx.Module):
    def __init__(self, cfg: MoEConfig, glob: dict, layer_params: list[dict], offloaded: bool = False):
        self.cfg = cfg
        if set(glob) != set(global_shapes(cfg)):
            raise ValueError(f"expected global params {sorted(global_shapes(cfg))}, got {sorted(glob)}")
        self.embed = _param(glob["embed"])
        self.final_norm = _param(glob["final_norm"])
        self.lm_head = _param(glob["lm_head"]) if "lm_head" in glob else None
        self.layers = nnx.List(DecoderLayer(cfg, i, p, offloaded) for i, p in enumerate(layer_params))

    @property
    def dtype(self):
        return self.embed[...].dtype

    def embed_tokens(self, tokens):
        return self.embed[...][tokens]  # [B, T, H]

    def rope(self, pos, T: int, B: int):
        return rope(self.cfg, pos, T, B, self.dtype)

    def logits(self, x):
        """Final norm + LM head: x [..., H] -> float32 logits [..., V]."""
        h = L.rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
        return L.lm_head(h, self.embed[...], None if self.lm_head is None else self.lm_head[...])

    def __call__(self, tokens, cache, pos):
        """tokens [B, T] int32, cache: tuple of (k, v) per layer, pos scalar -> logits [B, T, V], cache."""
        x, cache = self.hidden(tokens, cache, pos)
        return self.logits(x), cache

    def hidden(self, tokens, cache, pos):
        """__call__ without the final norm and LM head: -> residual stream [B, T, H], cache."""
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        cos, sin = self.rope(pos, T, B)
        new_cache = []
        for layer, kv in zip(self.layers, cache):
            x, kv = layer(x, kv, pos, cos, sin)
            new_cache.append(kv)
        return x, tuple(new_cache)


def empty_cache(cfg: MoEConfig, batch: int, length: int, dtype):
    """Zeros, committed to the device like every jit output, so that a fresh cache and one
    returned by a step hit the same compiled program. One dispatch: a device_put per buffer
    cost 5-8 ms on the bundled model's 12 buffers, a third of its time to first token."""
    shapes = tuple((batch, length, *s) for s in cfg.kv_cache_shapes)
    return _zeros_cache(jax.devices()[0])(shapes, cfg.num_layers, jnp.dtype(kv_storage(dtype)))


@cache
def _zeros_cache(device):
    def zeros(shapes, layers: int, dtype):
        return tuple(tuple(jnp.zeros(s, dtype) for s in shapes) for _ in range(layers))

    return jax.jit(zeros, static_argnums=(0, 1, 2), out_shardings=jax.sharding.SingleDeviceSharding(device))


def cache_bytes(cfg: MoEConfig, batch: int, length: int, itemsize: int) -> int:
    per_position = sum(heads * dim for heads, dim in cfg.kv_cache_shapes)
    return cfg.num_layers * batch * length * per_position * itemsize
