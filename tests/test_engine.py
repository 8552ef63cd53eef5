"""The offloaded engine against the resident model, and the engine's invariants."""

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import moejax  # noqa: E402
from moejax.engine import ENGINES, OffloadEngine, make_engine  # noqa: E402
from moejax.generate import pad_prompt  # noqa: E402
from moejax.offload.cache import FETCH_MODES, ordered_after  # noqa: E402
from moejax.offload.budget import plan_budget  # noqa: E402
from tiny import hf_config  # noqa: E402

MODELS = {
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", dict(num_hidden_layers=3, mlp_only_layers=[1])),  # a dense layer in between
    "mixtral3": ("mixtral", dict(num_hidden_layers=3)),  # a middle layer that lands prefetches and issues its own
}
POLICIES = ["ondemand", "lru", "lfu", "lru-prefetch", "score", "score-sub", "smoe"]
BUDGETS = ["100%", "50%", "25%", "min"]
NEW = 10


@pytest.fixture(scope="module")
def models(tiny_store):
    out = {}
    for name, (family, over) in MODELS.items():
        _, path, _ = tiny_store(f"engine-{name}", hf_config(family, **over), seed=7)
        out[name] = (path, moejax.load(path))
    return out


def _spec(model, budget, policy, kind="stepwise", batch=1, cache_len=64):
    """A budget: a share of the experts, or "min": the smallest that runs, an absolute size
    for the stepwise engine and a pool of one step's experts for the fused engine (whose
    absolute minimum depends on its compiled programs: test_device_bytes_never_exceed_budget)."""
    cfg = model.config
    if budget == "min" and kind == "fused":
        return ("pct", min(batch * cfg.top_k, cfg.num_experts) / (cfg.num_experts * len(cfg.moe_layer_ids)) + 1e-6)
    if budget == "min":
        itemsize = np.dtype(model.dtype).itemsize
        plan = plan_budget(cfg, itemsize, batch, cache_len, None, prefetch=policy in ("lru-prefetch", "smoe"))
        return ("bytes", plan.min_bytes)
    return ("pct", float(budget[:-1]) / 100)


def _prompt(model, batch=1, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, 7))


def _engine(kind, path, policy, spec, **kw):
    return make_engine(kind, path, policy, spec, cache_len=kw.pop("cache_len", 64), **kw)


# every policy at the tightest budget, and the baseline and the full method at every budget
EXACT = ([(p, "min") for p in POLICIES] + [(p, b) for p in ("lru", "smoe") for b in ("100%", "50%", "25%")])


@pytest.mark.parametrize("policy,budget", EXACT)
@pytest.mark.parametrize("kind", ENGINES)
def test_offloaded_tokens_equal_resident(models, kind, policy, budget):
    """alpha = 0: every policy generates the resident model's tokens at any budget, on both engines."""
    path, model = models["mixtral"]
    prompt = _prompt(model)
    ref = model.generate(prompt, NEW)
    e = _engine(kind, path, policy, _spec(model, budget, policy, kind), alpha=0.0)
    g = e.generate(prompt, NEW)
    assert g.tokens == ref.tokens
    assert e.telemetry.substituted == 0 and 0 < e.telemetry.peak_device_bytes <= e.plan.budget_bytes
    if budget == "min":
        assert e.plan.pool_slots == model.config.top_k
        assert e.telemetry.decode_unique > e.telemetry.decode_hits  # the pool really missed


@pytest.mark.parametrize("policy", ["lru", "smoe"])
def test_dense_layer_shared_expert_and_batch3(models, policy):
    """qwen2_moe with a dense layer between MoE layers and a gated shared expert, batch 3:
    both engines equal the resident model and make the same decisions."""
    path, model = models["qwen2_moe"]
    prompt = _prompt(model, batch=3, seed=2)
    ref = model.generate(prompt, NEW)
    runs = {}
    for kind in ENGINES:
        e = _engine(kind, path, policy, ("pct", 0.75), batch=3, alpha=0.0)
        assert e.generate(prompt, NEW).tokens == ref.tokens, kind
        runs[kind] = e.telemetry.summary()
    assert _decisions(runs["fused"]) == _decisions(runs["stepwise"])


def _decisions(summary):
    keys = ("hit_rate", "substitution_rate", "bytes_h2d", "bytes_h2d_prefill", "transfers", "prefetch_precision")
    return {k: None if summary[k] != summary[k] else summary[k] for k in keys}  # nan -> None


