"""Trace record/replay: replaying a policy reproduces the engine's numbers on the same run."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import moejax  # noqa: E402
from moejax.cli import main  # noqa: E402
from moejax.engine import OffloadEngine, make_engine  # noqa: E402
from moejax.eval.trace import Trace, TraceRecorder, replay  # noqa: E402
from tiny import hf_config  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_store):
    _, path, _ = tiny_store("trace-qwen3", hf_config("qwen3_moe", num_hidden_layers=3), seed=11)
    return path, moejax.load(path)


@pytest.mark.parametrize("policy,alpha,pct", [("lru", 0.0, 0.25), ("lfu", 0.0, 0.25), ("ondemand", 0.0, 0.5),
                                               ("score", 0.0, 0.25), ("score-sub", 0.5, 0.25), ("lru", 0.0, 0.5)])
def test_replay_reproduces_engine(model, tmp_path, policy, alpha, pct):
    """The three drivers of one definition of the policies -- the stepwise engine, trace
    replay and (for a subset, it compiles) the fused engine -- agree on every count."""
    path, m = model
    prompt = np.random.default_rng(2).integers(0, m.config.vocab_size, (1, 9))
    e = OffloadEngine(path, policy, ("pct", pct), cache_len=64, alpha=alpha)
    e.recorder = TraceRecorder()
    g = e.generate(prompt, 16)
    e.recorder.save(tmp_path / "t.npz", m.config, 1)
    r = replay(Trace(tmp_path / "t.npz", m.config), policy, e.plan.pool_slots, alpha=alpha)
    assert r["hit_rate"] == e.telemetry.hit_rate
    assert r["transfers"] == e.telemetry.transfers
    assert r["substitution_rate"] == e.telemetry.substitution_rate
    if pct == 0.25 and policy in ("lru", "score-sub"):
        f = make_engine("fused", path, policy, ("pct", pct), cache_len=64, alpha=alpha)
        assert f.generate(prompt, 16).tokens == g.tokens
        assert (f.telemetry.hit_rate, f.telemetry.transfers, f.telemetry.substituted, f.telemetry.bytes_h2d_prefill) == (
            e.telemetry.hit_rate, e.telemetry.transfers, e.telemetry.substituted, e.telemetry.bytes_h2d_prefill)
    if alpha == 0:
        b = replay(Trace(tmp_path / "t.npz"), "belady", e.plan.pool_slots)
        assert b["hit_rate"] >= r["hit_rate"]  # the offline optimum bounds every non-substituting cache


def test_trace_cli_and_bad_input(model, tmp_path, capsys, monkeypatch):
    path, m = model
    out = tmp_path / "t.npz"
    assert main(["trace", "record", "--model", str(path), "--prompt", "hello", "--max-new-tokens", "5",
                 "--vram-budget", "50%", "--out", str(out)]) == 2  # the tiny model has no tokenizer
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no tokenizer.json" in err and err.count("\n") == 1
    rec = TraceRecorder()
    e = OffloadEngine(path, "lru", ("pct", 0.5), cache_len=64)
    e.recorder = rec
    e.generate(np.array([[1, 2, 3]]), 4)
    rec.save(out, m.config, 1)
    assert main(["replay", str(out), "--model", str(path), "--cache", "50%,8", "--policy", "lru,belady",
                 "--figure", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0
    other = moejax.MoEConfig.from_json(m.config.to_json().replace('"vocab_size": 128', '"vocab_size": 129'))
    rec.save(tmp_path / "other.npz", other, 1)
    cases = [
        (["replay", str(tmp_path / "other.npz"), "--model", str(path)], "recorded with another model"),
        (["replay", str(out), "--policy", "smoe"], "cannot be replayed"),
        (["replay", str(out), "--cache", "1"], "below the"),
        (["replay", str(tmp_path / "none.npz")], "no trace at"),
    ]
    for argv, message in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
