"""`moejax eval tasks`: BIG-bench reading, multiple-choice scoring against hand-computed
log-likelihoods, and the command end to end on a tiny model with a tokenizer."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from moejax.errors import MoejaxError
from moejax.eval import tasks as T


def _task(**fields):
    return {"name": "t", "description": "", "keywords": [], "metrics": ["multiple_choice_grade"], **fields}


def test_format_follows_bigbench_defaults_and_prefixes():
    ex = {"input": "2 + 2?", "target_scores": {"4": 1, "5": 0, "3": 0}}
    e = T.format_example(_task(), ex)
    order = np.random.RandomState(42).permutation(["3", "4", "5"])  # BIG-bench's json_task.default_format_fn
    assert e.context == "\nQ: 2 + 2?" + "".join(f"\n  choice: {c}" for c in order) + "\nA: "
    assert e.choices == ["4", "5", "3"] and e.scores == [1.0, 0.0, 0.0]
    task = _task(task_prefix="Add.\n", example_input_prefix="", example_output_prefix="\nSum:", choice_prefix=" | ",
                 append_choices_to_input=False)
    assert T.format_example(task, ex).context == "Add.\n2 + 2?\nSum:"
    task["append_choices_to_input"] = True
    assert T.format_example(task, ex).context == "Add.\n2 + 2?" + "".join(f" | {c}" for c in order) + "\nSum:"
    assert T.format_example(_task(), {"input": "x", "target": "y"}) is None  # generative: not multiple choice


def test_load_tasks_directory_subtasks_filter_and_limit(tmp_path):
    def write(rel, data):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(data))

    mc = [{"input": f"q{i}", "target_scores": {"a": 1, "b": 0}} for i in range(5)]
    write("alpha/task.json", _task(name="alpha", examples=mc))
    write("gen/task.json", _task(name="gen", examples=[{"input": "x", "target": "y"}]))
    write("nested/task.json", _task(name="nested"))  # subtasks, as BIG-bench lays them out
    write("nested/one/task.json", _task(name="one", examples=mc[:2]))
    write("nested/two/task.json", _task(name="two", examples=[{"input": "x", "target_scores": {"a": 0.25, "b": 1,
                                                                                             "c": 0.5, "d": 0}}]))
    tasks = T.load_tasks(tmp_path)
    assert [t.name for t in tasks] == ["alpha", "nested:one", "nested:two"]  # gen has no multiple choice
    assert tasks[0].chance == 0.5 and tasks[2].chance == pytest.approx(1.75 / 4)
    assert [t.name for t in T.load_tasks(tmp_path, ["nested"], limit=1)] == ["nested:one", "nested:two"]
    assert len(T.load_tasks(tmp_path, ["alpha"], limit=3)[0].examples) == 3
    whole = T.load_tasks(tmp_path, ["alpha"])[0].examples
    assert T.load_tasks(tmp_path, ["alpha"], limit=2, skip=1)[0].examples == whole[1:3]
    with pytest.raises(MoejaxError, match="--skip 99 leaves no examples of alpha"):
        T.load_tasks(tmp_path, ["alpha"], skip=99)
    assert [t.name for t in T.load_tasks(tmp_path / "alpha")] == ["alpha"]
    assert [t.name for t in T.load_tasks(tmp_path / "nested" / "one" / "task.json")] == ["one"]
    with pytest.raises(MoejaxError, match="--tasks gen: no multiple-choice examples"):
        T.load_tasks(tmp_path, ["gen"])
    with pytest.raises(MoejaxError, match="has no multiple-choice examples"):
        T.load_tasks(tmp_path / "gen")


class CharTokenizer:
    """One token per character (id = code point), for encode_pair."""

    def encode(self, text, add_special_tokens=True):
        return SimpleNamespace(ids=[ord(c) for c in text])


def test_encode_pair_moves_trailing_whitespace_to_the_continuation():
    ctx, cont = T.encode_pair(CharTokenizer(), "A: ", "yes")
    assert ctx == [ord("A"), ord(":")] and cont == [ord(" "), ord("y"), ord("e"), ord("s")]
    assert T.encode_pair(CharTokenizer(), "A:", " no") == ([ord("A"), ord(":")], [ord(" "), ord("n"), ord("o")])


class TableSteps:
    """A model whose next-token logits depend only on the last token fed: logits = TABLE[token].
    Records what it was fed, to check the decode-mode protocol."""

    TABLE = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25],
                             [0.7, 0.1, 0.1, 0.1]]))

    def __init__(self):
        self.fed = []

    def prefill(self, padded, n, key):
        self.fed.append(("prefill", padded[0, :n].tolist()))
        return None, self.TABLE[padded[0, n - 1]][None]

    def step(self, token, pos, key):
        self.fed.append((int(pos), int(token[0])))
        return None, self.TABLE[int(token[0])][None]


def test_score_choices_against_hand_computed_log_likelihoods():
    """Context [0, 3, 1], choices [2, 0] and [3]: log P = log TABLE[1][2] + log TABLE[2][0]
    = log 0.125 + log 0.25, and log TABLE[1][3] = log 0.125."""
    steps = TableSteps()
    ll = T.score_choices(steps, [0, 3, 1], [[2, 0], [3]], prefix=2)
    assert ll == pytest.approx([np.log(0.125) + np.log(0.25), np.log(0.125)])
    # prefill 2 tokens, decode the third; each choice from the end of the context (position 3)
    assert steps.fed == [("prefill", [0, 3]), (2, 1), (3, 2)]
    steps = TableSteps()
    assert T.score_choices(steps, [0, 3, 1], [[2, 0], [3]], prefix=None) == pytest.approx(ll)
    assert steps.fed == [("prefill", [0, 3, 1]), (3, 2)]


def test_grades_raw_per_token_per_char():
    # choice 0: 2 tokens, 3 chars, ll -2.0; choice 1: 1 token, 6 chars, ll -1.5
    g = T.grades([-2.0, -1.5], [2, 1], [3, 6], [1.0, 0.0])
    assert g == {"acc": 0.0, "acc_per_token": 1.0, "acc_per_char": 0.0}  # -1.0/token beats -1.5; -0.25/char beats -0.67
    assert T.grades([-1.0, -1.0], [1, 1], [1, 1], [0.0, 1.0])["acc"] == 0.0  # ties: the first choice
    assert T.grades([-3.0, -1.0, -2.0], [1, 1, 1], [1, 1, 1], [0.0, 0.5, 1.0])["acc"] == 0.5  # BIG-bench's grade


# ---- end to end on a tiny model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from moejax.convert import convert
    from tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("tasks")
    convert(make_tiny_hf(root / "hf"), root / "mj", progress=False)
    task = _task(name="tiny_mc", task_prefix="Experts move to the device.\n", append_choices_to_input=False, examples=[
        {"input": "Where do the experts live?", "target_scores": {"in host memory": 1, "on the device": 0}},
        {"input": "What keeps the experts?", "target_scores": {"a cache": 1, "the lazy dog": 0, "a fox": 0}},
        {"input": "The quick brown fox", "target_scores": {"jumps over": 1, "sleeps": 0}},
        {"input": "A scheduler decides which experts to", "target_scores": {"fetch": 1, "ignore": 0, "paint": 0}},
    ])
    (root / "task.json").write_text(json.dumps(task))
    return root / "mj", root / "task.json"


def _run(argv, tmp_path):
    from moejax.cli import main

    out = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
    assert main(["eval", "tasks", *argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_resident_log_likelihoods_equal_a_full_forward(tiny, tmp_path):
    """The decode-mode log-likelihoods equal the full causal forward's on context + choice
    (the tiny model is float32)."""
    import moejax
    from moejax.eval.ppl import log_softmax

    path, task = tiny
    rec = _run([str(task), "--model", str(path), "--policy", "resident", "--markdown", str(tmp_path / "t.md")],
               tmp_path)
    row = rec["tasks"][0]
    assert row["n"] == 4 and row["chance"] == pytest.approx((0.5 + 1 / 3 + 0.5 + 1 / 3) / 4)
    assert rec["meta"]["engine"] == "none" and row["hit_rate"] == 1.0
    m = moejax.load(path)
    t = T.load_tasks(task)[0]
    for ex, got in zip(t.examples, row["examples"]):
        assert got["chars"] == [len(c) for c in ex.choices]
        for choice, ll in zip(ex.choices, got["ll"]):
            ctx, cont = T.encode_pair(m.tokenizer, ex.context, choice)
            logp = log_softmax(m.forward(np.array([ctx + cont]))[0].astype(np.float64))
            want = sum(logp[len(ctx) - 1 + j, tok] for j, tok in enumerate(cont))
            assert ll == pytest.approx(want, abs=1e-4)
    acc = np.mean([g["scores"][int(np.argmax(g["ll"]))] for g in row["examples"]])
    assert row["acc"] == acc
    assert "| tiny_mc | 4 |" in (tmp_path / "t.md").read_text()


@pytest.mark.parametrize("kind", ["fused", "stepwise"])
def test_offloaded_alpha_zero_equals_resident(tiny, tmp_path, kind):
    path, task = tiny
    ref = _run([str(task), "--model", str(path), "--policy", "resident"], tmp_path)["tasks"][0]
    rec = _run([str(task), "--model", str(path), "--vram-budget", "25%", "--alpha", "0", "--engine", kind], tmp_path)
    row = rec["tasks"][0]
    assert rec["meta"]["engine"] == kind and rec["meta"]["policy"] == "smoe"
    got, want = [g["ll"] for g in row["examples"]], [g["ll"] for g in ref["examples"]]
    if kind == "fused":
        assert got == want  # bit for bit
    else:  # the stepwise engine's LM head is its own jitted function: float32 rounding apart
        assert all(a == pytest.approx(b, rel=1e-6) for a, b in zip(got, want))
    assert row["acc"] == ref["acc"] and row["acc_per_char"] == ref["acc_per_char"]
    assert row["hit_rate"] < 1 and row["substitution_rate"] == 0 and row["skip_rate"] == 0


def test_substitution_and_skip_report_their_rates(tiny, tmp_path):
    path, task = tiny
    base = [str(task), "--model", str(path), "--vram-budget", "25%", "--alpha", "0.5", "--policy", "score-sub"]
    sub = _run(base, tmp_path)
    skip = _run([*base, "--substitute", "skip"], tmp_path)
    assert sub["meta"]["substitute"] == "window" and skip["meta"]["substitute"] == "skip"
    assert sub["tasks"][0]["substitution_rate"] > 0 and sub["tasks"][0]["skip_rate"] == 0
    assert skip["tasks"][0]["skip_rate"] > 0 and skip["tasks"][0]["substitution_rate"] == 0
    assert skip["run"]["skip_rate"] == skip["tasks"][0]["skip_rate"]  # one task: the run's rate is the task's


def test_prefilled_scoring_is_decode_mode_and_unchanged_by_buckets(tiny):
    """--prefix all on the resident model (score_prefilled: the context, then all choices in one
    batch, both padded to buckets) gives decode mode's log-likelihoods and greedy flags, with
    exact lengths, with the buckets and with far more padding; and its prefill compiles one
    program per bucket, not one per context length."""
    import moejax
    from moejax.eval.ppl import _ResidentSteps

    path, task = tiny
    m = moejax.load(path)
    p = T.prepare(T.load_tasks(task)[0], m.tokenizer, 256)
    cases = list(zip(p.contexts, p.continuations))
    cases += [(p.contexts[0] * k, p.continuations[1]) for k in (2, 3, 5)]  # longer contexts: other buckets
    for ctx, conts in cases:
        decode = T.score_continuations(_ResidentSteps(m, 256), ctx, conts, prefix=1)
        fast = T.score_continuations(_ResidentSteps(m, 256), ctx, conts, prefix=None)  # its cache: 256 positions
        assert fast == T.score_prefilled(m, ctx, conts, cache_len=256)
        for buckets in (T.bucket, lambda n, base=16: max(n, 1), lambda n, base=16: T.bucket(n, base) + 40)[:3 if len(ctx) < 30 else 1]:
            got = T.score_prefilled(m, ctx, conts, buckets)
            assert [g for _, g in got] == [g for _, g in decode]
            assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in decode], abs=1e-5)
    prefill = T._jits()[0]
    before = prefill._cache_size()
    lengths = range(3, 200, 11)
    for n in lengths:
        T.score_prefilled(m, (p.contexts[1] * 50)[:n], [[5], [6, 7]], cache_len=300)
    assert prefill._cache_size() - before == len({T.bucket(n) for n in lengths})  # one cache length, 384, new here
    assert [T.bucket(n) for n in (1, 16, 17, 33, 49, 65, 97, 129, 193, 300, 1000)] == [
        16, 16, 32, 48, 64, 96, 128, 192, 256, 384, 1024]


def test_compare_tasks_pairs_examples(tmp_path):
    """scripts/compare_tasks.py: accuracy per rule, the difference in points and its paired
    standard error, z against chance, checked by hand on three 2-choice examples."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import compare_tasks

    def run(lls):
        ex = [{"ll": ll, "tokens": [1, 4], "chars": [3, 3], "scores": [1.0, 0.0]} for ll in lls]
        return {"tasks": [{"task": "t", "path": "unused", "examples": ex}]}

    ref = run([[-1.0, -2.0], [-1.0, -2.0], [-3.0, -2.0]])  # right, right, wrong
    cur = run([[-1.0, -2.0], [-3.0, -2.0], [-3.0, -2.0]])  # right, wrong, wrong
    row = compare_tasks.compare(ref, [cur])[0]
    assert row["n"] == 3 and row["chance"] == 0.5
    assert row["ref"]["acc"] == pytest.approx(2 / 3) and row["ref"]["acc_per_char"] == pytest.approx(2 / 3)
    assert row["ref"]["acc_per_token"] == 0.0  # per token the wrong choice wins: -2/4 > -1/1
    assert row["ref_z"]["acc"] == pytest.approx((2 / 3 - 0.5) / (np.sqrt(3 * 0.25) / 3))
    d = row["runs"][0]
    assert d["diff_points"]["acc"] == pytest.approx(-100 / 3)
    assert d["diff_se_points"]["acc"] == pytest.approx(100 * np.std([0, -1, 0], ddof=1) / np.sqrt(3))
    assert d["ll_correct_diff"] == pytest.approx(-2 / 3)
    # two tasks: a last row pools their examples (here the same three twice, so the same
    # accuracies and differences, and the paired s.e. over six examples)
    two = lambda r: {"tasks": r["tasks"] + [r["tasks"][0] | {"task": "u"}]}  # noqa: E731
    rows = compare_tasks.compare(two(ref), [two(cur)])
    assert [r["task"] for r in rows] == ["t", "u", "(all tasks)"] and rows[-1]["n"] == 6
    d6 = rows[-1]["runs"][0]
    assert d6["diff_points"]["acc"] == pytest.approx(-100 / 3) and rows[-1]["ref"]["acc"] == pytest.approx(2 / 3)
    assert d6["diff_se_points"]["acc"] == pytest.approx(100 * np.std([0, -1, 0] * 2, ddof=1) / np.sqrt(6))
    assert rows[-1]["ref_z"]["acc"] == pytest.approx((2 / 3 - 0.5) / (np.sqrt(6 * 0.25) / 6))
    # --by-run: one row per run, each task under its own rule (u per token: every choice there
    # loses to the 4-token one, in both runs), pooled over the six examples
    rates = {"hit_rate": 0.5, "substitution_rate": 0.25, "skip_rate": 0.0, "prefetch_precision": 0.75, "bytes_h2d": 3e9}
    out, md = compare_tasks.run_table(two(ref) | {"run": rates}, [two(cur)], ["x"], {"u": "acc_per_token"})
    row = out[0]
    assert row["tasks"]["t"]["diff_points"] == pytest.approx(-100 / 3) and row["tasks"]["u"]["diff_points"] == 0
    assert row["all"]["diff_points"] == pytest.approx(-100 / 6)
    assert row["all"]["diff_se_points"] == pytest.approx(100 * np.std([0, -1, 0, 0, 0, 0], ddof=1) / np.sqrt(6))
    assert row["all"]["ll_correct_diff"] == pytest.approx(-2 / 3) and row["rates"]["hit_rate"] is None
    assert row["all"]["changed"] == pytest.approx(1 / 6)  # t's second example; u picks the same choice throughout
    assert "| x | -33.3 (33.3) | +0.0 (0.0) | -16.7 (16.7) | 0.167 | -0.67 +- 0.42 |  |  |  |  |  |" in md
    assert "| reference | 0.667 (n 3) | 0.000 (n 3) | | | | 0.500 | 0.250 | 0.000 | 0.750 | 3.0 |" in md
    # a run in parts (eval tasks --skip) joined with "+" is the whole run; --only keeps some tasks
    import json

    (tmp_path / "r.json").write_text(json.dumps(two(ref)))
    (tmp_path / "c.json").write_text(json.dumps(two(cur)))
    assert compare_tasks.main([f"{tmp_path}/r.json", f"{tmp_path}/c.json", "--by-run", "--only", "u",
                               "--json", f"{tmp_path}/o.json"]) == 0
    assert list(json.loads((tmp_path / "o.json").read_text())["rows"][0]["tasks"]) == ["u"]
    assert compare_tasks.main([f"{tmp_path}/r.json", f"{tmp_path}/c.json", "--only", "nope"]) == 2

    (tmp_path / "a.json").write_text(json.dumps({"tasks": [ref["tasks"][0] | {"examples": ref["tasks"][0]["examples"][:1]}]}))
    (tmp_path / "b.json").write_text(json.dumps({"tasks": [ref["tasks"][0] | {"examples": ref["tasks"][0]["examples"][1:]}]}))
    assert compare_tasks.load_run(f"{tmp_path}/a.json+{tmp_path}/b.json") == ref