@pytest.mark.parametrize("policy,alpha", [("lru-prefetch", 0.0), ("smoe", 0.5), ("score-sub", 0.5)])
def test_engines_make_the_same_decisions(models, policy, alpha):
    """One definition of the policies: with substitution and prefetch, fused and stepwise
    hit, substitute, fetch and prefetch the same experts and so generate the same tokens."""
    path, model = models["qwen2_moe"]
    prompt = _prompt(model, seed=4)
    out = {}
    for kind in ENGINES:
        e = _engine(kind, path, policy, ("pct", 0.5), alpha=alpha)
        out[kind] = (e.generate(prompt, NEW).tokens, _decisions(e.telemetry.summary()), e.telemetry.substituted, e.telemetry.prefetch_issued)
    assert out["fused"] == out["stepwise"]
    if alpha:
        assert out["fused"][2] > 0


@pytest.mark.parametrize("policy,budget", [("smoe", "min"), ("smoe", "50%"), ("lru-prefetch", "50%")])
def test_fixed_width_prefetch_is_exact_and_shared(models, policy, budget):
    """--prefetch-width: the fused engine's unconditional copies, written into the pool a layer
    later, give the resident tokens with alpha 0; both engines decide the same; every
    prefetch step fills its P slots or counts them idle, and the fused engine's idle copies
    are bytes it moved."""
    path, model = models["mixtral"]  # 2 MoE layers: one prefetch per decode step
    prompt, P = _prompt(model, seed=5), 2
    ref = model.generate(prompt, NEW)
    out = {}
    for kind in ENGINES:
        e = _engine(kind, path, policy, _spec(model, budget, policy, kind), alpha=0.0, prefetch_width=P)
        g = e.generate(prompt, NEW)
        assert g.tokens == ref.tokens, kind
        t = e.telemetry
        assert t.prefetch_issued + t.prefetch_idle == P * len(g.step_s)
        assert t.prefetch_issued > 0 if budget != "min" else t.prefetch_issued == 0  # min: no room beside k
        out[kind] = t
    fused, stepwise = out["fused"], out["stepwise"]
    if budget != "min":  # the logits too, bit for bit, with prefetched experts in use
        assert fused.prefetch_used > 0
        _assert_logits_match_resident(_engine("fused", path, policy, _spec(model, budget, policy, "fused"),
                                              alpha=0.0, prefetch_width=P), model, prompt)
    same = ("decode_hits", "decode_unique", "prefetch_issued", "prefetch_used", "prefetch_idle")
    assert [getattr(fused, k) for k in same] == [getattr(stepwise, k) for k in same]
    assert fused.transfers == stepwise.transfers + stepwise.prefetch_idle


def test_fixed_width_prediction_ranks_all_experts_most_probable_first(models):
    """predict_next with a prefetch width: every expert once, by the highest predicted
    probability over the batch's tokens, so the P first missing ones are the likeliest."""
    import jax.numpy as jnp

    from moejax.fused import predict_next
    from moejax.offload.policies import make_policy

    _, model = models["mixtral"]
    cfg = model.config
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.standard_normal((3, cfg.hidden_size)), jnp.float32)
    router = jnp.asarray(rng.standard_normal((cfg.hidden_size, cfg.num_experts)), jnp.float32)
    pol = make_policy("lru-prefetch", prefetch_width=2)
    rank, valid = predict_next(cfg, pol, (router, None, None), None, h, None, None, None, None, None)
    probs = np.asarray(jax.nn.softmax(np.asarray(h) @ np.asarray(router), axis=-1)).max(axis=0)
    assert sorted(np.asarray(rank).tolist()) == list(range(cfg.num_experts)) and np.asarray(valid).all()
    assert np.all(np.diff(probs[np.asarray(rank)]) <= 0)  # most probable first


def test_prefetch_width_beyond_the_experts_is_an_error(models):
    from moejax.errors import MoejaxError

    path, model = models["mixtral"]
    with pytest.raises(MoejaxError, match="--prefetch-width"):
        _engine("fused", path, "smoe", ("pct", 0.5), prefetch_width=model.config.num_experts + 1)


