"""The CPU kernels (moejax/kernels): built here, and held to the jnp formulation they replace.

float32 results agree with jnp to rounding (the summation order differs); bfloat16 results to
one bfloat16 step of the largest value. The resident-vs-offloaded exactness tests elsewhere hold
both paths to each other bit for bit; here: a bfloat16 pool held as uint16 bits gives the same
bits as the bfloat16 stack, experts computed group by group equal one call, results do not
depend on the number of threads, and the kernel is used (and can be turned off)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import kernels
from moejax.model import moe
from moejax.model.layers import _attend, attend, linear, swiglu

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler for the CPU kernels")

f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731


def tol(dt, ref):
    return 2e-5 * max(1.0, float(np.abs(f32(ref)).max())) if dt == jnp.float32 else \
        float(np.abs(f32(ref)).max()) / 64


def data(dt, N, H, I, S, k, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((N, H)), dt)
    stack = jnp.asarray(rng.standard_normal((S, 3, H, I)) / np.sqrt(H), dt)
    ids = jnp.asarray(np.stack([rng.permutation(S)[:k] for _ in range(N)]), jnp.int32)
    w = jnp.asarray(rng.random((N, k)), jnp.float32)
    return x, stack, ids, w


@pytest.mark.parametrize("dt", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("N,H,I", [(1, 48, 40), (3, 300, 24), (2, 40, 300)])  # H > 256: split into row parts
def test_experts_decode_matches_jnp(dt, N, H, I):
    x, stack, ids, w = data(dt, N, H, I, 9, 4)
    got = jax.jit(moe.experts_indexed)(x, stack, ids, w)
    ref = jax.jit(moe._indexed_jnp, static_argnums=4)(x, stack, ids, w, None)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_allclose(f32(got), f32(ref), atol=tol(dt, ref))
    if dt == jnp.bfloat16:  # the engines' pool holds bfloat16 experts as uint16 bits
        bits = jax.jit(moe.experts_indexed)(x, jax.lax.bitcast_convert_type(stack, jnp.uint16), ids, w)
        assert np.array_equal(f32(bits), f32(got))


@pytest.mark.parametrize("dt", [jnp.float32, jnp.bfloat16])
def test_terms_of_weight_zero_add_exactly_nothing(dt):
    """The decode kernel skips terms of weight 0 (the engine's prediction weighs its misses 0):
    its result is still the jnp sum that computes them, and a token whose weights are all 0
    gets 0. (A speed change: this holds the result, not whether the terms were computed.)"""
    x, stack, ids, w = data(dt, 3, 48, 40, 9, 4)
    w = w * jnp.asarray([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], jnp.float32)
    got = jax.jit(moe.experts_indexed)(x, stack, ids, w)
    ref = jax.jit(moe._indexed_jnp, static_argnums=4)(x, stack, ids, w, None)
    np.testing.assert_allclose(f32(got), f32(ref), atol=tol(dt, ref))
    assert not np.asarray(f32(got)[1]).any()
    # the skipped terms' rows do not matter
    other = jax.jit(moe.experts_indexed)(x, stack, jnp.where(w == 0, 8 - ids, ids), w)
    assert np.array_equal(f32(other), f32(got))


@pytest.mark.parametrize("dt", [jnp.float32, jnp.bfloat16])
def test_experts_ordered_matches_jnp_and_groups(dt):
    S, N, k = 10, 7, 3
    x, stack, _, _ = data(dt, N, 300, 40, S, k, seed=1)
    rng = np.random.default_rng(2)
    idx = jnp.asarray(np.stack([rng.permutation(S)[:k] for _ in range(N)]), jnp.int32)
    w = jnp.asarray(rng.random((N, k)), jnp.float32)
    rows = jnp.arange(S, dtype=jnp.int32)
    ok = jnp.ones(S, bool).at[4].set(False)
    acc = jnp.asarray(rng.standard_normal((N, 300)), dt)
    got = jax.jit(moe.experts_ordered)(x, stack, rows, rows, ok, idx, w, acc)
    ref = jax.jit(moe._ordered_jnp, static_argnums=8)(x, stack, rows, rows, ok, idx, w, acc, None)
    np.testing.assert_allclose(f32(got), f32(ref), atol=tol(dt, ref))
    first = jax.jit(moe.experts_ordered)(x, stack, rows[:6], rows[:6], ok[:6], idx, w, acc)
    both = jax.jit(moe.experts_ordered)(x, stack, rows[6:], rows[6:], ok[6:], idx, w, first)
    assert np.array_equal(f32(both), f32(got))  # the offloaded prefill's groups: bit for bit one call


@pytest.mark.parametrize("dt", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("N,H,O", [(1, 48, 70), (3, 300, 1100), (5, 7, 33), (1, 40, 2100)])  # 2 x N rows
def test_linear_matches_jnp(dt, N, H, O):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, N, H)), dt)  # leading dims are flattened
    w = jnp.asarray(rng.standard_normal((H, O)) / np.sqrt(H), dt)
    got = jax.jit(linear)(x, w)
    ref = x @ w
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_allclose(f32(got), f32(ref), atol=tol(dt, ref))
    tied = jax.jit(lambda x, e: linear(x, e, transposed=True))(x, w.T)  # a tied embedding [V, H]
    np.testing.assert_allclose(f32(tied), f32(ref), atol=tol(dt, ref))


@pytest.mark.parametrize("dt", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("B,Q,K,S,D,pos", [(1, 12, 4, 128, 64, 40), (2, 4, 2, 16, 8, 15), (1, 4, 4, 32, 16, 0),
                                           (3, 8, 2, 64, 32, 100), (1, 6, 3, 300, 24, 299), (2, 4, 2, 16, 8, 40)])
def test_decode_attention_matches_jnp(dt, B, Q, K, S, D, pos):
    """One query token over the cache (pos 0, the last slot, and past the end: all visible); cache
    slots after pos hold huge values that must not leak in. bfloat16 caches also as their bits."""
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.standard_normal((B, 1, Q, D)), dt)
    k, v = (rng.standard_normal((B, S, K, D)) for _ in range(2))
    k[:, pos + 1:], v[:, pos + 1:] = 1e4, -1e4
    k, v = jnp.asarray(k, dt), jnp.asarray(v, dt)
    p = jnp.asarray([pos], jnp.int32)
    assert "moejax_attend_decode" in jax.jit(attend).lower(q, k, v, p).compile().as_text()
    ref = jax.jit(_attend)(q, k, v, p)
    got = jax.jit(attend)(q, k, v, p)
    assert got.dtype == ref.dtype and got.shape == ref.shape == (B, 1, Q * D)
    np.testing.assert_allclose(f32(got), f32(ref), atol=tol(dt, ref))
    if dt == jnp.bfloat16:
        bits = [jax.lax.bitcast_convert_type(c, jnp.uint16) for c in (k, v)]
        assert np.array_equal(f32(jax.jit(attend)(q, *bits, p)), f32(got))


@pytest.mark.parametrize("dt", [jnp.float32, jnp.bfloat16])
def test_a_token_gets_the_same_bits_alone_or_among_others(dt):
    """Several tokens go through register tiles (4 tokens x 24 columns, 2 x 2 dot products), one
    token through the plain loops: the same sums in the same order, so every row of a 9-token
    call (tiles and remainders) equals the row computed alone, bit for bit: linear layers (both
    layouts) and routed experts (prefill's ordered call)."""
    rng = np.random.default_rng(7)
    N, H, O, I, S, k = 9, 70, 100, 36, 6, 3
    x = jnp.asarray(rng.standard_normal((N, H)), dt)
    w = jnp.asarray(rng.standard_normal((H, O)) / np.sqrt(H), dt)
    for f in (jax.jit(linear), jax.jit(lambda x, e: linear(x, e.T, transposed=True))):
        many = f32(f(x, w))
        assert all(np.array_equal(many[n], f32(f(x[n:n + 1], w))[0]) for n in range(N))
    _, stack, _, _ = data(dt, N, H, I, S, k, seed=8)
    idx = jnp.asarray(np.stack([rng.permutation(S)[:k] for _ in range(N)]), jnp.int32)
    wts = jnp.asarray(rng.random((N, k)), jnp.float32)
    rows, acc = jnp.arange(S, dtype=jnp.int32), jnp.asarray(rng.standard_normal((N, H)), dt)
    ordered = jax.jit(moe.experts_ordered)
    many = f32(ordered(x, stack, rows, rows, jnp.ones(S, bool), idx, wts, acc))
    for n in range(N):
        one = ordered(x[n:n + 1], stack, rows, rows, jnp.ones(S, bool), idx[n:n + 1], wts[n:n + 1], acc[n:n + 1])
        assert np.array_equal(many[n], f32(one)[0])


@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 16)])
@pytest.mark.parametrize("dt", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("N,H,I", [(1, 64, 48), (3, 320, 32), (2, 32, 288)])  # H > 256: row parts
def test_quantized_experts_match_jnp(scheme, group, dt, N, H, I):
    """int8 / int4 packed rows (moejax.quant) dequantized inside the kernel, decode and prefill,
    against the jnp path that dequantizes the block first; the kernel is in the program."""
    from moejax.quant import Quant, quantize

    q, S, k = Quant(scheme, group, H, I), 9, 4
    x, stack, ids, w = data(dt, N, H, I, S, k, seed=6)
    rows = jnp.asarray(quantize(np.asarray(stack, np.float32), q))  # [S, B] uint8
    decode = jax.jit(lambda *a: moe.experts_indexed(*a, quant=q))
    assert "moejax_experts_decode" in decode.lower(x, rows, ids, w).compile().as_text()
    ref = jax.jit(lambda *a: moe._indexed_jnp(*a, q))(x, rows, ids, w)
    np.testing.assert_allclose(f32(decode(x, rows, ids, w)), f32(ref), atol=tol(dt, ref))
    every, acc = jnp.arange(S, dtype=jnp.int32), jnp.zeros((N, H), dt)
    args = (x, rows, every, every, jnp.ones(S, bool), ids, w, acc)
    got = jax.jit(lambda *a: moe.experts_ordered(*a, quant=q))(*args)
    ref = jax.jit(lambda *a: moe._ordered_jnp(*a, q))(*args)
    np.testing.assert_allclose(f32(got), f32(ref), atol=tol(dt, ref))


def test_ffn_matches_swiglu():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((5, 40)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 40, 24)) / 7, jnp.float32)
    np.testing.assert_allclose(f32(jax.jit(moe.ffn)(x, w)), f32(swiglu(x, w)), atol=2e-5)


