"""Quantized routed experts (moejax/quant.py): round-trip error, packed layout, conversion of
two families, alpha 0 equal to the quantized resident model at every budget, budget
accounting in packed bytes, bad schemes and group sizes refused."""

import dataclasses
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moejax.quant import QMAX, Quant, dequantize, dequantize_np, quantize

H, I = 64, 32


def _experts(seed=0, E=3):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((E, 3, H, I)).astype(np.float32) * 0.05
    w[0, 0, 5, 7] = 0.9  # an outlier: its group's scale is large, other groups are unaffected
    w[1, 2] = 0.0  # an all-zero matrix: scale 1, weights exactly zero
    return w


def _groups(w, q):
    """absmax of each weight's group, broadcast to w [..., 3, H, I]."""
    gH, gI = q.groups
    gu = np.abs(w[..., :2, :, :]).reshape(*w.shape[:-3], 2, H // gH, gH, I).max(-2, keepdims=True)
    d = np.abs(w[..., 2, :, :]).reshape(*w.shape[:-3], H, I // gI, gI).max(-1, keepdims=True)
    gu = np.broadcast_to(gu, (*w.shape[:-3], 2, H // gH, gH, I)).reshape(*w.shape[:-3], 2, H, I)
    d = np.broadcast_to(d, (*w.shape[:-3], H, I // gI, gI)).reshape(*w.shape[:-3], 1, H, I)
    return np.concatenate([gu, d], axis=-3)


@pytest.mark.parametrize("q", [Quant("int8", 0, H, I), Quant("int4", 16, H, I), Quant("int4", 32, H, I),
                               Quant("int4", 64, H, I)])  # 64 > I: gI = I, a scale per down row
def test_round_trip_error_is_half_a_step_of_its_group(q):
    w = _experts()
    rows = quantize(w, q)
    assert rows.dtype == np.uint8 and rows.shape == (3, q.nbytes)
    back = dequantize_np(rows, q)
    step = _groups(w, q) / QMAX[q.scheme]
    # half a quantization step of the weight's own group (the bfloat16 scale may be 2^-8 smaller
    # than absmax / qmax, so the largest weight may clip by that much more)
    assert np.all(np.abs(back - w) <= step * (0.5 + 2**-7) + 1e-12)
    assert np.all(back[1, 2] == 0)
    assert back[0, 0, 5, 7] == pytest.approx(0.9, rel=2**-8)
    rel = np.linalg.norm(back - w) / np.linalg.norm(w)
    assert rel < (0.01 if q.scheme == "int8" else 0.15)


def test_bytes_per_expert():
    """int8: 1 byte a weight + bfloat16 scales per output channel; int4: half a byte + a scale a group."""
    assert Quant("int8", 0, H, I).nbytes == 3 * H * I + 2 * (2 * I + H)
    assert Quant("int4", 16, H, I).nbytes == 3 * H * I // 2 + 2 * (2 * (H // 16) * I + H * (I // 16))
    assert 3 * H * I * 2 / Quant("int8", 0, H, I).nbytes > 1.9


def test_packed_layout_one_contiguous_row_per_expert():
    """Each expert's row depends on that expert only (a fetch is one slice); the row is the
    weights then the bfloat16 scales; int4 puts row h in the low nibble and h + H/2 in the high."""
    w = _experts()
    for q in (Quant("int8", 0, H, I), Quant("int4", 16, H, I)):
        rows = quantize(w, q)
        for e in range(3):
            assert np.array_equal(rows[e], quantize(w[e], q))
        scales = rows[0, q.weight_bytes:].view(ml_dtypes.bfloat16).astype(np.float32)
        assert scales.shape == (q.num_scales,)
        # the first scale: gate, first group along H, output channel 0
        assert scales[0] == np.float32(ml_dtypes.bfloat16(np.abs(w[0, 0, :q.groups[0], 0]).max() / QMAX[q.scheme]))
        if q.scheme == "int8":
            assert np.array_equal(rows[0, :q.weight_bytes].view(np.int8).reshape(3, H, I)[0, :, 0],
                                  np.clip(np.rint(w[0, 0, :, 0] / scales[0]), -127, 127))
        else:
            b = rows[0, :q.weight_bytes].reshape(3, H // 2, I)
            lo, hi = (b & 0xF).astype(np.int8), (b >> 4).astype(np.int8)
            lo, hi = np.where(lo > 7, lo - 16, lo), np.where(hi > 7, hi - 16, hi)
            g = q.group
            assert np.array_equal(lo[0, :g, 0], np.rint(w[0, 0, :g, 0] / scales[0]))
            s_hi = scales[(H // 2 // g) * I]  # gate, the group starting at row H/2, channel 0
            assert np.array_equal(hi[0, :g, 0], np.rint(w[0, 0, H // 2:H // 2 + g, 0] / s_hi))


def test_device_dequantize_in_bfloat16_is_the_float32_one_rounded():
    q = Quant("int4", 16, H, I)
    row = jnp.asarray(quantize(_experts(1), q)[0])
    f32 = np.asarray(dequantize(row, q, jnp.float32))
    bf16 = np.asarray(dequantize(row, q, jnp.bfloat16))
    assert np.array_equal(bf16, f32.astype(ml_dtypes.bfloat16))


def test_bad_schemes_and_groups_are_refused():
    from moejax.quant import check
    from moejax.errors import UnsupportedConfig

    check("int8", 0, H, I)
    check("int4", 16, H, I)
    check("int4", 64, H, I)  # longer than I = 32: down has one group per row (below)
    for args in (("int3", 0), ("int8", 32), ("int4", 0), ("int4", 24), ("int4", -8), ("int4", 48)):
        with pytest.raises(UnsupportedConfig):
            check(args[0], args[1], H, I)


# ---- budget accounting ---------------------------------------------------------------------

def _bundled_cfg(scheme="none", group=0):
    from moejax.cli import bundled_model
    from moejax.config import MoEConfig

    return dataclasses.replace(MoEConfig.from_hf(bundled_model()), expert_quant=scheme, expert_group=group)


def test_budget_counts_packed_bytes():
    """The same budget in bytes holds about twice the experts in int8 and ~3.7x in int4."""
    from moejax.offload.budget import plan_budget

    bf16 = plan_budget(_bundled_cfg(), 2, 1, 256, ("pct", 0.25))
    assert bf16.pool_slots == 48 and bf16.expert_bytes == 3 * 192 * 64 * 2
    for (scheme, group), ratio in ((("int8", 0), 1.9), (("int4", 64), 3.5)):
        cfg = _bundled_cfg(scheme, group)
        plan = plan_budget(cfg, 2, 1, 256, ("bytes", bf16.budget_bytes))
        assert plan.expert_bytes == cfg.quant.nbytes
        assert plan.dense_bytes == bf16.dense_bytes and plan.kv_bytes == bf16.kv_bytes
        assert plan.pool_slots >= ratio * bf16.pool_slots and plan.budget_bytes <= bf16.budget_bytes
        assert scheme in plan.describe()
        # a share is a share of the experts, whatever they are stored as
        assert plan_budget(cfg, 2, 1, 256, ("pct", 0.25)).pool_slots == 48


# ---- tiny models of two families ---------------------------------------------------------

pytest.importorskip("torch")
pytest.importorskip("transformers")

FAMILIES = {"mixtral": {}, "qwen2_moe": dict(num_hidden_layers=3, mlp_only_layers=[1])}  # H 32; I 24, 16
SCHEMES = {"int8": {}, "int4": dict(group_size=8)}
NEW = 8


@pytest.fixture(scope="module")
def quantized(tiny_store, tmp_path_factory):
    """{(family, scheme): (path, quantized resident model, plain resident model)}; {family: HF dir}"""
    import moejax
    from moejax.convert import convert
    from tiny import hf_config

    root, out = tmp_path_factory.mktemp("quant"), {}
    for family, over in FAMILIES.items():
        hf_dir, plain_path, _ = tiny_store(f"quant-{family}", hf_config(family, **over), seed=3)
        plain = moejax.load(plain_path)
        out[family] = hf_dir
        for scheme, kw in SCHEMES.items():
            path = root / f"{family}-{scheme}"
            convert(hf_dir, path, experts=scheme, progress=False, **kw)
            out[family, scheme] = (path, moejax.load(path), plain)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_conversion_records_the_scheme_and_stays_close(quantized, family, scheme):
    from moejax import checkpoint

    path, model, plain = quantized[family, scheme]
    meta = json.loads((path / "moejax.json").read_text())
    assert meta["config"]["expert_quant"] == scheme
    assert meta["config"]["expert_group"] == (8 if scheme == "int4" else 0)
    cfg = model.config
    layer = checkpoint.load_item(path, checkpoint.layer_name(cfg.moe_layer_ids[0]))
    assert layer["experts"].dtype == np.uint8 and layer["experts"].shape == (cfg.num_experts, cfg.quant.nbytes)
    assert layer["router"].dtype == np.float32  # dense weights keep the dtype
    if cfg.shared_intermediate_size:
        assert layer["shared"].dtype == np.float32 and layer["shared"].shape[0] == 3
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    a, b = model.forward(tokens), plain.forward(tokens)
    agree = (a.argmax(-1) == b.argmax(-1)).mean()
    assert agree >= (0.9 if scheme == "int8" else 0.6)
    assert np.abs(a - b).max() < (0.1 if scheme == "int8" else 1.0) * np.abs(b).max()


EXACT = [("lru", "min"), ("smoe", "min"), ("lru", "25%"), ("smoe", "50%"), ("lru", "100%")]


# every budget on two (family, scheme) pairs, the tightest one on the other two
CASES = ([(f, s, p, b) for f, s in (("mixtral", "int8"), ("qwen2_moe", "int4")) for p, b in EXACT]
         + [(f, s, "smoe", "min") for f, s in (("mixtral", "int4"), ("qwen2_moe", "int8"))])


@pytest.mark.parametrize("family,scheme,policy,budget", CASES)
@pytest.mark.parametrize("kind", ["fused", "stepwise"])
def test_alpha0_equals_the_quantized_resident_model(quantized, family, scheme, kind, policy, budget):
    from moejax.engine import make_engine

    path, model, _ = quantized[family, scheme]
    cfg = model.config
    if budget == "min":
        spec = ("pct", cfg.top_k / (cfg.num_experts * len(cfg.moe_layer_ids)) + 1e-6)
    else:
        spec = ("pct", float(budget[:-1]) / 100)
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 7))
    ref = model.generate(prompt, NEW)
    e = make_engine(kind, path, policy, spec, cache_len=64, alpha=0.0)
    assert e.generate(prompt, NEW).tokens == ref.tokens
    t = e.telemetry
    assert e.store.expert_bytes == cfg.quant.nbytes == e.plan.expert_bytes
    assert t.bytes_h2d_decode == t.transfers * cfg.quant.nbytes
    assert 0 < t.peak_device_bytes <= e.plan.budget_bytes
    if budget == "min":
        assert t.transfers > 0
    if budget == "100%":
        assert t.transfers == 0


def test_bfloat16_dense_with_int4_experts_is_exact_offloaded(quantized, tmp_path):
    """--dtype bfloat16 --experts int4: dense weights in bfloat16, experts dequantized to it."""
    import moejax
    from moejax.convert import convert
    from moejax.engine import make_engine

    path = tmp_path / "bf16-int4"
    convert(quantized["mixtral"], path, dtype="bfloat16", experts="int4", group_size=8, progress=False)
    model = moejax.load(path)
    assert model.dtype == jnp.bfloat16
    prompt = np.random.default_rng(5).integers(0, model.config.vocab_size, (1, 7))
    ref = model.generate(prompt, NEW)
    for kind in ("fused", "stepwise"):
        e = make_engine(kind, path, "smoe", ("pct", 0.25), cache_len=64, alpha=0.0)
        assert e.generate(prompt, NEW).tokens == ref.tokens


def test_unknown_scheme_is_one_line_error(quantized, tmp_path):
    import shutil

    import moejax
    from moejax.errors import CheckpointError

    path = tmp_path / "future"
    shutil.copytree(quantized["mixtral", "int8"][0], path)
    meta = json.loads((path / "moejax.json").read_text())
    meta["config"]["expert_quant"] = "nf3"
    (path / "moejax.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="quantized as 'nf3'"):
        moejax.load(path)


@pytest.mark.parametrize("argv", [["--experts", "int3"], ["--experts", "int4", "--group-size", "48"],
                                  ["--experts", "int4", "--group-size", "0"],
                                  ["--experts", "int8", "--group-size", "32"], ["--group-size", "64"]])
def test_cli_refuses_bad_scheme_or_group_with_exit_2(argv, tmp_path):
    import shutil
    import subprocess
    import sys

    from moejax.cli import bundled_model

    exe = [shutil.which("moejax")] if shutil.which("moejax") else [sys.executable, "-m", "moejax.cli"]
    r = subprocess.run([*exe, "convert", str(bundled_model()), str(tmp_path / "out"), *argv],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