def test_fused_chunks_stop_where_one_step_per_dispatch_stops(models):
    """The fused engine runs up to CHUNK decode steps per call and ends a call early once every
    row has hit a stop id. Batch 2, smoe at 50%: one row stops at its first token, the other
    inside the second chunk. The tokens, what on_token saw and every decision counter are the
    stepwise engine's (one step per dispatch), so no step ran past the last stop."""
    path, model = models["qwen2_moe"]
    prompt = _prompt(model, batch=2, seed=5)
    free = _engine("stepwise", path, "smoe", ("pct", 0.5), batch=2, alpha=0.5).generate(prompt, 40).tokens
    # row r: a token new at step j, in neither row before; the other row stops on its first token
    r, j = next((r, j) for j in range(17, 31) for r in (0, 1)
                if free[r][j] not in free[r][:j] + free[1 - r][:j + 1] and free[1 - r][0] not in free[r][:j + 1])
    stop = (free[r][j], free[1 - r][0])
    out = {}
    for kind in ENGINES:
        e = _engine(kind, path, "smoe", ("pct", 0.5), batch=2, alpha=0.5)
        seen = []
        g = e.generate(prompt, 40, stop_ids=stop, on_token=seen.append)
        out[kind] = (g.tokens, np.stack(seen).tolist(), _decisions(e.telemetry.summary()), e.telemetry.substituted)
    assert out["fused"] == out["stepwise"]
    assert out["fused"][0][r] == free[r][:j + 1] and len(out["fused"][1]) == j + 1


def _assert_logits_match_resident(e, model, prompt):
    """Teacher-forced: the engine's logits after the prompt and at each of NEW steps are the
    resident model's bit for bit (both are fed the resident model's greedy tokens)."""
    from moejax.generate import decode_step, prefill_step
    from moejax.model.decoder import empty_cache
    import jax.numpy as jnp

    B, T = prompt.shape
    key = jax.random.PRNGKey(0)
    cache = empty_cache(model.config, B, 64, model.dtype)
    tok, ref, cache = prefill_step(model.graphdef, model.state, jnp.asarray(pad_prompt(prompt)), cache,
                                   jnp.int32(T - 1), key, 0.0, 1.0)
    _, ours = e.prefill(pad_prompt(prompt), T, key)
    for i in range(NEW):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
        _, ours = e.step(tok, T + i, key)
        tok, ref, cache = decode_step(model.graphdef, model.state, tok, cache, jnp.int32(T + i), key, 0.0, 1.0)


def test_offloaded_logits_match_resident_batch2(models):
    """Teacher-forced logits at every step, batch 2, 50% budget: the fused engine's are the
    resident model's bit for bit (the same expert arithmetic in the same order)."""
    path, model = models["qwen2_moe"]
    e = _engine("fused", path, "lru", ("pct", 0.5), batch=2)
    _assert_logits_match_resident(e, model, _prompt(model, batch=2, seed=1))
    assert e.telemetry.decode_unique > e.telemetry.decode_hits  # the small pool really missed


@pytest.mark.parametrize("kind", ENGINES)
def test_full_budget_moves_no_bytes_after_warmup(models, kind):
    path, model = models["mixtral"]
    e = _engine(kind, path, "lru", ("pct", 1.0))
    for seed in range(3):
        e.generate(_prompt(model, seed=seed), NEW, warmup=seed == 0)
        assert e.telemetry.bytes_h2d_decode == 0 and e.telemetry.bytes_h2d_prefill == 0 and e.telemetry.transfers == 0
        assert e.telemetry.hit_rate == 1.0


