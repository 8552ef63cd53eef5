"""The skip baseline (`--substitute skip`): missed low-score experts are dropped and the kept
experts reweighed, one definition (moejax.offload.importance.skip) for every driver."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.offload import decisions as D
from moejax.offload.importance import skip_weights, substitute
from moejax.offload.policies import make_policy

# three tokens, 8 experts, k = 3, alpha 0.5 (top-score: p >= 1.5 S)
P = np.array([
    [0.30, 0.21, 0.20, 0.15, 0.09, 0.03, 0.01, 0.01],  # 0, 1, 2; S = 0.15: 0 top (>= 0.225), 1 and 2 low
    [0.05, 0.35, 0.05, 0.05, 0.25, 0.10, 0.06, 0.09],  # 1, 4, 5; S = 0.09: 1, 4 top (>= 0.135), 5 low
    [0.09, 0.10, 0.11, 0.16, 0.12, 0.13, 0.15, 0.14],  # 3, 6, 7; S = 0.13: all low (< 0.195)
], np.float32)
IDX = np.array([[0, 1, 2], [1, 4, 5], [3, 6, 7]], np.int32)
# With nothing on the device the batch's top-score experts {0, 1, 4} are computed anyway:
#   token 0: 1 is low-score but token 1's top-score expert: kept; 2 dropped
#   token 1: 5 dropped
#   token 2: everything would be dropped: its most probable expert, 3, is kept (fetched); 6, 7 dropped
# A dropped entry names the token's most probable kept expert (0, 1, 3), weighed 0.
EXPERTS = [[0, 1, 0], [1, 4, 1], [3, 3, 3]]
DROPPED = [[False, False, True], [False, False, True], [False, True, True]]


def test_hand_built_dropped_set():
    out, dropped = substitute(P, IDX, 0.5, available=set(), mode="skip")
    assert np.asarray(out).tolist() == EXPERTS and np.asarray(dropped).tolist() == DROPPED
    # on the device, a low-score expert is kept: 2 and 6 stay; 5, 3 and 7 go (token 2 keeps 6,
    # so its most probable expert 3 is no longer kept for it)
    out, dropped = substitute(P, IDX, 0.5, available={2, 6}, mode="skip")
    assert np.asarray(out).tolist() == [[0, 1, 2], [1, 4, 1], [6, 6, 6]]
    assert np.asarray(dropped).tolist() == [[False] * 3, [False, False, True], [True, False, True]]
    # alpha 0: nothing is low-score, nothing is dropped
    out, dropped = substitute(P, IDX, 0.0, available=set(), mode="skip")
    assert np.array_equal(out, IDX) and not np.asarray(dropped).any()


@pytest.mark.parametrize("norm", [True, False])
def test_hand_built_weights(norm):
    """Kept experts carry the selected experts' total weight: with norm_topk_prob that is the
    family's own renormalisation over the kept experts."""
    p_sel = np.take_along_axis(P, IDX, axis=1).astype(np.float64)
    scale = 2.5
    w = (p_sel / p_sel.sum(1, keepdims=True) if norm else p_sel) * scale
    got = np.asarray(skip_weights(jnp.asarray(w, jnp.float32), jnp.asarray(DROPPED)))
    if norm:  # token 0: 0.30 and 0.21 over 0.51; token 1: 0.35 and 0.25 over 0.60; token 2: 3 alone
        want = scale * np.array([[0.30 / 0.51, 0.21 / 0.51, 0], [0.35 / 0.60, 0.25 / 0.60, 0], [1, 0, 0]])
    else:  # the selected mass (0.71, 0.70, 0.45) spread over the kept ones in proportion
        want = scale * np.array([[0.30 * 0.71 / 0.51, 0.21 * 0.71 / 0.51, 0], [0.35 * 0.70 / 0.60, 0.25 * 0.70 / 0.60, 0],
                                 [0.45, 0, 0]])
    assert np.allclose(got, want, rtol=1e-5)
    # a row where nothing was dropped keeps the router's weights bit for bit
    kept = np.asarray(skip_weights(jnp.asarray(w, jnp.float32), jnp.zeros((3, 3), bool)))
    assert np.array_equal(kept, np.asarray(w, np.float32))


