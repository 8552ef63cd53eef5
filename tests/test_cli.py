"""`moejax decode` end to end on a tiny model with a real tokenizer, and its bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import make_tiny_hf

pytest.importorskip("torch")
pytest.importorskip("transformers")

from moejax.cli import main  # noqa: E402



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("cli") / "tiny")


def test_decode_streams_text_and_writes_json(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))  # an HF dir is converted on the fly
    out = tmp_path / "run.json"
    rc = main(["decode", "--model", str(tiny_dir), "--prompt", "The experts", "--max-new-tokens", "6",
               "--json", str(out)])
    cap = capsys.readouterr()
    assert rc == 0
    assert cap.out.startswith("The experts")
    assert "TPOT" in cap.err and "hit rate" in cap.err
    rec = json.loads(out.read_text())
    for field in ("tokens", "text", "policy", "alpha", "budget_bytes", "pool_slots", "hit_rate",
                  "substitution_rate", "bytes_h2d", "transfers", "ttft_ms", "tpot_ms", "peak_device_bytes"):
        assert field in rec
    assert len(rec["tokens"]) == 6 and rec["policy"] == "resident"
    # greedy decoding is deterministic, sampling is seeded
    assert main(["decode", "--model", str(tiny_dir), "--prompt", "The experts", "--max-new-tokens", "6",
                 "--json", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["tokens"] == rec["tokens"]


def test_console_script_runs(tiny_dir, tmp_path):
    env = {**__import__("os").environ, "MOEJAX_CACHE": str(tmp_path / "cache")}
    env.pop("MOEJAX_NO_COMPILE_CACHE", None)
    r = subprocess.run(["moejax", "decode", "--model", str(tiny_dir), "--prompt", "A cache", "--max-new-tokens",
                        "3", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("A cache")
    assert any((tmp_path / "cache" / "xla").iterdir())  # the persistent compilation cache


# bad input that is refused before a model is loaded: tests/test_errors.py
@pytest.mark.parametrize("argv,message", [
    (["--prompt", "x", "--max-new-tokens", "100000"], "exceeds the model's context of 512"),
])
def test_decode_bad_input(tiny_dir, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    rc = main(["decode", "--model", str(tiny_dir), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_decode_model_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    rc = main(["decode", "--model", str(tmp_path / "junk"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {tmp_path / 'junk'} is not a moejax or Hugging Face checkpoint\n"


@pytest.mark.parametrize("argv,message", [
    (["--vram-budget", "10KiB"], "is below the minimum of"),
    (["--vram-budget", "1%"], "needs at least 4"),
    (["--policy", "resident", "--vram-budget", "50%"], "--policy resident keeps all"),
    (["--vram-budget", "20%", "--policy", "lru", "--per-layer"], "a pool split per layer"),
])
def test_decode_bad_budget_and_policy(tiny_dir, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    rc = main(["decode", "--model", str(tiny_dir), "--prompt", "x", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_decode_offloaded_json(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "off.json"
    base = ["decode", "--model", str(tiny_dir), "--prompt", "The experts", "--max-new-tokens", "6"]
    assert main([*base, "--json", str(tmp_path / "res.json")]) == 0
    assert main([*base, "--vram-budget", "25%", "--policy", "lfu", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "pool" in err and "hit rate" in err
    rec, res = json.loads(out.read_text()), json.loads((tmp_path / "res.json").read_text())
    assert rec["tokens"] == res["tokens"]  # offloading without substitution changes nothing
    assert rec["policy"] == "lfu" and rec["pool_share"] == 0.25 and rec["bytes_h2d"] > 0
    assert rec["peak_device_bytes"] <= rec["budget_bytes"]
    assert rec["engine"] == "fused" and res["engine"] == "none"  # the default engine; resident has none
    assert "engine fused" in err


def test_decode_notes_a_prefetch_width_the_pool_has_no_room_for(tiny_dir, tmp_path, capsys, monkeypatch):
    """16 experts x 2 MoE layers, top-4: at 25% (8 slots) a layer can always spare 4 slots for
    two prefetches; at 13% (4 slots) none, and decode says so (the idle copies move bytes)."""
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    base = ["decode", "--model", str(tiny_dir), "--prompt", "The experts", "--max-new-tokens", "3", "--policy", "smoe",
            "--prefetch-width", "2"]
    out = tmp_path / "w.json"
    assert main([*base, "--vram-budget", "25%", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "prefetch width 2" in err and "note: --prefetch-width" not in err
    assert json.loads(out.read_text())["prefetch_width"] == 2  # the output names it
    assert main([*base, "--vram-budget", "13%"]) == 0
    assert "sure of only 0 free slots" in capsys.readouterr().err


def test_decode_stepwise_engine_named(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "step.json"
    assert main(["decode", "--model", str(tiny_dir), "--prompt", "The experts", "--max-new-tokens", "3",
                 "--vram-budget", "25%", "--policy", "lru", "--engine", "stepwise", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    rec = json.loads(out.read_text())
    assert rec["engine"] == "stepwise" and rec["compile_s"] > 0 and len(rec["tokens"]) == 3
    assert err.count("engine stepwise") == 2  # the plan line and the summary line


def test_calibrate_then_decode_with_similarity(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "cal.txt"
    text.write_text("Experts live in host memory and move to the device when a layer needs them. " * 3)
    sim = tmp_path / "sim.npz"
    assert main(["calibrate", "--model", str(tiny_dir), "--text", str(text), "--out", str(sim)]) == 0
    assert main(["calibrate", "--model", str(tiny_dir), "--text", str(text), "--out", str(sim)]) == 2  # no --force
    base = ["decode", "--model", str(tiny_dir), "--prompt", "The experts", "--max-new-tokens", "4",
            "--vram-budget", "25%", "--alpha", "0.3"]
    assert main([*base, "--substitute", "hybrid", "--similarity", str(sim)]) == 0
    out = tmp_path / "ev.json"
    assert main(["eval", "ppl", "--model", str(tiny_dir), "--text", str(text), "--vram-budget", "25%",
                 "--alpha", "0", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["top1_agreement"] == 1.0 and rec["ppl"] == pytest.approx(rec["ppl_resident"], rel=1e-4)
    assert rec["engine"] == "fused"
    for field in ("ppl", "ppl_resident", "top1_agreement", "kl", "hit_rate", "substitution_rate", "tokens"):
        assert field in rec


def test_similarity_bad_input(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    base = ["decode", "--model", str(tiny_dir), "--prompt", "x", "--vram-budget", "25%"]
    cases = [
        (["--alpha=-0.1"], "must be in [0, 1)"),
        (["--score-window", "0"], "--score-window must be at least 1"),
        (["--substitute", "similarity", "--similarity", str(tmp_path / "none.npz")], "run `moejax calibrate` first"),
    ]
    # a similarity file made for another model
    import numpy as np
    other = tmp_path / "other.npz"
    np.savez(other, fingerprint="0123456789abcdef", method="weights", layer_0=np.eye(4))
    cases.append((["--substitute", "hybrid", "--similarity", str(other)], "calibrated for another model"))
    for argv, message in cases:
        rc = main([*base, *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("content,message", [("hi", "at least 9 are needed")])
def test_eval_bad_text(tiny_dir, tmp_path, capsys, monkeypatch, content, message):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "t.txt"
    f.write_text(content)
    rc = main(["eval", "ppl", "--model", str(tiny_dir), "--text", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_eval_sweep(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("Experts live in host memory and move to the device when a layer needs them. " * 4)
    out = tmp_path / "sweep.json"
    base = ["eval", "sweep", "--model", str(tiny_dir), "--text", str(text), "--prefix", "4", "--new-tokens", "3"]
    assert main([*base, "--alphas", "0,0.5", "--json", str(out), "--figure", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    got = json.loads(out.read_text())
    rows = got["rows"]
    assert got["meta"]["prefetch_width"] == 0  # smoe, the paper's prefetch rule
    assert [r["alpha"] for r in rows] == [0.0, 0.5] and rows[0]["top1_agreement"] == 1.0
    assert all("tpot_ms" in r and "hit_rate" in r and r["engine"] == "fused" and r["compile_s"] > 0 for r in rows)


def test_bench_fused_reports_its_compile_time(tiny_dir, tmp_path, monkeypatch):
    """The fused engine compiles before its warm-up, so the bench's compile_s is the engine's
    own compile time (seconds here, from an empty compilation cache), not the warm-up's run."""
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "b.json"
    assert main(["bench", "--model", str(tiny_dir), "--vram-budget", "50%", "--policies", "lru", "--trials", "1",
                 "--new-tokens", "2", "--engine", "fused", "--json", str(out)]) == 0
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["engine"] == "fused" and rec["compile_s"] > 0.5