def test_fused_never_recompiles_and_never_copies_the_pool(models):
    """After warm-up the fused engine runs two compiled programs (prefill, decode) whatever
    the cached set, and XLA compiles nothing else; no instruction copies the pool."""
    import jax.monitoring

    path, model = models["mixtral"]  # two MoE layers in a row: the first prefetches for the second
    e = _engine("fused", path, "smoe", ("pct", 0.25), alpha=0.5)
    e.generate(_prompt(model, seed=0), NEW, warmup=True)
    e.generate(_prompt(model, seed=0), NEW)  # eager helpers (counter reset, reads) compile here once
    programs = dict(e.compiled_programs)
    assert len(programs) == 2
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if "backend_compile" in event else None)
    seen = set()
    for seed in range(1, 4):
        e.generate(_prompt(model, seed=seed), NEW)
        seen.add(tuple(np.asarray(e.state["owner"]).tolist()))
    assert len(seen) > 1  # the cached set did change
    assert e.compiled_programs == programs and compiles == []
    # the default fetch mode (loop), the conditional ones and fixed-width prefetch copies
    # (widths 1 and 2: 2 once copied the pool on the CPU; 0: the rule's prefetches copied by the
    # next layer's fetch loop, in a middle layer of three): no program copies the pool
    others = [_engine("fused", path, "smoe", ("pct", 0.25), alpha=0.5, fetch_mode=m) for m in ("cond", "cond-write")]
    others += [_engine("fused", models["mixtral3"][0], "smoe", ("pct", 0.5), alpha=0.5, prefetch_width=w)
               for w in (0, 1, 2)]
    for other in others:
        other.prepare(7)
        assert len(other.compiled_programs) == 2
    assert e.fetch_mode == "loop"
    for engine in (e, *others):
        pool_shape = "[" + ",".join(map(str, engine.pool.shape)) + "]"
        for program in engine.compiled_programs.values():
            copies = [line for line in program.as_text().splitlines()
                      if " copy(" in line and pool_shape in line.split(" copy(")[0]]
            assert copies == [], (engine.fetch_mode, engine.policy.prefetch_width)


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("policy,width", [("lru", 0), ("smoe", 0), ("smoe", 2)])
def test_device_bytes_never_exceed_budget(models, kind, policy, width):
    """An absolute budget at the minimum: the plan holds dense weights, KV cache, staging (the
    fused engine: a scratch slot and its compiled programs' temporaries, measured with
    memory_analysis: with a prefetch width, its copies in flight) and a pool of k experts, and
    the engine's device arrays never exceed it."""
    path, model = models["mixtral"]
    spec = _spec(model, "min", policy, kind)
    if kind == "fused":  # the smallest budget that holds the programs' temporaries and k experts
        probe = _engine(kind, path, policy, spec, prefetch_width=width)
        probe.generate(_prompt(model), 2)
        assert probe.plan.program_bytes > 0 and probe.plan.pool_slots == model.config.top_k
        spec = ("bytes", probe.plan.budget_bytes)
    e = _engine(kind, path, policy, spec, prefetch_width=width)
    step = e.step

    def checked(*a, **k):
        out = step(*a, **k)
        assert e.device_bytes() <= e.plan.budget_bytes
        return out

    e.step = checked
    e.generate(_prompt(model), NEW)
    assert 0 < e.telemetry.peak_device_bytes <= e.plan.budget_bytes <= spec[1]
    assert e.plan.pool_slots == model.config.top_k


@pytest.mark.parametrize("kind", ENGINES)
def test_ondemand_moves_k_experts_per_layer_per_step(models, kind):
    path, model = models["mixtral"]
    cfg = model.config
    e = _engine(kind, path, "ondemand", ("pct", 1.0))
    g = e.generate(_prompt(model), NEW)
    steps = len(g.tokens[0]) - 1
    assert e.telemetry.transfers == steps * len(cfg.moe_layer_ids) * cfg.top_k
    assert e.telemetry.bytes_h2d_decode == e.telemetry.transfers * e.store.expert_bytes
    assert e.telemetry.hit_rate == 0.0


def test_substitution_raises_hit_rate_and_keeps_k(models):
    path, model = models["qwen2_moe"]
    prompt = _prompt(model, seed=4)
    runs = {}
    for policy, alpha in (("lru", 0.0), ("smoe", 0.5)):
        e = _engine("fused", path, policy, ("pct", 0.5), alpha=alpha)
        g = e.generate(prompt, NEW)
        runs[policy] = e.telemetry
        assert len(g.tokens[0]) == NEW
    assert runs["smoe"].substituted > 0
    assert runs["smoe"].routed == runs["lru"].routed  # k experts per token, substituted or not
    assert runs["smoe"].hit_rate > runs["lru"].hit_rate


def test_slow_emulated_link_stays_exact_and_drops_stale_prefetches(models):
    from moejax.offload.store import parse_link

    path, model = models["mixtral"]
    prompt = _prompt(model, seed=5)
    ref = model.generate(prompt, NEW)
    e = OffloadEngine(path, "lru-prefetch", ("pct", 0.5), cache_len=64, link=parse_link("emulated:2MB/s,50us"))
    assert e.generate(prompt, NEW).tokens == ref.tokens
    assert e.telemetry.peak_device_bytes <= e.plan.budget_bytes
    # the drop rule itself, driven by hand: three prefetches queue on a slow link for layer 1;
    # the real scores then need only expert 4, so the queued ones for 2 and 3 are dropped
    e = OffloadEngine(path, "lru-prefetch", ("pct", 0.5), cache_len=64, link=parse_link("emulated:1kB/s,1ms"))
    for slot, expert in enumerate((4, 2, 3)):
        e.state = {**e.state, "table": e.state["table"].at[1, expert].set(slot),
                   "owner": e.state["owner"].at[slot].set(1 * model.config.num_experts + expert)}
        e._load(1, expert, slot, "prefetch")
    e._drop_stale_prefetches(1, 1, np.array([[4, 5]], np.int32))
    assert e.telemetry.prefetch_dropped == 2
    assert np.nonzero(np.asarray(e.state["table"][1]) >= 0)[0].tolist() == [4]  # started first: kept