def test_dropped_experts_are_not_fetched_and_counted_as_skipped():
    pol = make_policy("score-sub", 0.5, "skip")
    lay = D.Layout(1, 8, 6)
    s = D.init_state(lay)
    s, experts, dropped = D.substitute_layer(s, pol, 0, jnp.asarray(P), jnp.asarray(IDX))
    assert np.asarray(experts).tolist() == EXPERTS
    s, f, _ = D.plan_decode(s, lay, pol, 0, experts)
    n = int(f.count)
    assert np.asarray(f.experts)[:n].tolist() == [0, 1, 4, 3]  # never 2, 5, 6 or 7
    c = {k: int(v) for k, v in s["counters"].items()}
    assert (c["skipped"], c["substituted"], c["routed"], c["unique"], c["fetched"]) == (4, 0, 9, 4, 4)
    # the same inputs in window mode substitute (or keep and fetch) instead: nothing is skipped
    s2, _, _ = D.substitute_layer(D.init_state(lay), make_policy("score-sub", 0.5), 0, jnp.asarray(P),
                                  jnp.asarray(IDX))
    assert int(s2["counters"]["skipped"]) == 0


def test_reweigh_in_skip_mode():
    w = jnp.asarray([[0.5, 0.3, 0.2]], jnp.float32)
    got = D.reweigh(None, None, None, jnp.asarray([[False, True, False]]), w, mode="skip")
    assert np.allclose(np.asarray(got), [[0.5 / 0.7, 0, 0.2 / 0.7]])


# ---- the three drivers on a tiny model ----------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_store):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import moejax
    from tiny import hf_config

    _, path, _ = tiny_store("trace-qwen3", hf_config("qwen3_moe", num_hidden_layers=3), seed=11)
    return path, moejax.load(path)


def test_skip_same_counts_in_stepwise_fused_and_replay(model, tmp_path):
    from moejax.engine import OffloadEngine, make_engine
    from moejax.eval.trace import Trace, TraceRecorder, replay

    path, m = model
    prompt = np.random.default_rng(2).integers(0, m.config.vocab_size, (1, 9))
    e = OffloadEngine(path, "score-sub", ("pct", 0.25), cache_len=64, alpha=0.5, substitute="skip")
    e.recorder = TraceRecorder()
    g = e.generate(prompt, 16)
    e.recorder.save(tmp_path / "t.npz", m.config, 1)
    t = e.telemetry
    assert t.skipped > 0 and t.substituted == 0 and t.skip_rate == t.skipped / t.routed
    r = replay(Trace(tmp_path / "t.npz", m.config), "score-sub", e.plan.pool_slots, alpha=0.5, mode="skip")
    assert (r["hit_rate"], r["transfers"], r["skip_rate"], r["substitution_rate"]) == (
        t.hit_rate, t.transfers, t.skip_rate, 0.0)
    from moejax.cli import main  # the same through `moejax replay`

    assert main(["replay", str(tmp_path / "t.npz"), "--policy", "score-sub", "--alpha", "0.5", "--substitute", "skip",
                 "--cache", str(e.plan.pool_slots), "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert rows[0]["skip_rate"] == t.skip_rate and rows[0]["transfers"] == t.transfers
    f = make_engine("fused", path, "score-sub", ("pct", 0.25), cache_len=64, alpha=0.5, substitute="skip")
    assert f.generate(prompt, 16).tokens == g.tokens
    assert (f.telemetry.hit_rate, f.telemetry.transfers, f.telemetry.skipped) == (t.hit_rate, t.transfers, t.skipped)
    # skipping moves fewer experts than the same policy without substitution
    plain = OffloadEngine(path, "score", ("pct", 0.25), cache_len=64)
    plain.generate(prompt, 16)
    assert t.transfers < plain.telemetry.transfers


@pytest.mark.parametrize("kind", ["fused", "stepwise"])
def test_skip_alpha_zero_is_exact(model, kind):
    from moejax.engine import make_engine

    path, m = model
    prompt = np.random.default_rng(3).integers(0, m.config.vocab_size, (1, 7))
    e = make_engine(kind, path, "smoe", ("pct", 0.25), cache_len=64, alpha=0.0, substitute="skip")
    assert e.generate(prompt, 10).tokens == m.generate(prompt, 10).tokens
    assert e.telemetry.skipped == 0 and e.telemetry.decode_unique > e.telemetry.decode_hits