def test_kernel_is_used_and_thread_count_changes_nothing(tmp_path):
    """The compiled decode step calls the kernels; run on one thread (the parallel threshold
    above any call's size) the bits are the same as split over the pool's threads."""
    x, stack, ids, w = data(jnp.float32, 1, 600, 520, 6, 4, seed=5)
    hlo = jax.jit(moe.experts_indexed).lower(x, stack, ids, w).compile().as_text()
    assert "moejax_experts_decode" in hlo
    np.save(tmp_path / "here.npy", f32(jax.jit(moe.experts_indexed)(x, stack, ids, w)))
    code = ("import numpy as np, jax, jax.numpy as jnp, sys; sys.path.insert(0, %r); import test_kernels as t;"
            "from moejax.model import moe; x, s, i, w = t.data(jnp.float32, 1, 600, 520, 6, 4, seed=5);"
            "np.save(%r, np.asarray(jax.jit(moe.experts_indexed)(x, s, i, w)))") % (os.path.dirname(__file__),
                                                                                   str(tmp_path / "one.npy"))
    env = dict(os.environ, MOEJAX_KERNEL_PARALLEL_BYTES=str(1 << 50))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert np.array_equal(np.load(tmp_path / "here.npy"), np.load(tmp_path / "one.npy"))


