"""Sampling and the resident generation loop (prefill, then jitted decode steps).

The step is compiled once per (batch, cache length, sampling settings); the position is a
traced scalar, so decoding never recompiles per token. Prompts are padded at the end to a
multiple of PAD so prefill compiles for few distinct lengths; causal masking keeps the
padding invisible, and decode overwrites its cache slots.

The resident loop runs up to CHUNK decode steps per dispatch (`decode_steps`: the same step
in a `lax.while_loop` that stops once every row has hit a stop id). A dispatch from Python costs
~0.3 ms on the 2-core CPU before the first operation runs (argument handling, the hand-off to
XLA's thread, waking the caller at the end): a third of the bundled model's whole decode step.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.model.decoder import empty_cache

PAD = 16
CACHE_ROUND = 64
CHUNK = 16  # decode steps per dispatch in the resident loop
# XLA hoists loop-invariant work out of decode_steps' loop, which turned the embedding lookup's
# convert of one row into a convert of the whole table on every call (XLA:CPU reads a bfloat16
# table through float32: 0.7 ms per call on the bundled model); a decode step has nothing else
# to hoist.
NO_HOIST = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion,while-loop-expensive-invariant-code-motion"}


def sample(logits, key, temperature: float, top_p: float):
    """logits [B, V] float32 -> token ids [B]. temperature 0 = greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)  # [B, 1]
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def run_decoder(graphdef, state, tokens, cache, pos):
    """tokens [B, T] -> float32 logits [B, T, V], new cache."""
    return nnx.merge(graphdef, state)(tokens, cache, pos)


@partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(3,))
def prefill_step(graphdef, state, tokens, cache, last, key, temperature, top_p):
    """Prefill a padded prompt; sample from the logits at index `last` (the LM head runs on that
    position only: on every position it was a quarter of the bundled model's prefill FLOPs)."""
    model = nnx.merge(graphdef, state)
    x, cache = model.hidden(tokens, cache, jnp.int32(0))
    last_logits = model.logits(jax.lax.dynamic_index_in_dim(x, last, axis=1, keepdims=False))  # [B, V]
    return sample(last_logits, key, temperature, top_p), last_logits, cache


@partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(3,))
def decode_step(graphdef, state, token, cache, pos, key, temperature, top_p):
    """One token per row: token [B] at position pos -> next token [B], logits [B, V], cache."""
    logits, cache = nnx.merge(graphdef, state)(token[:, None], cache, pos)
    logits = logits[:, 0]
    return sample(logits, key, temperature, top_p), logits, cache


def step_loop(step, token, carry, pos, keys, n, done, stop):
    """Up to n decode steps in one lax.while_loop. step(carry, token [B], pos, key) -> (next
    token [B], carry); step i runs at position pos + i and samples with keys[i] (keys [C, 2],
    n <= C); done [B]: rows that already hit a stop id (of stop [s]). It stops after step i
    once every row is done, so it runs n steps, or the first i + 1 at which every row is done
    (the host finds which from the tokens). -> (tokens [B, C], the first that many columns
    generated; the last token generated [B]; carry). With C == 1 it is one step, without a
    loop (n, done and stop unused)."""
    B, C = token.shape[0], keys.shape[0]
    if C == 1:
        tok, carry = step(carry, token, pos, keys[0])
        return tok[:, None], tok, carry

    def cond(c):
        i, _, _, _, done = c
        return (i < n) & ~jnp.all(done)

    def body(c):
        i, tok, carry, out, done = c
        tok, carry = step(carry, tok, pos + i, keys[i])
        return i + 1, tok, carry, out.at[:, i].set(tok), done | jnp.isin(tok, stop)

    init = (jnp.int32(0), token, carry, jnp.zeros((B, C), jnp.int32), done)
    _, tok, carry, out, _ = jax.lax.while_loop(cond, body, init)
    return out, tok, carry


@partial(jax.jit, static_argnums=(0, 9, 10), donate_argnums=(3,))
def decode_steps(graphdef, state, token, cache, pos, keys, n, done, stop, temperature, top_p):
    """Up to n of decode_step's steps in one program (step_loop): token [B] at position pos,
    keys [C, 2], done [B], stop [s] -> tokens [B, C], cache."""
    model = nnx.merge(graphdef, state)

    def step(cache, tok, pos, key):
        logits, cache = model(tok[:, None], cache, pos)
        return sample(logits[:, 0], key, temperature, top_p), cache

    out, _, cache = step_loop(step, token, cache, pos, keys, n, done, stop)
    return out, cache


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per batch row (stop token included if hit)
    ttft_s: float  # prompt submitted -> first token on the host (compilation excluded if warmed up)
    step_s: list[float]  # wall time of each decode step after the first token (a chunk's time / its steps)
    warmup_s: float = 0.0  # compilation + one untimed prefill and decode step

    @property
    def tpot_ms(self) -> float:
        return 1e3 * float(np.mean(self.step_s)) if self.step_s else float("nan")


