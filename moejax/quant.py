"""Weight-only quantization of routed experts (int8, int4), one packed byte row per expert.

An expert [3, H, I] holds gate and up (x @ w: contract over H) and down (stored [H, I], used
as down @ h: contracts over I). Quantized, it is ONE uint8 row [B], so the host store, the
transfer and the device pool keep one contiguous block per expert (a fetch stays one
dynamic slice) and hold the packed bytes:

    row = weights | scales
    weights  int8:  [3, H, I] int8
             int4:  [3, H/2, I] bytes, two nibbles each: row h in the low nibble, row h + H/2
                    in the high one (two's complement, -7..7)
    scales   bfloat16 bits: gate and up [2, H/gH, I], then down [H, I/gI]

Scales are symmetric (absmax / qmax) over groups of consecutive weights along each matrix's
contraction axis: int8 has one group spanning the axis (a scale per output channel: gH = H,
gI = I); int4 groups of `group` weights along each axis the group divides, and one group
spanning an axis shorter than the group (fine-grained experts: SmolLM2's MoE has I = 44, so
group 64 gives gH = 64, gI = 44); any other axis is refused.
Weights are rounded against the scale as stored (bfloat16), so its rounding adds no error.
`dequantize` runs on the device inside the expert computation (`model.moe.block`):
w = q * scale, rounded once to the compute dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

from moejax.errors import UnsupportedConfig

SCHEMES = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}
DEFAULT_GROUP = 64  # int4; docs/accuracy.md measures 32 and 64 on the bundled model


class Quant(NamedTuple):
    """A quantized expert layout (static: hashable, a jit closure or static argument)."""

    scheme: str  # "int8" | "int4"
    group: int  # int4: weights per scale along the contraction axis; int8: 0 (per output channel)
    hidden: int  # H
    inter: int  # I

    @property
    def groups(self) -> tuple[int, int]:
        """(gH, gI): group sizes of gate/up (along H) and of down (along I)."""
        if self.scheme == "int8":
            return self.hidden, self.inter
        return min(self.group, self.hidden), min(self.group, self.inter)

    @property
    def weight_bytes(self) -> int:
        n = 3 * self.hidden * self.inter
        return n if self.scheme == "int8" else n // 2

    @property
    def num_scales(self) -> int:
        gH, gI = self.groups
        return 2 * (self.hidden // gH) * self.inter + self.hidden * (self.inter // gI)

    @property
    def nbytes(self) -> int:
        """One expert's packed row: what the store holds, a transfer moves and a slot takes."""
        return self.weight_bytes + 2 * self.num_scales

    def describe(self) -> str:
        return "int8 (per output channel)" if self.scheme == "int8" else f"int4 (group {self.group})"


def check(scheme: str, group: int, hidden: int, inter: int) -> None:
    """UnsupportedConfig (one line) unless scheme and group fit experts [3, hidden, inter]."""
    if scheme not in SCHEMES:
        raise UnsupportedConfig(f"routed experts quantized as {scheme!r}: not a scheme moejax knows "
                                f"({', '.join(SCHEMES)})")
    if scheme == "int8" and group:
        raise UnsupportedConfig("int8 experts have a scale per output channel: no group size")
    if scheme == "int4":
        if group < 1 or any(d % group and d > group for d in (hidden, inter)):
            raise UnsupportedConfig(f"int4 group size {group} must be positive and divide each contraction dim of "
                                    f"the experts longer than it: hidden {hidden} (gate, up), intermediate {inter} "
                                    f"(down)")
        if hidden % 2:
            raise UnsupportedConfig(f"int4 packs pairs of rows: hidden size {hidden} must be even")


def _scales(absmax: np.ndarray, qmax: int) -> np.ndarray:
    """float32 scales, rounded to bfloat16 as stored (1 where a group is all zeros)."""
    s = (absmax / qmax).astype(ml_dtypes.bfloat16).astype(np.float32)
    return np.where(s > 0, s, np.float32(1))


def quantize(w: np.ndarray, q: Quant) -> np.ndarray:
    """Experts [..., 3, H, I] (any float dtype) -> packed rows uint8 [..., B] (numpy)."""
    H, I, (gH, gI), qmax = q.hidden, q.inter, q.groups, QMAX[q.scheme]
    w = np.asarray(w, np.float32)
    lead = w.shape[:-3]
    gu = w[..., :2, :, :].reshape(*lead, 2, H // gH, gH, I)  # groups along H
    d = w[..., 2, :, :].reshape(*lead, H, I // gI, gI)  # groups along I
    s_gu = _scales(np.abs(gu).max(axis=-2), qmax)  # [..., 2, H/gH, I]
    s_d = _scales(np.abs(d).max(axis=-1), qmax)  # [..., H, I/gI]
    q_gu = np.clip(np.rint(gu / s_gu[..., :, None, :]), -qmax, qmax).reshape(*lead, 2, H, I)
    q_d = np.clip(np.rint(d / s_d[..., None]), -qmax, qmax).reshape(*lead, 1, H, I)
    qw = np.concatenate([q_gu, q_d], axis=-3).astype(np.int8)  # [..., 3, H, I]
    if q.scheme == "int4":
        qw = (qw[..., :H // 2, :] & 0x0F) | (qw[..., H // 2:, :] << 4)  # [..., 3, H/2, I]
    scales = np.concatenate([s_gu.reshape(*lead, -1), s_d.reshape(*lead, -1)], axis=-1).astype(ml_dtypes.bfloat16)
    rows = [qw.view(np.uint8).reshape(*lead, -1), scales.view(np.uint8).reshape(*lead, -1)]
    return np.ascontiguousarray(np.concatenate(rows, axis=-1))


def dequantize(row, q: Quant, dtype):
    """One packed row uint8 [B] (a jax array, on the device) -> the expert [3, H, I] in dtype."""
    import jax.numpy as jnp
    from jax import lax

    H, I, (gH, gI) = q.hidden, q.inter, q.groups
    b = lax.bitcast_convert_type(row[:q.weight_bytes], jnp.int8)
    if q.scheme == "int8":
        w = b.reshape(3, H, I)
    else:
        b = b.reshape(3, H // 2, I)
        w = jnp.concatenate([(b << 4) >> 4, b >> 4], axis=1)  # sign-extended low, high nibbles
    s = lax.bitcast_convert_type(row[q.weight_bytes:].reshape(-1, 2), jnp.bfloat16).astype(jnp.float32)
    n = 2 * (H // gH) * I
    gu = w[:2].reshape(2, H // gH, gH, I) * s[:n].reshape(2, H // gH, 1, I)
    d = w[2].reshape(H, I // gI, gI) * s[n:].reshape(H, I // gI, 1)
    return jnp.concatenate([gu.reshape(2, H, I), d.reshape(1, H, I)]).astype(dtype)


def dequantize_np(rows: np.ndarray, q: Quant, dtype=np.float32) -> np.ndarray:
    """Packed rows uint8 [..., B] -> experts [..., 3, H, I] (host; calibration and tests)."""
    import jax

    rows = np.asarray(rows)
    f = jax.vmap(lambda r: dequantize(r, q, np.dtype(dtype)))
    return np.asarray(f(rows.reshape(-1, rows.shape[-1]))).reshape(*rows.shape[:-1], 3, q.hidden, q.inter)