def test_alpha_table_rows(tmp_path):
    """scripts/alpha_table.py: one row per label from the ppl, bench and tasks JSONs, ratios
    against the first row, '-' for a missing file, exit code 2 on mismatched lists."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import alpha_table

    def write(name, obj):
        (tmp_path / name).write_text(json.dumps(obj))
        return str(tmp_path / name)

    ppl = [write(f"p{i}.json", {"ppl": v, "top1_agreement": 1.0 - i / 10, "kl": i / 100, "tokens": 120})
           for i, v in enumerate((20.0, 25.0))]
    rec = lambda ms: {"records": [{"tpot_ms": ms, "tpot_ms_trials": [ms, ms + 1], "bytes_h2d_per_token": 4e6,  # noqa: E731
                                   "hit_rate": 0.5}]}
    tpot = [write("t0.json", rec(200.0)), write("t1.json", rec(150.0))]
    tasks = write("k1.json", {"run": {"hit_rate": 0.9, "substitution_rate": 0.0, "skip_rate": 0.25, "bytes_h2d": 2.5e9}})
    out = alpha_table.rows(["a0", "skip"], ppl, tpot, ["-", tasks])
    assert out[1]["ppl_change"] == pytest.approx(0.25) and out[1]["tpot_ratio"] == pytest.approx(0.75)
    assert out[1]["rate"] == 0.25 and out[1]["decode_gb"] == 2.5 and "hit_rate" not in out[0]
    md = alpha_table.markdown(out)
    assert "| skip | 25.000 | +25.0% | 0.900 | 0.0100 | 0.900 | 0.250 | 2.5 | 150.0 (150.0, 151.0) | 0.75 | 4.0 |" in md
    assert alpha_table.main(["--labels", "a0,skip", "--ppl", ppl[0]]) == 2
