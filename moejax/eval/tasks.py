"""Multiple-choice tasks (`moejax eval tasks`): BIG-bench JSON tasks scored by the
log-likelihood of each choice given the context, through the resident model or an offloaded
engine (docs/accuracy.md, "Multiple-choice tasks").

Reading (BIG-bench's `json_task.py`, zero-shot): an example's context is
task_prefix + example_input_prefix + input [+ choice_prefix + choice_prefix.join(choices in
BIG-bench's permutation) when append_choices_to_input] + example_output_prefix, with BIG-bench's
defaults ("", "\\nQ: ", "\\n  choice: ", True, "\\nA: "); its choices are the keys of
"target_scores" and its grade is the score of the choice the model ranks first (ties: the
first), so accuracy is the mean grade and chance the mean of each example's mean score.

Tokens (as lm-evaluation-harness's `_encode_pair`): whitespace ending the context moves to the
front of the continuation, the two are encoded together and the context's own tokens are split
off, so "A: yes" is scored as the tokens of "A:" then " yes".

Scoring, decode mode as `eval ppl` (moejax.eval.ppl): the first `prefix` tokens of the context
are prefilled, the rest of the context and then each choice go through one decode step per
token, so the pool, substitution and skipping act on the context (through the KV cache) as on
the choice. The context is computed once per example and shared by its choices: each choice
is decoded from the end of the context, overwriting the cache slots of the choice before it.
An offloaded engine is never reset between choices, examples or tasks, so its pool and
scheduler state evolve as in a server that decodes one request after another.

The resident model with the whole context prefilled (prefix None, `--prefix all`) has nothing
to act per token, so it takes a faster path with the same log-likelihoods (score_prefilled):
the context in one call, then every choice in one batched call, both padded to a few bucket
lengths so that a run compiles few programs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError

INPUT_PREFIX, OUTPUT_PREFIX, CHOICE_PREFIX = "\nQ: ", "\nA: ", "\n  choice: "  # BIG-bench's defaults
SEED = 42  # BIG-bench's, for the order of choices appended to the input


@dataclass
class Example:
    context: str
    choices: list[str]
    scores: list[float]  # target_scores, in the order of choices


@dataclass
class Task:
    name: str
    path: Path
    examples: list[Example] = field(default_factory=list)

    @property
    def chance(self) -> float:
        """The expected grade of a uniformly random choice (BIG-bench's low score)."""
        return float(np.mean([np.mean(e.scores) for e in self.examples])) if self.examples else float("nan")


def _read_json(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise MoejaxError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise MoejaxError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MoejaxError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise MoejaxError(f"{path} is not a BIG-bench task (a JSON object with \"examples\")")
    return data


def format_example(task: dict, example: dict) -> Example | None:
    """One BIG-bench example as (context, choices, scores), or None if it is not multiple choice."""
    scores = example.get("target_scores") if isinstance(example, dict) else None
    if not isinstance(scores, dict) or not scores or not isinstance(example.get("input"), str):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
        return None
    text = example["input"]
    if task.get("append_choices_to_input", True):
        prefix = str(task.get("choice_prefix", CHOICE_PREFIX))
        order = np.random.RandomState(seed=SEED).permutation(sorted(scores))
        text = text + prefix + prefix.join(order)
    context = (str(task.get("task_prefix", "")) + str(task.get("example_input_prefix", INPUT_PREFIX)) + text
               + str(task.get("example_output_prefix", OUTPUT_PREFIX)))
    return Example(context, list(scores), [float(v) for v in scores.values()])


def read_task(path: Path, name: str | None = None) -> list[Task]:
    """A task.json -> its task, or its subtasks (a task.json without examples whose directory
    holds <subtask>/task.json, as BIG-bench lays them out), named task:subtask."""
    data = _read_json(path)
    name = name or str(data.get("name") or path.parent.name)
    if "examples" not in data:
        subs = sorted(path.parent.glob("*/task.json"))
        return [t for sub in subs for t in read_task(sub, f"{name}:{sub.parent.name}")]
    if not isinstance(data["examples"], list):
        raise MoejaxError(f"{path}: \"examples\" is not a list")
    examples = [e for e in (format_example(data, x) for x in data["examples"]) if e is not None]
    return [Task(name, path, examples)]


def load_tasks(path, names: list[str] | None = None, limit: int | None = None, skip: int = 0) -> list[Task]:
    """BIG-bench tasks from a task.json, a task's directory or a directory of task directories
    (e.g. bigbench/benchmark_tasks); only tasks with multiple-choice examples (target_scores).
    names: keep these (a task, or task:subtask); skip, limit: leave out the first `skip`
    examples of each, then keep the next `limit` (so a long run can go in parts)."""
    p = Path(path)
    if not p.exists():
        raise MoejaxError(f"{path}: no such file or directory")
    if p.is_file():
        found = read_task(p)
    elif (p / "task.json").is_file():
        found = read_task(p / "task.json")
    else:
        files = sorted(p.glob("*/task.json"))
        if names:  # read the named tasks only (BIG-bench's directory holds 1.3 GB of JSON)
            wanted = {n.split(":")[0] for n in names}
            files = [f for f in files if f.parent.name in wanted] or files
        if not files:
            raise MoejaxError(f"{path} holds no task.json (expected a BIG-bench task or a directory of tasks)")
        found = [t for f in files for t in read_task(f)]
    if names:
        known = {t.name for t in found}
        missing = [n for n in names if n not in known and not any(k.startswith(n + ":") for k in known)]
        if missing:
            raise MoejaxError(f"--tasks {', '.join(missing)}: not found in {path}")
        found = [t for t in found if t.name in names or t.name.split(":")[0] in names]
        empty = [t.name for t in found if not t.examples]
        if empty:
            raise MoejaxError(f"--tasks {', '.join(empty)}: no multiple-choice examples (with target_scores)")
    found = [t for t in found if t.examples]
    if not found:
        raise MoejaxError(f"{path} has no multiple-choice examples (examples with \"target_scores\")")
    for t in found:
        t.examples = t.examples[skip:skip + limit] if limit else t.examples[skip:]
    short = [t.name for t in found if not t.examples]
    if short and (names or len(short) == len(found)):  # unnamed tasks shorter than skip are left out
        raise MoejaxError(f"--skip {skip} leaves no examples of {', '.join(short)}")
    return [t for t in found if t.examples]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """-> (context ids, continuation ids), as lm-evaluation-harness splits them: trailing
    whitespace of the context moves to the continuation, both are encoded together, and the
    context's own encoding is split off the front."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    ctx = tokenizer.encode(context, add_special_tokens=False).ids
    return whole[: len(ctx)], whole[len(ctx):]


def _log_softmax(logits) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def score_choices(steps, context: list[int], continuations: list[list[int]], prefix: int | None) -> list[float]:
    """Sum of log-probabilities of each continuation's tokens after the context, in decode
    mode (module docstring). steps: an engine (or ppl._ResidentSteps) with prefill/step;
    prefix: context tokens prefilled (None: all of them)."""
    return [ll for ll, _ in score_continuations(steps, context, continuations, prefix)]


def score_continuations(steps, context, continuations, prefix: int | None) -> list[tuple[float, bool]]:
    """score_choices, each with whether every continuation token is the argmax (greedy)."""
    import jax

    from moejax.eval.ppl import _ResidentSteps
    from moejax.generate import pad_prompt

    if prefix is None and isinstance(steps, _ResidentSteps):
        return score_prefilled(steps.model, context, continuations, cache_len=steps.cache[0][0].shape[1])
    ctx = np.asarray(context, np.int32)
    P = len(ctx) if prefix is None else max(1, min(prefix, len(ctx)))
    key = jax.random.PRNGKey(0)
    if hasattr(steps, "prepare"):  # the fused engine: its one-step decode program (not generate's chunks)
        steps.prepare(P, chunk=1)
    _, logits = steps.prefill(pad_prompt(ctx[None, :P]), P, key)
    for t in range(P, len(ctx)):
        _, logits = steps.step(ctx[t:t + 1], t, key)
    base = np.asarray(logits)
    out = []
    for cont in continuations:
        total, greedy, logits = 0.0, True, base
        for j, tok in enumerate(cont):
            if j:
                _, logits = steps.step(np.asarray(cont[j - 1:j], np.int32), len(ctx) + j - 1, key)
            logp = _log_softmax(logits).reshape(-1)
            total += float(logp[tok])
            greedy = greedy and int(np.argmax(logp)) == tok
        out.append((total, greedy))
    return out


def bucket(n: int, base: int = 16) -> int:
    """The padded length of n tokens: the smallest of base * (1, 2, 3, 4, 6, 8, 12, 16, 24, ...)
    (powers of two and 1.5 times them) that holds n, so a run compiles about 2 log2(longest /
    base) programs per shape; beyond 2 base tokens, padding adds less than half of n."""
    p = base
    while True:
        for size in (p, p * 3 // 2) if p > base else (p,):
            if size >= n:
                return size
        p *= 2


def _jits():
    """The two programs of score_prefilled (built on first use: jax is imported lazily)."""
    global _PREFILL, _EXTEND
    if "_PREFILL" in globals():
        return _PREFILL, _EXTEND
    from functools import partial

    import jax
    import jax.numpy as jnp
    from flax import nnx

    @partial(jax.jit, static_argnums=(0,))
    def prefill(graphdef, state, tokens, cache, last):
        """The padded context [1, Tp] from position 0 -> logits at index last [1, V], cache."""
        dec = nnx.merge(graphdef, state)
        x, cache = dec.hidden(tokens, cache, jnp.int32(0))
        return dec.logits(jax.lax.dynamic_index_in_dim(x, last, axis=1, keepdims=False)), cache

    @partial(jax.jit, static_argnums=(0,))
    def extend(graphdef, state, tokens, cache, pos):
        """Choices [n, Tc] (padded) after the context in cache [1, S] -> logits [n, Tc, V]."""
        dec = nnx.merge(graphdef, state)
        cache = jax.tree.map(lambda c: jnp.broadcast_to(c, (tokens.shape[0], *c.shape[1:])), cache)
        return dec.logits(dec.hidden(tokens, cache, pos)[0])

    _PREFILL, _EXTEND = prefill, extend
    return prefill, extend


def score_prefilled(model, context, continuations, buckets=bucket, cache_len: int = 0) -> list[tuple[float, bool]]:
    """score_continuations of the resident model with the whole context prefilled (prefix
    None), in two calls: the context padded to buckets(len) (logits at its last token only),
    then every choice but its last token at once, one row each, padded to buckets(longest, 4),
    on copies of the context's KV cache. Padding sits after the real tokens, so causal attention keeps it
    out of their logits, and a cache slot is only read by queries at or after its position:
    the same log-likelihoods as decode mode, in a number of compiled programs bounded by the
    buckets instead of one per context length. The KV cache holds buckets(cache_len) positions,
    or more where an example needs them, so that a run's examples share one cache length."""
    from moejax.model.decoder import empty_cache

    prefill, extend = _jits()
    ctx = np.asarray(context, np.int32)
    T, conts = len(ctx), [list(c) for c in continuations]
    Tp, Tc = buckets(T), buckets(max(len(c) for c in conts) - 1, 4)  # a choice's last token is not fed
    S = buckets(max(cache_len, Tp, T + Tc))
    cache = empty_cache(model.config, 1, S, model.dtype)
    tokens = np.zeros((1, Tp), np.int32)
    tokens[0, :T] = ctx
    base, cache = prefill(model.graphdef, model.state, tokens, cache, np.int32(T - 1))
    rows = [np.asarray(base)[0]] * len(conts)  # the logits of each choice's first token
    if max(len(c) for c in conts) > 1:
        tokens = np.zeros((len(conts), Tc), np.int32)
        for i, c in enumerate(conts):
            tokens[i, :len(c) - 1] = c[:-1]
        logits = np.asarray(extend(model.graphdef, model.state, tokens, cache, np.int32(T)))
        rows = [np.concatenate([rows[i][None], logits[i, :len(c) - 1]]) for i, c in enumerate(conts)]
    out = []
    for c, lg in zip(conts, rows):
        if not c:  # an empty continuation: probability 1, as in decode mode
            out.append((0.0, True))
            continue
        logp = _log_softmax(np.reshape(lg, (len(c), -1)))
        picked = logp[np.arange(len(c)), c]
        out.append((float(picked.sum()), bool((logp.argmax(axis=1) == c).all())))
    return out


def picks(ll: list[float], ntok: list[int], nchar: list[int]) -> dict[str, int]:
    """The choice one example's model ranks first under each ranking: raw sum, per token, per
    character (ties: the first)."""
    ll = np.asarray(ll, np.float64)
    ranks = {"acc": ll, "acc_per_token": ll / np.maximum(ntok, 1), "acc_per_char": ll / np.maximum(nchar, 1)}
    return {k: int(np.argmax(v)) for k, v in ranks.items()}


def grades(ll: list[float], ntok: list[int], nchar: list[int], scores: list[float]) -> dict[str, float]:
    """The grade of one example under each ranking: the score of its first-ranked choice."""
    return {k: float(scores[i]) for k, i in picks(ll, ntok, nchar).items()}


@dataclass
class Prepared:
    """A task's examples as token ids (contexts cut from the left to fit the model's context)."""

    task: Task
    contexts: list[list[int]]
    continuations: list[list[list[int]]]

    @property
    def longest(self) -> int:
        return max(len(c) + max(len(x) for x in conts) for c, conts in zip(self.contexts, self.continuations))


def prepare(task: Task, tokenizer, max_len: int, fallback_id: int = 0) -> Prepared:
    contexts, continuations = [], []
    for ex in task.examples:
        pairs = [encode_pair(tokenizer, ex.context, c) for c in ex.choices]
        ctx = pairs[0][0]  # the same context for every choice
        conts = [p[1] for p in pairs]
        room = max_len - max(len(c) for c in conts)
        ctx = ctx[-room:] if room > 0 else ctx[-1:]
        contexts.append(ctx or [fallback_id])  # an empty context: one end-of-text token, as the harness
        continuations.append(conts)
    return Prepared(task, contexts, continuations)


def _counters(engine) -> dict[str, int]:
    import jax

    return {k: int(v) for k, v in jax.device_get(engine.state["counters"]).items()}


def _rates(before: dict, after: dict) -> dict[str, float]:
    d = {k: after[k] - before[k] for k in after}
    return {"hit_rate": d["hits"] / d["unique"] if d["unique"] else float("nan"),
            "substitution_rate": d["substituted"] / d["routed"] if d["routed"] else 0.0,
            "skip_rate": d["skipped"] / d["routed"] if d["routed"] else 0.0}


def evaluate_task(steps, prepared: Prepared, prefix: int | None, engine=None, progress: bool = True) -> dict:
    """Score every example of a task -> its row: accuracies, chance, n, the engine's hit,
    substitution and skip rates over this task, and each example's log-likelihoods."""
    import time

    from tqdm.auto import tqdm

    task = prepared.task
    before = _counters(engine) if engine is not None else None
    t0 = time.perf_counter()
    rows, sums = [], {"acc": 0.0, "acc_per_token": 0.0, "acc_per_char": 0.0}
    it = zip(task.examples, prepared.contexts, prepared.continuations)
    for ex, ctx, conts in tqdm(list(it), desc=task.name, unit="ex", disable=not progress):
        ll = score_choices(steps, ctx, conts, prefix)
        g = grades(ll, [len(c) for c in conts], [len(c) for c in ex.choices], ex.scores)
        for k in sums:
            sums[k] += g[k]
        rows.append({"ll": ll, "tokens": [len(c) for c in conts], "chars": [len(c) for c in ex.choices],
                     "scores": ex.scores})
    n = len(rows)
    result = {"task": task.name, "path": str(task.path), "n": n, "chance": task.chance,
              **{k: v / n for k, v in sums.items()}, "seconds": time.perf_counter() - t0}
    if engine is None:
        result.update(hit_rate=1.0, substitution_rate=0.0, skip_rate=0.0)
    else:
        result.update(_rates(before, _counters(engine)))
    result["examples"] = rows
    return result


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| task | n | chance | acc | acc (per token) | acc (per char) | hit rate | subst. rate | skip rate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['n']} | {r['chance']:.3f} | {r['acc']:.3f} | {r['acc_per_token']:.3f} | "
                     f"{r['acc_per_char']:.3f} | {r['hit_rate']:.3f} | {r['substitution_rate']:.3f} | "
                     f"{r['skip_rate']:.3f} |")
    return "\n".join(lines)
