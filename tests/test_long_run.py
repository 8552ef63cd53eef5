"""Nothing an offloaded engine holds grows with the number of decode steps (the short version of
scripts/long_run.py, whose 2,000-token run on the bundled model is in docs/benchmarks.md)."""

import sys
from pathlib import Path

import pytest
from tiny import make_tiny_hf

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import long_run  # noqa: E402

# Records kept per step by design, and how many entries each step adds (per MoE layer or per step).
# The stepwise engine's Telemetry.sched_us: host planning time of every MoE layer of every step.
PER_STEP = {"stepwise": {"telemetry.sched_us": "moe_layers"}, "fused": {}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("long") / "tiny")


@pytest.mark.parametrize("engine", ["fused", "stepwise"])
def test_nothing_grows_with_the_step_count(tiny_dir, engine):
    shots, info = long_run.run(tiny_dir, "smoe", "25%", 60, 20, engine, alpha=0.3)
    assert [s["tokens"] for s in shots] == [20, 40, 60] and info["tokens"] == 60
    assert info["substitution_rate"] > 0 or info["hit_rate"] < 1  # the pool really was too small
    a, b = shots[0], shots[-1]
    # jax arrays: the same number and the same bytes, device and host memory alike
    assert b["live"] == a["live"], long_run.growth(a, b)
    assert b["engine_device_bytes"] == a["engine_device_bytes"]
    assert b["compiled_programs"] == a["compiled_programs"]  # nothing compiles after warm-up
    # the engine's Python containers: bounded, except the per-step records named in PER_STEP
    moe_layers = 2
    for name, n in b["containers"].items():
        if name in PER_STEP[engine]:
            assert n - a["containers"][name] == (b["tokens"] - a["tokens"]) * moe_layers, name
        else:
            assert n == a["containers"].get(name), (name, a["containers"].get(name), n)
    # after the run the Telemetry holds one step time per decode step (the Generation's timing)
    assert info["after_run"]["telemetry.step_s"] == 59


def test_generated_tokens_hold_no_device_buffer():
    """The generation loop copies each token to the host: on CPU np.asarray would be a view that
    keeps the step's device buffer alive as long as the output list holds it."""
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np

    from moejax.generate import generation_loop

    plus = jax.jit(lambda t: t + 1)
    prompt = np.zeros((1, 3), np.int32)
    live = {}

    def on_token(tok):
        if int(tok[0]) in (10, 50):
            gc.collect()
            live[int(tok[0])] = len(jax.live_arrays())

    g = generation_loop(lambda p, T, k: plus(jnp.zeros(1, jnp.int32)), lambda t, pos, k: plus(t), prompt, 50,
                        on_token=on_token)
    assert len(g.tokens[0]) == 50 and g.tokens[0][-1] == 50
    assert live[50] == live[10], "generated tokens keep device buffers alive"
