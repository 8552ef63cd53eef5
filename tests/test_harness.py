"""moejax as a model of lm-evaluation-harness (moejax.eval.harness), on a local task: the
harness's accuracy equals `moejax eval tasks` on the same examples. No network: the task is a
YAML config over a JSONL file written here, read with the datasets library offline."""

import importlib.util
import json

import numpy as np
import pytest

if importlib.util.find_spec("lm_eval") is None:  # the `lm-eval` extra
    pytest.skip("lm-eval is not installed (pip install -e '.[lm-eval]')", allow_module_level=True)
pytest.importorskip("torch")
pytest.importorskip("transformers")

EXAMPLES = [
    {"input": "Where do the experts live?", "target_scores": {"in host memory": 1, "on the device": 0}},
    {"input": "What keeps the experts?", "target_scores": {"a cache": 1, "the lazy dog": 0, "a fox": 0}},
    {"input": "The quick brown fox", "target_scores": {"jumps over": 1, "sleeps": 0}},
    {"input": "A scheduler decides which experts to", "target_scores": {"fetch": 1, "ignore": 0, "paint": 0}},
    {"input": "Mixture-of-Experts models route every", "target_scores": {"apple": 0, "token": 1}},
    {"input": "The device cannot hold every", "target_scores": {"expert": 1, "dog": 0, "cache": 0}},
]
TASK = {"name": "local_mc", "description": "", "keywords": [], "metrics": ["multiple_choice_grade"],
        "task_prefix": "Experts move to the device.\n", "append_choices_to_input": False, "examples": EXAMPLES}
YAML = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: target
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moejax.convert import convert
    from moejax.eval import tasks as T
    from tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("harness")
    convert(make_tiny_hf(root / "hf"), root / "mj", progress=False)
    (root / "task.json").write_text(json.dumps(TASK))
    # the same examples as the harness sees them: BIG-bench's context, the choices, the correct one
    rows = [{"context": e.context, "choices": e.choices, "target": int(np.argmax(e.scores))}
            for e in T.load_tasks(root / "task.json")[0].examples]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks").mkdir()
    (root / "tasks" / "local_mc.yaml").write_text(YAML.format(data=root / "data.jsonl"))
    return root


def _harness(root, monkeypatch, model_args):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "datasets-cache"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    import moejax.eval.harness  # noqa: F401  (registers "moejax")

    out = lm_eval.simple_evaluate(model="moejax", model_args=model_args, tasks=["local_mc"], num_fewshot=0,
                                  task_manager=TaskManager(include_path=str(root / "tasks")), bootstrap_iters=0)
    return out["results"]["local_mc"]


def _ours(root, tmp_path, *argv):
    from moejax.cli import main

    out = tmp_path / f"ours{len(list(tmp_path.glob('ours*')))}.json"
    assert main(["eval", "tasks", str(root / "task.json"), "--model", str(root / "mj"), *argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())["tasks"][0]


@pytest.mark.parametrize("args,argv", [
    ({"policy": "resident"}, ["--policy", "resident"]),
    ({"vram_budget": "25%", "alpha": 0.0}, ["--vram-budget", "25%", "--alpha", "0"]),  # offloaded, fused
])
def test_harness_accuracy_equals_moejax_eval_tasks(setup, tmp_path, monkeypatch, args, argv):
    res = _harness(setup, monkeypatch, {"path": str(setup / "mj"), **args})
    ours = _ours(setup, tmp_path, *argv)
    assert ours["n"] == len(EXAMPLES)
    assert res["acc,none"] == pytest.approx(ours["acc"])
    assert res["acc_norm,none"] == pytest.approx(ours["acc_per_char"])  # the harness's acc_norm: per character


def test_rolling_and_generation(setup):
    import moejax
    from moejax.eval.harness import MoejaxLM
    from moejax.eval.ppl import log_softmax

    lm = MoejaxLM(path=str(setup / "mj"), policy="resident")
    text = "A cache keeps the experts that are likely to be used again."
    req = type("R", (), {"args": (text,)})()
    got = lm.loglikelihood_rolling([req])[0]
    m = moejax.load(setup / "mj")
    ids = m.tokenizer.encode(text, add_special_tokens=False).ids
    logp = log_softmax(m.forward(np.array([[lm.eot, *ids]]))[0].astype(np.float64))
    assert got == pytest.approx(sum(logp[j, t] for j, t in enumerate(ids)), abs=1e-4)
    gen = type("R", (), {"args": ("The experts", {"until": ["\n"], "max_gen_toks": 5}),})()
    out = lm.generate_until([gen])[0]
    assert isinstance(out, str) and "\n" not in out