@pytest.fixture(scope="module")
def bf16_model(models, tmp_path_factory):
    from moejax.convert import convert

    hf_dir = models["mixtral"][0].parent / "engine-mixtral-hf"
    out = tmp_path_factory.mktemp("bf16") / "mj"
    convert(hf_dir, out, dtype="bfloat16", progress=False)
    return out, moejax.load(out)


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("policy,width", [("lru", 0), ("smoe", 0), ("smoe", 2)])
def test_bfloat16_offloaded_tokens_equal_resident(bf16_model, kind, policy, width):
    """In bfloat16 too: the engines' prefill and decode round exactly as the resident model's
    (width: --prefetch-width)."""
    path, model = bf16_model
    assert model.dtype == jax.numpy.bfloat16
    prompt = _prompt(model, seed=6)
    ref = model.generate(prompt, NEW)
    e = _engine(kind, path, policy, _spec(model, "min", policy, kind), alpha=0.0, prefetch_width=width)
    assert e.generate(prompt, NEW).tokens == ref.tokens


@pytest.mark.parametrize("kind", ENGINES)
def test_pool_split_per_layer_must_hold_one_step(models, kind):
    from moejax.errors import MoejaxError

    path, model = models["mixtral"]  # 2 MoE layers x 6 experts, top-2: 25% = 3 slots, 1 per layer
    with pytest.raises(MoejaxError, match="one step needs 2"):
        _engine(kind, path, "lru", ("pct", 0.25), per_layer=True)


def test_ordered_after_keeps_the_slots_whatever_the_reads_hold():
    """The dependency ordered_after adds (test_fused_never_recompiles_and_never_copies_the_pool:
    it keeps XLA from copying the pool) is false at run time for any value, NaN and inf included."""
    import jax.numpy as jnp

    slots = jnp.array([3, 0, 7], jnp.int32)
    reads = (jnp.array([[1.0, -2.0], [jnp.nan, jnp.inf]]), jnp.array([-jnp.inf, 0.0], jnp.bfloat16),
             jnp.array([5, -1]), jnp.array([True, False]))
    out = jax.jit(ordered_after)(slots, *reads)
    assert out.dtype == slots.dtype and out.tolist() == [3, 0, 7]


def test_fetch_modes_make_the_same_run(models):
    """cond, cond-write, loop (the default) and always differ only in how the copies run:
    same tokens and decisions, and the resident model's tokens at alpha 0."""
    path, model = models["mixtral"]
    prompt = _prompt(model, seed=7)
    ref = model.generate(prompt, NEW)
    runs = set()
    for mode in FETCH_MODES:
        e = _engine("fused", path, "smoe", ("pct", 0.4), alpha=0.0, fetch_mode=mode)
        g = e.generate(prompt, NEW)
        assert g.tokens == ref.tokens, mode
        runs.add((str(g.tokens), e.telemetry.transfers, e.telemetry.decode_hits, e.telemetry.prefetch_issued))
    assert len(runs) == 1 and e.telemetry.transfers > 0


def test_step_inventory_counts_conditionals_and_loops_in_the_step_loop():
    """scripts/fetch_modes.py's count of what makes a GPU wait for the host in one decode step:
    the conditionals and while loops inside the step loop (outlined calls followed), none outside."""
    import sys
    from pathlib import Path

    from jax import lax
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from fetch_modes import parse_hlo, step_inventory

    def steps(x, n):  # named as the fused engine's decode function
        def body(i, c):
            c = lax.cond(c.sum() > 0, lambda c: c * 2, lambda c: c + 1, c)
            return lax.fori_loop(0, n, lambda j, c: c + j, c)  # traced bound: a while loop
        x = lax.cond(x.sum() > 0, lambda x: x - 1, lambda x: x, x)  # before the step loop: not counted
        return lax.fori_loop(0, n, body, x)

    inv = step_inventory(parse_hlo(jax.jit(steps).lower(jnp.ones(4), 3).compile().as_text()))
    assert (inv["conditionals"], inv["loops"]) == (1, 1)
    assert inv["host_waits_without_graphs"] == "2 + loop iterations"
