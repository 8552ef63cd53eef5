"""The fused offloaded engine: one XLA program per decode step, one per prompt (prefill).

Routed experts stay in host memory (one pinned_host stack per MoE layer) and are program
arguments. Inside the program, per MoE layer: attention, router, importance and
substitution, the policy's plan (`offload.decisions`: hits, evictions, slots), the fetches
of missing experts into the donated device pool (`cache.write_fetches`: a dynamic slice of
the host stack + device_put per missing expert, by default in a loop over the layer's misses,
so that a resident expert moves no bytes),
the expert compute from the pool, and for prefetching policies the next layer's prediction
and its prefetches (queued for the next layer's fetch loop, or with a fixed prefetch width
copied by unconditional copies that overlap compute). Then the LM head and sampling. The host
sends a token and gets the next one; decision state and telemetry counters stay on the device
and are read once per run.

Layers are unrolled in Python (no scan over layers with host slices). Programs are compiled
ahead of time, once per engine and sampling setting (prefill: once per padded prompt
length), so `compiled_programs` is all that ever compiles; memory_analysis() of each sizes
the budget. Exactness: the same functions as the resident model compute the experts
(`moe.experts_indexed` for decode, `moe.experts_ordered` for prefill), in the same order.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.errors import MoejaxError
from moejax import generate
from moejax.generate import NO_HOIST, OffloadedGeneration, sample, step_loop
from moejax.metrics import Telemetry
from moejax.model import layers as L
from moejax.model import moe
from moejax.model.decoder import Decoder, empty_cache, rope
from moejax.offload import decisions as D
from moejax.offload.budget import BudgetPlan, plan_budget
from moejax.offload.cache import DEFAULT_FETCH_MODE, fetch_block, land, new_pool, ordered_after, write_fetches
from moejax.offload.importance import SIMILARITY_MODES, classify
from moejax.offload.store import Parts
from moejax.offload.policies import check_width, make_policy


def predict_next(cfg, policy, nxt, x, h, dense, pool, slots, hit, weights):
    """The next MoE layer's experts as a prefetching policy predicts them -> (ids [M], valid [M]).

    nxt: (router, selection bias or None, MLP norm) of the next layer. "next-layer-gate"
    (mixtral-offloading): its router on this layer's MLP input h [N, H], top-k. "top-score"
    (docs/method.md 4): its router on an approximate hidden state, residual x + dense/shared
    output + the output of this layer's experts that were already on the device (hit [N, k],
    at pool slots [N, k]); valid = predicted top-score.
    With a fixed prefetch width (policy.prefetch_width): all E experts ranked by their highest
    predicted importance over the tokens (ties to the lower id), all valid."""
    router, bias, norm = nxt
    gate = policy.prefetch == "next-layer-gate"
    if not gate:
        h = L.rms_norm(x.reshape(h.shape) + dense + moe.experts_indexed(
            h, pool, jnp.where(hit, slots, 0), jnp.where(hit, weights, 0.0), cfg.quant), norm, cfg.rms_norm_eps)
    scores, _, idx = moe.route(cfg, h, router, bias)
    if policy.prefetch_width:
        rank = jnp.argsort(-moe.importance(scores, cfg.router).max(axis=0), stable=True).astype(jnp.int32)  # [E]
        return rank, jnp.ones(rank.shape, bool)
    top = jnp.ones(idx.shape, bool) if gate else classify(moe.importance(scores, cfg.router), idx, policy.alpha)[1]
    return idx.reshape(-1), top.reshape(-1)


def attend_route(layer, x, kv, pos, cos, sin):
    """A MoE layer up to its router: x [B, T, H] -> (x after attention, new kv, MLP input h
    [N, H], dense/shared output [N, H], router scores [N, E], top-k weights and ids [N, k])."""
    B, T, H = x.shape
    a, kv = layer.attention(x, kv, pos, cos, sin)
    x = x + a
    h = layer.mlp_input(x.reshape(B * T, H))
    return x, kv, h, layer.dense_output(h), *layer.route(h)


def next_layer(layers, i):
    """(router, bias, MLP norm) of layer i + 1, as predict_next takes them."""
    nxt = layers[i + 1]
    return nxt.router[...], None if nxt.router_bias is None else nxt.router_bias[...], nxt.mlp_norm[...]


class PackedState:
    """The decision state (`decisions.init_state`: a dict of 17 small arrays) as ONE int32
    vector at the programs' boundary: each argument and result buffer costs the call ~5 µs on
    2 CPU cores (~90 µs a step for the dict), one vector costs one. Inside a program the state
    is the dict again. float32 leaves travel bit-cast and bools as 0/1, so nothing is rounded."""

    def __init__(self, example: dict):
        leaves, self.treedef = jax.tree.flatten(example)
        self.shapes = [np.shape(x) for x in leaves]
        self.dtypes = [np.dtype(x.dtype) for x in leaves]
        bad = [d for d in self.dtypes if d not in (np.int32, np.float32, np.bool_)]
        if bad:
            raise TypeError(f"cannot pack decision state of dtypes {bad}")
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = np.cumsum([0, *self.sizes]).tolist()

    def pack(self, state, xp=jnp):
        """dict -> int32 [n] (xp: jnp inside a program, np on the host)."""
        def word(x, dt):
            x = xp.asarray(x)
            if dt == np.float32:
                return x.view(np.int32) if xp is np else jax.lax.bitcast_convert_type(x, jnp.int32)
            return x.astype(np.int32)
        return xp.concatenate([word(x, dt).reshape(-1) for x, dt in zip(jax.tree.leaves(state), self.dtypes)])

    def unpack(self, vec, xp=jnp) -> dict:
        def leaf(i):
            x = vec[self.offsets[i]:self.offsets[i + 1]].reshape(self.shapes[i])
            if self.dtypes[i] == np.float32:
                return x.view(np.float32) if xp is np else jax.lax.bitcast_convert_type(x, jnp.float32)
            return x != 0 if self.dtypes[i] == np.bool_ else x
        return jax.tree.unflatten(self.treedef, [leaf(i) for i in range(len(self.sizes))])


class FusedEngine(OffloadedGeneration):
    """Runs a converted checkpoint with its routed experts in host memory and a device expert
    pool sized by `budget` (a parsed --vram-budget; None = every expert fits), one XLA
    program per step. Same interface as the stepwise `moejax.engine.OffloadEngine`."""

    engine_name = "fused"

    def __init__(self, path: str | Path, policy: str = "lru", budget=None, batch: int = 1,
                 cache_len: int = 256, per_layer: bool = False, alpha: float = 0.0, substitute: str = "window",
                 similarity: dict[int, np.ndarray] | None = None, score_window: int = 16,
                 parts: Parts | None = None, link=None, fetch_mode: str | None = None,
                 xla_options: dict | None = None, prefetch_width: int = 0):
        from moejax.offload.store import Link, load_parts

        cfg, glob, layers, self.store = parts or load_parts(Path(path))
        if self.store.memory_kind != "pinned_host":
            raise MoejaxError("the fused engine needs pinned_host memory on this backend; use --engine stepwise")
        self.config, self.batch, self.cache_len = cfg, batch, cache_len
        self.device = jax.devices()[0]
        self.fetch_mode = fetch_mode or DEFAULT_FETCH_MODE  # cache.write_fetches
        self.xla_options = dict(xla_options or {})  # added to every program's compiler options
        self.policy_name, self.link = policy, link or Link()
        self.policy = make_policy(policy, alpha, substitute, score_window, check_width(prefetch_width, cfg))
        self.module = Decoder(cfg, glob, layers, offloaded=True)  # dense weights -> device
        self.dtype = self.module.dtype
        self.graphdef, self.params = nnx.split(self.module)
        # programs take the flat leaves: flattening an nnx.State per call costs ~0.5 ms of Python
        self._param_leaves, self._param_def = jax.tree.flatten(self.params)
        self.moe_ids = list(cfg.moe_layer_ids)
        self.stacks = tuple(self.store.stacks[i] for i in self.moe_ids)  # [E, 3, H, I] (or [E, B]) each, pinned_host
        self.similarity = (None if self.policy.mode not in SIMILARITY_MODES or not similarity else
                           jnp.asarray(np.stack([similarity[i] for i in self.moe_ids]), jnp.float32))
        self._dense_bytes = sum(x.nbytes for x in jax.tree.leaves(self.params))
        self._budget, self.per_layer = budget, per_layer
        self.compiled_programs: dict = {}
        self.compile_s = 0.0
        self._chunk = None  # decode steps per call of the program prepare() compiled (None: generate.CHUNK)
        self._build(plan_budget(cfg, np.dtype(self.dtype).itemsize, batch, cache_len, budget, staging=1))

    # ---- state --------------------------------------------------------------------------
    def _build(self, plan: BudgetPlan) -> None:
        self.plan, self._program_bytes = plan, 0
        self.layout = D.Layout(len(self.moe_ids), self.config.num_experts, plan.pool_slots, self.per_layer)
        self.layout.check(min(self.batch * self.config.top_k, self.config.num_experts))
        self.compiled_programs = {}
        self.full = plan.pool_slots == plan.total_experts and self.policy.reuse  # nothing is ever evicted
        # Each MoE layer is a nested jit, so Python traces and lowers its body once for all
        # layers (XLA inlines the calls: the compiled program is the same unrolled one).
        self._decode_layer = jax.jit(self._moe_decode, static_argnums=0)
        self._prefill_layer = jax.jit(self._moe_prefill, static_argnums=0)
        self.reset()

    def reset(self) -> None:
        """Fresh telemetry, an empty pool and fresh policy state. If the pool holds every
        expert (and the policy reuses experts), it is filled now: decoding then moves no bytes."""
        self.pool = new_pool(self.store, self.moe_ids, self.plan.pool_slots, self.full, scratch=1)
        self.state = D.init_state(self.layout, self.policy.score_window, self.full)
        self.kv = empty_cache(self.config, self.batch, self.cache_len, self.dtype)
        self._t = Telemetry()

    @property
    def telemetry(self) -> Telemetry:
        """Telemetry since the last reset (the device counters are read now)."""
        t = self._t.count(self.counters(), self.store.expert_bytes, idle_copies=True)
        t.peak_device_bytes = max(t.peak_device_bytes, self.device_bytes())
        return t

    def device_bytes(self) -> int:
        """Dense weights, KV cache, the pool (with its scratch slot) and the largest compiled
        program's temporaries (fetched blocks in flight included)."""
        kv = sum(a.nbytes for pair in self.kv for a in pair)
        return self._dense_bytes + kv + self.pool.nbytes + self._program_bytes

    @property
    def state(self) -> dict:
        """The decision state (numpy copies, read from the device now)."""
        return self._packer.unpack(np.asarray(self._packed), np)

    @state.setter
    def state(self, value: dict) -> None:
        self._packer = PackedState(value)
        self._packed = jax.device_put(self._packer.pack(jax.device_get(value), np), self.device)

    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in jax.device_get(self.state["counters"]).items()}

    # ---- the program's pieces -----------------------------------------------------------
    def _moe_decode(self, gd, lp, nxt, stack, nxt_stack, sim, mi, x, kv, pos, cos, sin, pool, state, staged):
        """One MoE layer of a decode step, traced once for all layers (the layer's params lp,
        its index mi, its host stack and the next MoE layer's (router, bias, norm) `nxt` and
        stack, None for the last, are arguments; jitted in _build).

        The paper's prefetch rule (any number of experts per layer) is decided after this
        layer's compute and queued: once the next layer's real scores are known, what it does
        not use is dropped (`decisions.drop_prefetches`, the paper's rule for prefetches that
        have not started; also a prefetch that evicted an expert the layer uses: until the copy
        starts the evicted expert is a substitute like any resident one) and the rest is copied
        by its fetch loop, ahead of its own misses; they shield nothing, as that loop runs after
        this layer's reads. A copy in a loop cannot overlap anything, so starting them earlier
        would gain nothing, and one loop per layer instead of two saves a wait of the device
        for the host on a GPU per layer. With a fixed prefetch width P (policy.prefetch_width)
        the next layer's prefetches are decided as soon as this layer's plan is made and copied
        by P unconditional fetches at the program's top level, started once this layer's own
        fetches have landed, so that XLA may overlap them with this layer's expert compute and
        the next layer's attention.
        `staged`: the previous layer's prefetches for this one, Fetches (rule) or (blocks,
        Fetches) copied already (width P). Returns (x, kv, pool, state, this layer's staged
        prefetches or None)."""
        cfg, pol, lay = self.config, self.policy, self.layout
        x_in = x
        x, kv, h, dense, scores, weights, idx = attend_route(nnx.merge(gd, lp), x, kv, pos, cos, sin)
        if self.full:  # every expert stays at slot m * E + e: nothing to decide, fetch or substitute
            n = D.unique_first(idx.reshape(-1), size=min(idx.size, cfg.num_experts))[2]
            for name, v in (("hits", n), ("unique", n), ("routed", idx.size)):
                state = D._count(state, name, v)
            out = dense + moe.experts_indexed(h, pool, mi * cfg.num_experts + idx, weights, cfg.quant)
            return x + out.reshape(x.shape), kv, pool, state, None
        E, queued = cfg.num_experts, isinstance(staged, D.Fetches)  # the previous layer's prefetches, not started
        none = jnp.zeros(E, bool)
        pending = D.loading(staged, E) if queued else none  # not on the device: no substitutes
        state, probs, experts, weights = D.substitute_step(cfg, pol, state, mi, scores, weights, idx, sim, pending,
                                                           staged if queued else None)
        if queued:  # drop what this layer does not use; the rest are pending (no hits) and load first
            state, keep = D.drop_step(lay, state, mi, experts, staged)
            pending = D.loading(staged, E, keep)
        state, fetches, needed, before = D.plan_step(lay, pol, state, mi, experts, pending, probs)
        if queued:
            fetches = D.join(staged, fetches, keep)
        elif staged is not None:  # copied already; after the previous layer's reads (x_in depends on them)
            pool = land(pool, *staged, x_in)
        prefetch, width, spec = pol.prefetch and nxt is not None, pol.prefetch_width, None
        if prefetch and width:  # from the pool before this layer's fetches land
            predicted = predict_next(cfg, pol, nxt, x, h, dense, pool, before, before >= 0, weights)
            fetches = dataclasses.replace(fetches, slots=ordered_after(fetches.slots, *predicted))
            shield = D.prefetch_shield(mi, needed, False)
            state, spec = D.prefetch_step(lay, pol, state, mi + 1, *predicted, shield, none)
        pool = write_fetches(pool, stack, fetches, self.store.device_sharding, self.fetch_mode)
        if spec is not None:
            # started once this layer's own fetches have landed (the ids pass a barrier with the
            # pool after them), so they do not share the link with the fetches the compute waits
            # for. (A one-element read of the pool did the same, but XLA:CPU then copied the
            # whole pool at width 2.)
            ids, _ = jax.lax.optimization_barrier((spec.experts, pool))
            spec = tuple(fetch_block(nxt_stack, e, self.store.device_sharding) for e in ids), spec
        if prefetch and not width:  # from the experts resident when the scores were known
            predicted = predict_next(cfg, pol, nxt, x, h, dense, pool, before, (before >= 0) & ~pending[experts],
                                     weights)
        slots = state["table"][mi][experts]  # [N, k]
        routed = moe.experts_indexed(h, pool, slots, weights, cfg.quant)
        x = x + (dense + routed).reshape(x.shape)
        if not pol.reuse:
            state = D.release_step(lay, state, mi, *needed)
        if prefetch and not width:  # copied by the next layer's fetch loop, ahead of its own misses
            shield = D.prefetch_shield(mi, needed, True)
            state, spec = D.prefetch_step(lay, pol, state, mi + 1, *predicted, shield, none)
        return x, kv, pool, state, spec

    def _moe_prefill(self, gd, lp, stack, mi, x, kv, pos, cos, sin, pool, state, valid):
        """One MoE layer of a prompt, traced once for all layers (as _moe_decode)."""
        cfg, pol, lay = self.config, self.policy, self.layout
        x, kv, h, dense, _, weights, idx = attend_route(nnx.merge(gd, lp), x, kv, pos, cos, sin)
        E = cfg.num_experts
        if self.full:  # every expert resident: the resident model's loop over all experts
            ids = jnp.arange(E, dtype=jnp.int32)
            acc = moe.experts_ordered(h, pool, mi * E + ids, ids, jnp.ones(E, bool), idx, weights,
                                      jnp.zeros_like(h), cfg.quant)
            return x + (dense + acc).reshape(x.shape), kv, pool, state
        need, n_need = D.needed_sorted(idx, valid, cfg.num_experts)
        G, groups = D.prefill_groups(lay)
        need = jnp.pad(need, (0, G * groups - need.shape[0]))
        acc = jnp.zeros_like(h)
        for g in range(groups):
            group = need[g * G:(g + 1) * G]
            ok = g * G + jnp.arange(G) < n_need
            state, fetches = D.prefill_group_step(lay, pol, state, mi, group, ok)
            if g:  # after the previous group's reads of the pool
                fetches = dataclasses.replace(fetches, slots=ordered_after(fetches.slots, acc))
            pool = write_fetches(pool, stack, fetches, self.store.device_sharding, self.fetch_mode)
            rows = jnp.where(ok, state["table"][mi][group], 0)
            acc = moe.experts_ordered(h, pool, rows, group, ok, idx, weights, acc, cfg.quant)
        if not pol.reuse:
            state = D.release_step(lay, state, mi, need[: cfg.num_experts], jnp.arange(cfg.num_experts) < n_need)
        return x + (dense + acc).reshape(x.shape), kv, pool, state

    def _run_layers(self, params, stacks, pool, kv, state, x, pos, valid=None):
        module = nnx.merge(self.graphdef, params)
        B, T, _ = x.shape
        cos, sin = rope(self.config, pos, T, B, self.dtype)
        kv, layers = list(kv), module.layers
        staged = None  # a layer's prefetches for the next
        for i, layer in enumerate(layers):
            if not self.config.moe_layers[i]:
                x, kv[i] = layer(x, kv[i], pos, cos, sin)
                continue
            m = self.moe_ids.index(i)
            gd, lp = nnx.split(layer)
            if valid is None:
                last = i + 1 == len(layers) or not self.config.moe_layers[i + 1]
                nxt = None if last else next_layer(layers, i)
                sim = None if self.similarity is None else self.similarity[m]
                x, kv[i], pool, state, staged = self._decode_layer(
                    gd, lp, nxt, stacks[m], None if last else stacks[m + 1], sim, jnp.int32(m), x, kv[i], pos, cos,
                    sin, pool, state, staged)
            else:
                x, kv[i], pool, state = self._prefill_layer(gd, lp, stacks[m], jnp.int32(m), x, kv[i], pos, cos, sin,
                                                            pool, state, valid)
        return module, x, pool, tuple(kv), state

    # ---- programs -----------------------------------------------------------------------
    def _decode_fn(self, temperature, top_p):
        def steps(params, stacks, pool, kv, state, token, pos, keys, n, done, stop):
            """Up to n decode steps (generate.step_loop; keys [C, 2], done [B], stop [s]): token
            [B] at position pos -> (tokens [B, C], the last step's token [B] and logits [B, V],
            pool, kv, state)."""
            params = jax.tree.unflatten(self._param_def, params)
            module = nnx.merge(self.graphdef, params)

            def step(carry, tok, pos, key):
                pool, kv, state, _ = carry
                x = module.embed_tokens(tok[:, None])  # [B, 1, H]
                _, x, pool, kv, state = self._run_layers(params, stacks, pool, kv, state, x, pos)
                logits = module.logits(x)[:, 0]  # [B, V]
                return sample(logits, key, temperature, top_p), (pool, kv, state, logits)

            logits = jnp.zeros((token.shape[0], self.config.vocab_size), jnp.float32)
            out, last, (pool, kv, state, logits) = step_loop(step, token, (pool, kv, self._packer.unpack(state), logits),
                                                             pos, keys, n, done, stop)
            return out, last, logits, pool, kv, self._packer.pack(state)
        return steps

    def _prefill_fn(self, temperature, top_p):
        def prefill(params, stacks, pool, kv, state, tokens, T, key):
            """tokens [B, Tp] (T real) -> (first token [B], logits [B, V], pool, kv, state)."""
            params = jax.tree.unflatten(self._param_def, params)
            module = nnx.merge(self.graphdef, params)
            B, Tp = tokens.shape
            x = module.embed_tokens(tokens)  # [B, Tp, H]
            valid = jnp.broadcast_to(jnp.arange(Tp) < T, (B, Tp)).reshape(-1)  # [N]
            state = self._packer.unpack(state)
            module, x, pool, kv, state = self._run_layers(params, stacks, pool, kv, state, x, jnp.int32(0), valid)
            logits = module.logits(jax.lax.dynamic_index_in_dim(x, T - 1, axis=1, keepdims=False))  # [B, V]
            return sample(logits, key, temperature, top_p), logits, pool, kv, self._packer.pack(state)
        return prefill

    def _args(self, x, pos, *rest):
        # a token array the last step returned goes back in as it is: through numpy it would
        # be read back and transferred again (~0.2 ms a step on 2 CPU cores)
        x = x if isinstance(x, jax.Array) and x.dtype == jnp.int32 else np.asarray(x, np.int32)
        return (self._param_leaves, self.stacks, self.pool, tuple(self.kv), self._packed, x, np.int32(pos), *rest)

    def _decode_args(self, token, pos, keys=None, n=1, done=None, stop=None):
        """The decode program's arguments; by default one step sampled with PRNGKey(0)."""
        if keys is None:
            keys = np.zeros((generate.CHUNK, 2), np.uint32)
        done = np.zeros(self.batch, bool) if done is None else np.asarray(done, bool)
        stop = np.full(4, -1, np.int32) if stop is None else np.asarray(stop, np.int32)
        return self._args(token, pos, np.asarray(keys, np.uint32), np.int32(n), done, stop)

    def _ensure(self, programs, temperature: float, top_p: float) -> None:
        """Compile ahead of time the programs {kind: args} not compiled yet for these argument
        shapes. Their temporaries are budgeted: if they do not fit an absolute budget next to
        the pool, the pool shrinks and the engine starts over (raises _Rebuilt)."""
        t0 = time.perf_counter()
        todo = {}
        for kind, args in programs.items():
            key = _program_key(kind, args, temperature, top_p)
            if key not in self.compiled_programs:
                fn = (self._decode_fn if kind == "decode" else self._prefill_fn)(temperature, top_p)
                # the decode loop: as generate.bound_steps' (no hoisting of the embedding's convert)
                opts = {**(NO_HOIST if kind == "decode" else {}), **self.xla_options} or None
                todo[key] = jax.jit(fn, donate_argnums=(2, 3, 4), compiler_options=opts).lower(*args)
        if not todo:
            return
        compiled = [lowered.compile() for lowered in todo.values()]  # side by side in threads: no faster
        self.compile_s += time.perf_counter() - t0
        self.compiled_programs.update(zip(todo, compiled))
        for program in compiled:
            mem = program.memory_analysis()
            temp = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else 0
            if temp > self._program_bytes:
                self._program_bytes = temp
                self._fit()

    def _fit(self) -> None:
        """Budget the largest compiled program's temporaries. An absolute budget takes them from
        the pool: if fewer slots fit, the engine starts over with fewer (raises _Rebuilt; the
        smaller pool's programs are measured again, and the pool never grows back)."""
        cfg, itemsize, spec = self.config, np.dtype(self.dtype).itemsize, self._budget
        plan_for = lambda s: plan_budget(cfg, itemsize, self.batch, self.cache_len, s, staging=1,  # noqa: E731
                                         program_bytes=self._program_bytes)
        per_step = min(self.batch * cfg.top_k, cfg.num_experts)
        try:
            plan = plan_for(spec)
        except MoejaxError:
            if self.plan.pool_slots <= per_step:
                raise
            plan = plan_for(("pct", (per_step + 0.5) / self.plan.total_experts))  # measure again at the minimum
        if plan.pool_slots < self.plan.pool_slots:
            self._build(plan)
            raise _Rebuilt()
        extra = (plan.pool_slots - self.plan.pool_slots) * plan.expert_bytes
        self.plan = dataclasses.replace(plan, pool_slots=self.plan.pool_slots, budget_bytes=plan.budget_bytes - extra)
        if spec is not None and spec[0] == "bytes" and self.plan.budget_bytes > spec[1]:
            raise MoejaxError(f"--vram-budget {spec[1] / 2**20:.2f} MiB is below the minimum of "
                              f"{self.plan.budget_bytes / 2**20:.2f} MiB for the fused engine ({self.plan.describe()})")

    def _run(self, kind, make_args, temperature, top_p):
        args = make_args()
        pkey = _program_key(kind, args, temperature, top_p)
        if pkey not in self.compiled_programs:
            self._ensure({kind: args}, temperature, top_p)
            args = make_args()  # the pool may have been rebuilt for the temporaries
        *out, self.pool, kv, self._packed = self.compiled_programs[pkey](*args)
        self.kv = list(kv)
        return out

    def prepare(self, prompt_len: int, temperature: float = 0.0, top_p: float = 1.0, chunk: int | None = None) -> None:
        """Compile the prefill program for prompts of this length and the decode program of
        `chunk` steps per call (default generate.CHUNK, what `generate` runs; 1: the one-step
        program of `step`, what teacher-forced evaluation runs) now, so that the plan (which
        budgets their temporaries) is final before anything runs. A pool resized for the
        temporaries starts over empty, never in the middle of a sequence. Later prefills
        keep the last prepared decode program ready."""
        from moejax.generate import pad_prompt

        self._chunk = generate.CHUNK if chunk is None else chunk
        padded = pad_prompt(np.zeros((self.batch, prompt_len), np.int32))
        key, temperature, top_p = jax.random.PRNGKey(0), float(temperature), float(top_p)
        keys = np.zeros((self._chunk, 2), np.uint32)
        for _ in range(4):
            try:
                self._ensure({"decode": self._decode_args(np.zeros(self.batch, np.int32), 0, keys),
                              "prefill": self._args(padded, prompt_len, key)}, temperature, top_p)
                return
            except _Rebuilt:
                continue
        raise RuntimeError("the expert pool did not settle next to the programs' temporaries")

    def prefill(self, padded: np.ndarray, T: int, key, temperature=0.0, top_p=1.0):
        """padded [B, Tp] prompt (T real tokens) -> (first token [B], logits [B, V])."""
        if padded.shape[1] > self.cache_len:
            raise ValueError(f"prompt of {padded.shape[1]} tokens exceeds the engine's cache of {self.cache_len}")
        self.prepare(T, temperature, top_p, self._chunk)
        return tuple(self._run("prefill", lambda: self._args(padded, T, key), float(temperature), float(top_p)))

    def step(self, token, pos: int, key, temperature=0.0, top_p=1.0):
        """token [B] at position pos -> (next token [B], logits [B, V]): the decode program for one step."""
        keys = np.asarray(key, np.uint32).reshape(1, 2)  # a program of one step, no loop (step_loop)
        _, tok, logits = self.steps(token, pos, keys, 1, None, None, temperature, top_p)
        return tok, logits

    def steps(self, token, pos: int, keys, n: int, done, stop, temperature=0.0, top_p=1.0):
        """Up to n decode steps in one call (generate.step_loop; keys [C, 2], done [B] or None,
        stop ids [s] or None) -> (tokens [B, C], the last step's token [B] and logits [B, V])."""
        if not (isinstance(token, jax.Array) and token.shape == (self.batch,)):
            token = np.asarray(token).reshape(self.batch)
        return tuple(self._run("decode", lambda: self._decode_args(token, pos, keys, n, done, stop),
                               float(temperature), float(top_p)))


def _program_key(kind: str, args: tuple, temperature: float, top_p: float) -> tuple:
    """What a compiled program is looked up by: its kind, the shapes of its arguments after the
    engine state (tokens, keys, stop ids...) and the sampling settings."""
    return (kind, tuple(np.shape(a) for a in args[5:]), temperature, top_p)


class _Rebuilt(Exception):
    """The pool was resized after a program's temporaries were measured."""