def test_bench_runs_prefetch_widths_side_by_side(tiny_dir, tmp_path, capsys, monkeypatch):
    """--policies smoe,smoe:2: the same policy with the paper's prefetch rule and with a fixed
    width, one record each, named in the table."""
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "b.json"
    assert main(["bench", "--model", str(tiny_dir), "--vram-budget", "50%", "--policies", "smoe,smoe:2",
                 "--trials", "1", "--new-tokens", "3", "--engine", "fused", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    assert [(r["policy"], r["prefetch_width"]) for r in recs] == [("smoe", 0), ("smoe", 2)]
    assert "| smoe (prefetch width 2) | fused |" in capsys.readouterr().out


def test_bench_emulated_link_labelled(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "b.json"
    pytest.importorskip("matplotlib")
    fig = tmp_path / "b.png"
    assert main(["bench", "--model", str(tiny_dir), "--vram-budget", "50%", "--policies", "lru,smoe", "--trials", "1",
                 "--new-tokens", "3", "--link", "emulated:50MB/s,10us", "--json", str(out), "--figure", str(fig)]) == 0
    assert fig.stat().st_size > 0
    recs = json.loads(out.read_text())["records"]
    assert all(r["link"] == "emulated link: 0.05 GB/s, 10 us latency" for r in recs)
    assert all(r["engine"] == "stepwise" and r["compile_s"] > 0 for r in recs)  # an emulated link runs stepwise
    assert all(r["skip_rate"] == 0.0 for r in recs)  # reported (docs/accuracy.md); window mode drops nothing
    cap = capsys.readouterr()
    assert "emulated link" in cap.err and "| lru | stepwise |" in cap.out
    assert main(["bench", "--model", str(tiny_dir), "--link", "emulated:fast", "--json", str(out)]) == 2


def test_every_flag_has_help():
    import argparse

    from moejax.cli import build_parser

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{name} {choice.dest} has no help"
                for sub, p in action.choices.items():
                    walk(p, f"{name} {sub}")

    walk(build_parser(), "moejax")


def test_budget_and_substitution_parsed_once():
    from moejax.cli import Substitution, parse_budget_arg
    from moejax.errors import MoejaxError
    from moejax.offload.importance import MODES

    assert parse_budget_arg("25%") == ("pct", 0.25)
    assert parse_budget_arg("2GiB") == ("bytes", 2 * 2**30)
    assert parse_budget_arg("12") == ("bytes", 12)
    assert parse_budget_arg(" 12 ", "--cache", plain="slots") == ("slots", 12)
    assert parse_budget_arg("50%", "--cache", plain="slots") == ("pct", 0.5)
    for text, flag, plain, message in [("500%", "--cache", "slots", "--cache 500%: a percentage must be in (0, 100]"),
                                       ("1GB", "--cache", "slots", "--cache '1GB': expected a slot count"),
                                       ("0", "--cache", "slots", "--cache 0: at least 1 slot"),
                                       ("lots", "--vram-budget", "bytes", "--vram-budget 'lots': expected a size")]:
        with pytest.raises(MoejaxError, match=None) as e:
            parse_budget_arg(text, flag, plain)
        assert message in str(e.value)
    s = Substitution(0.3, "hybrid")
    with pytest.raises(Exception):
        s.alpha = 0.5  # frozen: one value, validated when made
    for bad in (dict(alpha=1.0), dict(alpha=float("nan")), dict(mode="nearest"), dict(score_window=0)):
        with pytest.raises(MoejaxError):
            Substitution(**bad)
    assert set(MODES) == {"window", "hybrid", "similarity", "skip"}


def test_output_checks(tmp_path, monkeypatch):
    from moejax.cli import check_output, write_text
    from moejax.errors import MoejaxError

    assert check_output("--json", None) is None
    assert check_output("--json", tmp_path / "a.json") == tmp_path / "a.json"
    (tmp_path / "a.json").write_text("{}")
    assert check_output("--json", tmp_path / "a.json")  # records are replaced
    with pytest.raises(MoejaxError, match="exists .use --force"):
        check_output("--out", tmp_path / "a.json", force=False)
    assert check_output("--out", tmp_path / "a.json", force=True)
    with pytest.raises(MoejaxError, match="is a directory"):
        check_output("--json", tmp_path)
    with pytest.raises(MoejaxError, match="does not exist"):
        check_output("--json", tmp_path / "no" / "a.json")
    monkeypatch.setattr("moejax.cli.os.access", lambda *a, **k: False)  # root ignores chmod: stand in for it
    with pytest.raises(MoejaxError, match="is not writable"):
        check_output("--json", tmp_path / "b.json")
    monkeypatch.undo()

    def fail(self, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "replace", fail)
    with pytest.raises(MoejaxError, match="cannot write .*Permission denied"):
        write_text(tmp_path / "c.txt", "x")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left behind


def test_per_layer_pool_named(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    base = ["decode", "--model", str(tiny_dir), "--prompt", "The experts", "--max-new-tokens", "3",
            "--vram-budget", "25%", "--policy", "lru"]
    assert main([*base, "--per-layer", "--json", str(tmp_path / "p.json")]) == 0
    assert main([*base, "--json", str(tmp_path / "s.json")]) == 0
    err = capsys.readouterr().err
    per, shared = json.loads((tmp_path / "p.json").read_text()), json.loads((tmp_path / "s.json").read_text())
    assert per["pool"] == "per-layer pool" and shared["pool"] == "shared pool"
    assert per["tokens"] == shared["tokens"]  # no substitution: the pool layout changes no token
    assert err.count("per-layer pool (4 slots per layer)") == 2  # the plan line and the summary line
    assert err.count("shared pool") == 2


def test_trace_without_budget_and_replay_per_layer(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    trace = tmp_path / "t.npz"
    assert main(["trace", "record", "--model", str(tiny_dir), "--prompt", "The experts", "--max-new-tokens", "4",
                 "--out", str(trace)]) == 0
    err = capsys.readouterr().err
    assert "no --vram-budget given" in err and "hit rate" not in err.replace("no hit rate", "")
    out = tmp_path / "r.json"
    assert main(["replay", str(trace), "--cache", "50%", "--policy", "lru,belady", "--per-layer",
                 "--json", str(out)]) == 0
    cap = capsys.readouterr()
    rec = json.loads(out.read_text())
    assert rec["pool"] == "per-layer pool"
    assert all(r["pool"] == "per-layer pool" and r["slots"] == 16 and r["slots_per_layer"] == 8 for r in rec["rows"])
    assert "| lru | per-layer pool | 16 (8 per layer) |" in cap.out
    assert main(["replay", str(trace), "--cache", "8", "--policy", "lru"]) == 0
    assert "| lru | shared pool | 8 |" in capsys.readouterr().out
    assert main(["replay", str(trace), "--cache", "33"]) == 2
    assert "the trace has only 32 experts" in capsys.readouterr().err


def test_eval_ppl_resident(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("Experts live in host memory and move to the device when a layer needs them. " * 2)
    out = tmp_path / "e.json"
    assert main(["eval", "ppl", "--model", str(tiny_dir), "--text", str(text), "--policy", "resident",
                 "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["engine"] == "none" and rec["pool"] == "none" and rec["policy"] == "resident"
    assert rec["top1_agreement"] == 1.0 and rec["ppl"] == rec["ppl_resident"] and rec["hit_rate"] == 1.0


@pytest.mark.parametrize("command", ["bench", "sweep"])
def test_interrupt_keeps_finished_records(tiny_dir, tmp_path, capsys, monkeypatch, command):
    """Each finished record is written at once: an interrupt after the first keeps it."""
    import moejax.cli as cli

    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    write = cli.write_json

    def write_then_interrupt(path, obj):
        write(path, obj)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "write_json", write_then_interrupt)
    text = tmp_path / "t.txt"
    text.write_text("Experts live in host memory and move to the device when a layer needs them. " * 2)
    argv = {"bench": ["bench", "--vram-budget", "25%,50%", "--policies", "lru", "--trials", "1", "--new-tokens", "2"],
            "sweep": ["eval", "sweep", "--text", str(text), "--alphas", "0,0.5", "--prefix", "4", "--new-tokens", "2"]}
    assert main([*argv[command], "--model", str(tiny_dir), "--engine", "stepwise", "--per-layer",
                 "--json", str(out)]) == 130
    got = json.loads(out.read_text())
    rows = got["records" if command == "bench" else "rows"]
    assert len(rows) == 1 and rows[0]["pool"] == "per-layer pool" and got["meta"]["pool"] == "per-layer pool"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_import_is_lazy_and_complete():
    """`import moejax` does not import JAX (so `moejax -h` and bad flags answer fast), and
    moejax.load, moejax.Model and submodules such as moejax.api are still there on first use."""
    code = ("import sys, moejax; assert 'jax' not in sys.modules; "
            "assert callable(moejax.load) and callable(moejax.api.resolve) and moejax.MoEConfig; "
            "assert not hasattr(moejax, 'no_such_thing')")
    subprocess.run([sys.executable, "-c", code], check=True)
