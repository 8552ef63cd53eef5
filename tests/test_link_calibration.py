"""`--link emulated:paper`: the expert compute time it derives the link from is measured once per
model and machine, stored beside the checkpoint, and read back by every later use."""

import argparse
import json

import pytest
from tiny import make_tiny_hf

pytest.importorskip("torch")
pytest.importorskip("transformers")

from moejax import bench  # noqa: E402
from moejax.cli import _link, main  # noqa: E402



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A converted tiny checkpoint (a directory of its own: the calibration is written into it)."""
    from moejax.convert import convert
    from moejax.offload.store import load_parts

    root = tmp_path_factory.mktemp("link")
    convert(make_tiny_hf(root / "hf"), root / "mj", progress=False)
    return root / "mj", load_parts(root / "mj")


@pytest.fixture
def timings(monkeypatch):
    """Count the timings; each one 'measures' a different time, as a loaded machine would."""
    calls = []

    def fake(parts, reps=200):
        calls.append(1)
        return 1e-4 * len(calls)

    monkeypatch.setattr(bench, "expert_compute_s", fake)
    return calls


def test_second_use_reads_the_stored_link(tiny, timings):
    path, parts = tiny
    (path / bench.LINK_FILE).unlink(missing_ok=True)
    lines = []
    first = bench.paper_link(parts, path, log=lines.append)
    assert len(timings) == 1 and (path / bench.LINK_FILE).is_file()
    assert first.bandwidth == pytest.approx(parts.store.expert_bytes / (28 * 1e-4))
    assert "measured now, stored in" in lines[-1] and "GB/s" in lines[-1]
    second = bench.paper_link(parts, path, log=lines.append)
    assert len(timings) == 1, "the second use timed again"
    assert second.bandwidth == first.bandwidth and second.describe() == first.describe()
    assert "read from" in lines[-1]
    # the CLI's link (bench, eval sweep) reads it too
    assert _link(argparse.Namespace(link="emulated:paper"), parts, path).bandwidth == first.bandwidth
    assert len(timings) == 1
    # measured again only when asked
    third = bench.paper_link(parts, path, recalibrate=True, log=lines.append)
    assert len(timings) == 2 and third.bandwidth == pytest.approx(first.bandwidth / 2)
    assert bench.paper_link(parts, path, log=lines.append).bandwidth == third.bandwidth and len(timings) == 2


def test_stored_link_is_per_model_and_machine(tiny, timings, monkeypatch):
    path, parts = tiny
    file = path / bench.LINK_FILE
    bench.paper_link(parts, path, recalibrate=True, log=lambda _: None)
    assert len(timings) == 1
    monkeypatch.setattr(bench, "machine_key", lambda: "another machine")
    bench.paper_link(parts, path, log=lambda _: None)
    assert len(timings) == 2  # another machine calibrates its own, and keeps the first machine's
    assert len(json.loads(file.read_text())["machines"]) == 2
    data = json.loads(file.read_text())
    file.write_text(json.dumps({**data, "fingerprint": "another model"}))
    bench.paper_link(parts, path, log=lambda _: None)
    assert len(timings) == 3  # made for another model: measured again
    file.write_text("not json")
    bench.paper_link(parts, path, log=lambda _: None)
    assert len(timings) == 4 and json.loads(file.read_text())["machines"]  # unreadable: measured and rewritten


def test_no_checkpoint_path_measures_every_time(tiny, timings):
    _, parts = tiny
    bench.paper_link(parts, None, log=lambda _: None)
    bench.paper_link(parts, None, log=lambda _: None)
    assert len(timings) == 2


def test_calibrate_link_command(tiny, capsys):
    path, _ = tiny
    (path / bench.LINK_FILE).unlink(missing_ok=True)
    assert main(["calibrate", "--link", "--model", str(path)]) == 0  # a real timing
    err = capsys.readouterr().err
    assert "--link emulated:paper" in err and "GB/s" in err and str(path / bench.LINK_FILE) in err
    entry = next(iter(json.loads((path / bench.LINK_FILE).read_text())["machines"].values()))
    assert entry["bandwidth"] > 0 and entry["expert_compute_s"] > 0