def test_turned_off_uses_jnp():
    code = ("import jax, jax.numpy as jnp; from moejax import kernels; from moejax.model import moe;"
            "x = jnp.ones((1, 8)); s = jnp.ones((3, 3, 8, 4)); i = jnp.zeros((1, 2), jnp.int32); w = jnp.ones((1, 2));"
            "print(kernels.available(), 'moejax_experts' in jax.jit(moe.experts_indexed).lower(x, s, i, w).as_text())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env=dict(os.environ, MOEJAX_CPU_KERNEL="0")).stdout
    assert out.split() == ["False", "False"]


def test_gpu_lowering_keeps_the_jnp_path():
    """The kernels are CPU custom calls: a program lowered for CUDA computes experts, linear
    layers and attention as before (dynamic slices and dots), so the GPU path does not change."""
    x, stack, ids, w = data(jnp.float32, 1, 8, 4, 3, 2)
    kv, pos = jnp.ones((1, 5, 2, 4)), jnp.zeros(1, jnp.int32)  # attention: x as 2 heads of 4, one token
    f = lambda x, s, i, w: (moe.experts_indexed(x, s, i, w) + linear(x, jnp.ones((8, 8)))  # noqa: E731
                            + attend(x.reshape(1, 1, 2, 4), kv, kv, pos).reshape(1, 8))
    text = {p: jax.jit(f).trace(x, stack, ids, w).lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda")}
    assert all(f"moejax_{k}" in text["cpu"] for k in ("experts_decode", "linear", "attend_decode"))
    assert "moejax_" not in text["cuda"] and "dynamic_slice" in text["cuda"]


def test_huge_pages_keep_the_weights():
    """madvise(MADV_COLLAPSE) on a weight's buffer: whole 2 MiB pages inside it at most, the
    values unchanged, tiny arrays left alone."""
    a = jnp.asarray(np.random.default_rng(9).standard_normal(3 << 20), jnp.float32)  # 12 MiB
    before = np.array(a)
    done = kernels.huge_pages([a, jnp.ones(8)])
    assert done % (2 << 20) == 0 and done <= a.nbytes
    assert np.array_equal(np.asarray(a), before)
    assert kernels.huge_pages([jnp.ones(8)]) == 0
