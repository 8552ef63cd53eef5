"""Every bad input is one line `error: ...` on stderr and exit code 2, through the console
script, without a traceback and without creating or removing any file.

CASES is a plain list: add a row for a new case. In argv and in the files a setup writes,
"{tmp}" is the case's own directory, which is also the working directory. Rows that fail
before a model is loaded keep this fast (each row is one process that imports JAX).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest


class Case(NamedTuple):
    name: str
    argv: list[str]
    message: str  # part of the one error line
    setup: Callable[[Path], None] | None = None  # writes the case's input files into {tmp}
    skip: str | None = None  # a reason to skip the row here


def text(d: Path) -> None:
    (d / "t.txt").write_text("Experts live in host memory and move to the device. " * 4)


def binary(d: Path) -> None:
    (d / "bin.txt").write_bytes(bytes(range(256)) * 4)


def empty(d: Path) -> None:
    (d / "empty.npz").write_bytes(b"")
    (d / "empty.txt").write_bytes(b"")


def truncated_npz(d: Path) -> None:
    np.savez_compressed(d / "full.npz", meta='{"layers": [0]}', prefill_0=np.arange(1000))
    data = (d / "full.npz").read_bytes()
    (d / "full.npz").unlink()
    (d / "cut.npz").write_bytes(data[: len(data) // 2])


def read_only(d: Path) -> None:
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)


def subdir(d: Path) -> None:
    (d / "out").mkdir()


def existing(d: Path) -> None:
    (d / "t.npz").write_bytes(b"keep me")


ROOT = "permissions do not bind root" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
BENCH = ["bench", "--json", "b.json"]

CASES = [
    # output paths are refused before any work
    Case("bench-json-no-dir", ["bench", "--json", "{tmp}/no/b.json"], "directory {tmp}/no does not exist"),
    Case("bench-json-is-dir", ["bench", "--json", "{tmp}/out"], "--json {tmp}/out is a directory", subdir),
    Case("bench-json-read-only", ["bench", "--json", "{tmp}/ro/b.json"], "is not writable", read_only, ROOT),
    Case("bench-markdown-no-dir", [*BENCH, "--markdown", "{tmp}/no/t.md"], "--markdown {tmp}/no/t.md: directory"),
    Case("bench-figure-kind", [*BENCH, "--figure", "b.xyz"], "matplotlib cannot write .xyz"),
    Case("decode-json-is-dir", ["decode", "--prompt", "x", "--json", "{tmp}/out"], "is a directory", subdir),
    Case("replay-json-no-dir", ["replay", "t.npz", "--json", "{tmp}/no/r.json"], "does not exist"),
    Case("eval-ppl-json-read-only", ["eval", "ppl", "--text", "t.txt", "--json", "{tmp}/ro/e.json"],
         "is not writable", lambda d: (text(d), read_only(d)), ROOT),
    Case("sweep-figure-no-dir", ["eval", "sweep", "--text", "t.txt", "--figure", "{tmp}/no/s.png"], "does not exist",
         text),
    Case("trace-out-exists", ["trace", "record", "--prompt", "x", "--out", "t.npz"], "exists (use --force", existing),
    Case("calibrate-out-no-dir", ["calibrate", "--method", "weights", "--out", "{tmp}/no/s.npz"], "does not exist"),
    # traces that are not traces
    Case("replay-empty", ["replay", "empty.npz"], "the file is empty", empty),
    Case("replay-truncated", ["replay", "cut.npz"], "truncated or corrupt", truncated_npz),
    Case("replay-text", ["replay", "t.txt"], "not an .npz file", text),
    Case("replay-missing", ["replay", "none.npz"], "no trace at none.npz"),
    Case("replay-cache-500", ["replay", "t.txt", "--cache", "500%"], "--cache 500%: a percentage must be in (0, 100]"),
    Case("replay-cache-bytes", ["replay", "t.txt", "--cache", "2GiB"], "expected a slot count or a percentage"),
    Case("replay-policy", ["replay", "t.txt", "--policy", "lru,smoe"], "--policy 'smoe' cannot be replayed"),
    # policies are argparse choices
    Case("trace-policy-bogus", ["trace", "record", "--prompt", "x", "--out", "t.npz", "--policy", "bogus"],
         "invalid choice: 'bogus'"),
    Case("trace-policy-resident", ["trace", "record", "--prompt", "x", "--out", "t.npz", "--policy", "resident"],
         "invalid choice: 'resident'"),
    Case("sweep-policy-bogus", ["eval", "sweep", "--text", "t.txt", "--policy", "bogus"], "invalid choice: 'bogus'"),
    Case("decode-policy-belady", ["decode", "--prompt", "x", "--policy", "belady"], "invalid choice: 'belady'"),
    Case("bench-policies", [*BENCH, "--policies", "lru,bogus"], "--policies: 'bogus' is not one of"),
    Case("bench-width-lru", [*BENCH, "--policies", "smoe,lru:2"], "a prefetch width goes with a prefetching policy"),
    Case("bench-width-word", [*BENCH, "--policies", "smoe:two"], "must be a whole number"),
    Case("decode-width-negative", ["decode", "--prompt", "x", "--prefetch-width=-1"], "--prefetch-width -1 must be 0"),
    # text that is not text
    Case("ppl-binary", ["eval", "ppl", "--text", "bin.txt"], "--text bin.txt is not UTF-8 text", binary),
    Case("ppl-empty", ["eval", "ppl", "--text", "empty.txt"], "--text empty.txt is empty", empty),
    Case("ppl-missing", ["eval", "ppl", "--text", "none.txt"], "--text none.txt: no such file"),
    Case("calibrate-binary", ["calibrate", "--text", "bin.txt"], "is not UTF-8 text", binary),
    Case("calibrate-no-text", ["calibrate"], "--method output needs --text FILE"),
    # flags (the cases of tests/test_cli.py that fail before a model is loaded)
    Case("decode-empty-prompt", ["decode", "--prompt", ""], "--prompt is empty"),
    Case("decode-zero-tokens", ["decode", "--prompt", "x", "--max-new-tokens", "0"],
         "--max-new-tokens must be at least 1"),
    Case("decode-temperature", ["decode", "--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
    Case("decode-int", ["decode", "--prompt", "x", "--max-new-tokens", "ten"], "invalid int value"),
    Case("decode-engine", ["decode", "--prompt", "x", "--engine", "turbo"],
         "argument --engine: invalid choice: 'turbo'"),
    Case("decode-budget-word", ["decode", "--prompt", "x", "--vram-budget", "lots"], "expected a size like 512MiB"),
    Case("decode-budget-negative", ["decode", "--prompt", "x", "--vram-budget=-5%"], "expected a size like 512MiB"),
    Case("decode-budget-zero", ["decode", "--prompt", "x", "--vram-budget", "0%"], "a percentage must be in (0, 100]"),
    Case("decode-alpha", ["decode", "--prompt", "x", "--alpha", "1.5"], "--alpha 1.5 must be in [0, 1)"),
    Case("bench-fused-emulated", [*BENCH, "--link", "emulated:1GB/s,0us", "--engine", "fused"],
         "--link emulated:1GB/s,0us runs on the stepwise engine"),
    Case("sweep-fused-emulated", ["eval", "sweep", "--text", "t.txt", "--link", "emulated:paper", "--engine", "fused"],
         "--link emulated:paper runs on the stepwise engine"),
    Case("sweep-alphas-range", ["eval", "sweep", "--text", "t.txt", "--alphas", "0,1.2"], "1.2 is not in [0, 1)"),
    Case("sweep-alphas-words", ["eval", "sweep", "--text", "t.txt", "--alphas", "a,b"],
         "expected comma-separated numbers"),
    Case("trace-engine", ["trace", "record", "--prompt", "x", "--out", "t.npz", "--engine", "fused"],
         "invalid choice: 'fused'"),
    Case("ppl-engine", ["eval", "ppl", "--text", "t.txt", "--engine", "fast"], "invalid choice: 'fast'"),
    # eval tasks: task files that are not BIG-bench multiple-choice tasks, and its flags
    Case("tasks-missing", ["eval", "tasks", "none.json"], "none.json: no such file or directory"),
    Case("tasks-bad-json", ["eval", "tasks", "t.json"], "t.json is not valid JSON (line 1",
         lambda d: (d / "t.json").write_text('{"examples": [')),
    Case("tasks-not-object", ["eval", "tasks", "t.json"], "is not a BIG-bench task", lambda d: (d / "t.json").write_text("[]")),
    Case("tasks-no-choices", ["eval", "tasks", "t.json"], "has no multiple-choice examples",
         lambda d: (d / "t.json").write_text('{"name": "gen", "examples": [{"input": "1+1", "target": "2"}]}')),
    Case("tasks-empty-dir", ["eval", "tasks", "{tmp}/out"], "holds no task.json", subdir),
    Case("tasks-unknown-name", ["eval", "tasks", "t.json", "--tasks", "other"], "--tasks other: not found",
         lambda d: (d / "t.json").write_text('{"name": "mc", "examples": [{"input": "x", "target_scores": {"a": 1}}]}')),
    Case("tasks-limit", ["eval", "tasks", "t.json", "--limit", "0"], "--limit must be at least 1"),
    Case("tasks-prefix", ["eval", "tasks", "t.json", "--prefix", "some"], "expected a token count or 'all'"),
    Case("tasks-substitute", ["eval", "tasks", "t.json", "--substitute", "drop"], "invalid choice: 'drop'"),
    Case("tasks-markdown-no-dir", ["eval", "tasks", "t.json", "--markdown", "{tmp}/no/t.md"], "does not exist"),
    # conversion (more in tests/test_convert_safety.py: cases that need a real model or a hub cache)
    Case("convert-dst-is-src", ["convert", "src", "src", "--force"], "destination src is the source",
         lambda d: [(d / "src").mkdir(), (d / "src" / "model.safetensors").write_bytes(b"weights")]),
    Case("convert-dst-inside-src", ["convert", "src", "src/out"], "is inside the source",
         lambda d: [(d / "src").mkdir(), (d / "src" / "model.safetensors").write_bytes(b"weights")]),
    Case("convert-dst-contains-src", ["convert", "{tmp}/src", "{tmp}", "--force"], "contains the source",
         lambda d: [(d / "src").mkdir(), (d / "src" / "model.safetensors").write_bytes(b"weights")]),
    Case("convert-config-binary", ["convert", "src", "out"], "src/config.json is not UTF-8 text",
         lambda d: [(d / "src").mkdir(), (d / "src" / "config.json").write_bytes(b"\xff\xfe\x00binary")]),
    Case("convert-config-list", ["convert", "src", "out"], "src/config.json is not a JSON object",
         lambda d: [(d / "src").mkdir(), (d / "src" / "config.json").write_text("[1, 2, 3]")]),
    Case("decode-model-config-binary", ["decode", "--model", "src", "--prompt", "x"], "is not UTF-8 text",
         lambda d: [(d / "src").mkdir(), (d / "src" / "config.json").write_bytes(b"\xff\xfe\x00binary"),
                    (d / "src" / "model.safetensors").write_bytes(b"")]),
    Case("decode-model-config-list", ["decode", "--model", "src", "--prompt", "x"], "is not a JSON object",
         lambda d: [(d / "src").mkdir(), (d / "src" / "config.json").write_text("[1, 2, 3]"),
                    (d / "src" / "model.safetensors").write_bytes(b"")]),
]


def snapshot(*dirs: Path) -> set[str]:
    return {str(p) for d in dirs for p in d.rglob("*")}


def console_script() -> list[str]:
    exe = shutil.which("moejax")
    return [exe] if exe else [sys.executable, "-m", "moejax.cli"]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    if case.skip:
        pytest.skip(case.skip)
    d = tmp_path / "case"  # a stray file beside an output would land in tmp_path: watched too
    d.mkdir()
    if case.setup:
        case.setup(d)
    before = snapshot(tmp_path)
    env = {**os.environ, "MOEJAX_NO_COMPILE_CACHE": "1"}
    r = subprocess.run([*console_script(), *[a.replace("{tmp}", str(d)) for a in case.argv]], cwd=d, env=env,
                       capture_output=True, text=True, timeout=300)
    after = snapshot(tmp_path)
    if (d / "ro").exists():
        (d / "ro").chmod(0o755)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "allow_pickle" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert case.message.replace("{tmp}", str(d)) in lines[0], r.stderr
    assert after == before, f"created {sorted(after - before)}, removed {sorted(before - after)}"