def cache_length(prompt_len: int, max_new_tokens: int) -> int:
    n = prompt_len + max_new_tokens
    return -(-n // CACHE_ROUND) * CACHE_ROUND


@partial(jax.jit, static_argnums=1)
def key_chain(key, n: int):
    """The subkeys [n, 2] of n successive `key, sub = jax.random.split(key)`, in one dispatch."""

    def body(k, _):
        k, sub = jax.random.split(k)
        return k, sub

    return jax.lax.scan(body, key, None, length=n)[1]


def bound_steps(model):
    """(prefill, decode) of `model` with its graphdef bound and its state flattened once, cached
    on the model: a call then neither hashes the graphdef (a static argument) nor flattens the
    nnx.State, which cost ~1 ms of Python per step on 2 cores for the bundled model. Same
    arguments and results as prefill_step and decode_step, without graphdef and state."""
    cached = getattr(model, "_bound_steps", None)
    if cached is not None and cached[0] is model.state:
        return cached[1]
    leaves, treedef = jax.tree.flatten(model.state)
    graphdef = model.graphdef

    @partial(jax.jit, static_argnums=(5, 6), donate_argnums=(2,))
    def prefill(leaves, tokens, cache, last, key, temperature, top_p):
        return prefill_step(graphdef, jax.tree.unflatten(treedef, leaves), tokens, cache, last, key, temperature, top_p)

    @partial(jax.jit, static_argnums=(5, 6), donate_argnums=(2,))
    def decode(leaves, token, cache, pos, key, temperature, top_p):
        return decode_step(graphdef, jax.tree.unflatten(treedef, leaves), token, cache, pos, key, temperature, top_p)

    @partial(jax.jit, static_argnums=(8, 9), donate_argnums=(2,), compiler_options=NO_HOIST)
    def chunk(leaves, token, cache, pos, keys, n, done, stop, temperature, top_p):
        return decode_steps(graphdef, jax.tree.unflatten(treedef, leaves), token, cache, pos, keys, n, done, stop,
                            temperature, top_p)

    steps = (partial(prefill, leaves), partial(decode, leaves))
    model._bound_steps = (model.state, steps, partial(chunk, leaves))
    return steps


def bound_chunk(model):
    """decode_steps of `model`, bound as bound_steps binds its steps (and cached with them)."""
    bound_steps(model)
    return model._bound_steps[2]


def pad_prompt(prompt: np.ndarray) -> np.ndarray:
    """[B, T] -> [B, ceil(T / PAD) * PAD], padded at the end with token 0."""
    B, T = prompt.shape
    Tp = -(-T // PAD) * PAD
    return np.pad(prompt, ((0, 0), (0, Tp - T)))


def generation_loop(prefill: Callable, step: Callable | None, prompt: np.ndarray, max_new_tokens: int, seed: int = 0,
                    stop_ids=(), on_token: Callable[[np.ndarray], None] | None = None,
                    steps: Callable | None = None) -> Generation:
    """The loop every engine shares. prefill(padded [B, Tp], T, key) -> first token [B];
    step(token [B], pos, key) -> next token [B]. Each token is read back to the host (the
    stop check needs it), which synchronises the step it came from. With `steps` (the resident
    model, the fused engine) instead of `step`, steps(token [B], pos, keys [CHUNK, 2], n, done [B], stop) ->
    tokens [B, CHUNK] runs up to n steps per call (see decode_steps); on_token then sees each
    chunk's tokens one by one when the chunk returns."""
    B, T = prompt.shape
    subkeys = np.asarray(key_chain(jax.random.PRNGKey(seed), max(max_new_tokens, 1)))  # host copies: no dispatch per step
    stop = np.asarray(list(stop_ids), np.int32)
    stop_pad = np.full(-(-max(len(stop), 1) // 4) * 4, -1, np.int32)  # one shape for up to 4 stop ids: no recompile
    stop_pad[:len(stop)] = stop
    padded = pad_prompt(prompt)
    t0 = time.perf_counter()
    tok = prefill(padded, T, subkeys[0])
    # np.array copies: on CPU np.asarray is a view that would keep every step's device buffer
    # alive for as long as the output list holds the token
    tok_host = np.array(tok)
    ttft = time.perf_counter() - t0
    out, step_s = [tok_host], []
    done = np.isin(tok_host, stop)
    if on_token:
        on_token(tok_host)
    i = 1
    while i < max_new_tokens and not done.all():
        t = time.perf_counter()
        if steps is None:
            tok = step(tok, T + i - 1, subkeys[i])
            chunk = [np.array(tok)]
        else:
            n = min(CHUNK, max_new_tokens - i)
            keys = np.zeros((CHUNK, *subkeys.shape[1:]), subkeys.dtype)
            keys[:n] = subkeys[i:i + n]
            toks = np.array(steps(np.asarray(tok), T + i - 1, keys, n, done, stop_pad))[:, :n]  # [B, n]
            # the steps it ran: n, or up to the first at which every row was done
            all_done = (done[:, None] | np.logical_or.accumulate(np.isin(toks, stop), axis=1)).all(axis=0)
            chunk = list(toks[:, :int(np.argmax(all_done)) + 1 if all_done.any() else n].T)
            tok = chunk[-1]
        dt = (time.perf_counter() - t) / len(chunk)
        for tok_host in chunk:
            step_s.append(dt)
            out.append(tok_host)
            done |= np.isin(tok_host, stop)
            if on_token:
                on_token(tok_host)
        i += len(chunk)
    ids = np.stack(out, axis=1)  # [B, n]
    tokens = []
    for row in ids:
        hits = np.nonzero(np.isin(row, stop))[0]
        tokens.append(row[: hits[0] + 1].tolist() if len(hits) else row.tolist())
    return Generation(tokens, ttft, step_s)


def generate(model, prompt, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop_ids=(), on_token: Callable[[np.ndarray], None] | None = None,
             warmup: bool = False) -> Generation:
    """Resident generation. prompt: int array [B, T]. Stops when every row hit a stop id.

    warmup=True first runs prefill and one decode step on a scratch cache (compiling
    them), so that ttft and the step times measure execution, not compilation."""
    prompt = np.asarray(prompt, np.int32)
    B, T = prompt.shape
    S = cache_length(T, max_new_tokens)
    prefill_fn, _ = bound_steps(model)
    chunk_fn = bound_chunk(model)
    temperature, top_p = float(temperature), float(top_p)
    cache = None

    def prefill(padded, T, key):
        nonlocal cache
        cache = empty_cache(model.config, B, S, model.dtype)
        tok, _, cache = prefill_fn(padded, cache, np.int32(T - 1), key, temperature, top_p)
        return tok

    def steps(tok, pos, keys, n, done, stop):
        nonlocal cache
        toks, cache = chunk_fn(tok, cache, np.int32(pos), keys, np.int32(n), done, stop, temperature, top_p)
        return toks

    warmup_s = 0.0
    if warmup:
        t0 = time.perf_counter()
        generation_loop(prefill, None, prompt, 2, seed, steps=steps)
        warmup_s = time.perf_counter() - t0
    g = generation_loop(prefill, None, prompt, max_new_tokens, seed, stop_ids, on_token, steps=steps)
    g.warmup_s = warmup_s
    return g


class OffloadedGeneration:
    """`generate` for the offloaded engines (moejax.fused.FusedEngine, moejax.engine.OffloadEngine).
    An engine provides prefill, step, reset, batch, cache_len, a `state` dict whose
    "counters" are the decision counters, and `_t` (its Telemetry)."""

    warmup_tokens = 2

    def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop_ids=(), on_token=None, warmup: bool = False) -> Generation:
        """warmup: first compile (and run once) every program on this prompt, then start over
        from an empty pool. Telemetry covers this run only; without warmup the pool stays as
        the last run left it."""
        from moejax.metrics import Telemetry

        prompt = np.asarray(prompt, np.int32)
        if prompt.shape[0] != self.batch:
            raise ValueError(f"engine built for batch {self.batch}, got {prompt.shape[0]} prompts")
        if prompt.shape[1] + max_new_tokens > self.cache_len:
            raise ValueError(f"prompt + new tokens exceed the engine's cache of {self.cache_len}")
        temperature, top_p = float(temperature), float(top_p)
        if hasattr(self, "prepare"):  # the fused engine: its programs for generation (CHUNK steps per call)
            self.prepare(prompt.shape[1], temperature, top_p)
        prefill = lambda p, T, k: self.prefill(p, T, k, temperature, top_p)[0]  # noqa: E731
        step = lambda tok, pos, k: self.step(tok, pos, k, temperature, top_p)[0]  # noqa: E731
        # an engine that runs several steps per call (the fused one) gets them asked in chunks
        steps = (lambda tok, pos, keys, n, done, stop: self.steps(tok, pos, keys, n, done, stop, temperature,  # noqa: E731
                                                                   top_p)[0]) if hasattr(self, "steps") else None
        warmup_s = 0.0
        if warmup:
            t0 = time.perf_counter()
            generation_loop(prefill, step, prompt, self.warmup_tokens, seed, steps=steps)
            warmup_s = time.perf_counter() - t0
            self.reset()
        self._t = Telemetry(peak_device_bytes=self._t.peak_device_bytes)
        self.state = {**self.state, "counters": jax.tree.map(jnp.zeros_like, self.state["counters"])}
        g = generation_loop(prefill, step, prompt, max_new_tokens, seed, stop_ids, on_token, steps=steps)
        g.warmup_s = warmup_s
        self._t.ttft_s, self._t.step_s = g.ttft_s, g.step_s
        return g
