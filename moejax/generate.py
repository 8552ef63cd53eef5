"""Sampling and the resident generation loop (prefill, then one jitted step per token).

The step is compiled once per (batch, cache length, sampling settings); the position is a
traced scalar, so decoding never recompiles per token. Prompts are padded at the end to a
multiple of PAD so prefill compiles for few distinct lengths; causal masking keeps the
padding invisible, and decode overwrites its cache slots.
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


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per batch row (stop token included if hit)
    ttft_s: float  # prompt submitted -> first token on the host (compilation excluded if warmed up)
    step_s: list[float]  # wall time of each decode step after the first token
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

    steps = (partial(prefill, leaves), partial(decode, leaves))
    model._bound_steps = (model.state, steps)
    return steps


def pad_prompt(prompt: np.ndarray) -> np.ndarray:
    """[B, T] -> [B, ceil(T / PAD) * PAD], padded at the end with token 0."""
    B, T = prompt.shape
    Tp = -(-T // PAD) * PAD
    return np.pad(prompt, ((0, 0), (0, Tp - T)))


def generation_loop(prefill: Callable, step: Callable, prompt: np.ndarray, max_new_tokens: int, seed: int = 0,
                    stop_ids=(), on_token: Callable[[np.ndarray], None] | None = None) -> Generation:
    """The loop every engine shares. prefill(padded [B, Tp], T, key) -> first token [B];
    step(token [B], pos, key) -> next token [B]. Each token is read back to the host (the
    stop check needs it), which synchronises the step it came from."""
    B, T = prompt.shape
    subkeys = np.asarray(key_chain(jax.random.PRNGKey(seed), max(max_new_tokens, 1)))  # host copies: no dispatch per step
    stop = np.asarray(list(stop_ids), np.int32)
    padded = pad_prompt(prompt)
    t0 = time.perf_counter()
    tok = prefill(padded, T, subkeys[0])
    # np.array copies: on CPU np.asarray is a view that would keep every step's device buffer
    # alive for as long as the output list holds the token
    tok_host = np.array(tok)
    ttft = time.perf_counter() - t0
    out, steps = [tok_host], []
    done = np.isin(tok_host, stop)
    if on_token:
        on_token(tok_host)
    for i in range(1, max_new_tokens):
        if done.all():
            break
        t = time.perf_counter()
        tok = step(tok, T + i - 1, subkeys[i])
        tok_host = np.array(tok)
        steps.append(time.perf_counter() - t)
        out.append(tok_host)
        done |= np.isin(tok_host, stop)
        if on_token:
            on_token(tok_host)
    ids = np.stack(out, axis=1)  # [B, n]
    tokens = []
    for row in ids:
        hits = np.nonzero(np.isin(row, stop))[0]
        tokens.append(row[: hits[0] + 1].tolist() if len(hits) else row.tolist())
    return Generation(tokens, ttft, steps)


def generate(model, prompt, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop_ids=(), on_token: Callable[[np.ndarray], None] | None = None,
             warmup: bool = False) -> Generation:
    """Resident generation. prompt: int array [B, T]. Stops when every row hit a stop id.

    warmup=True first runs prefill and one decode step on a scratch cache (compiling
    them), so that ttft and the step times measure execution, not compilation."""
    prompt = np.asarray(prompt, np.int32)
    B, T = prompt.shape
    S = cache_length(T, max_new_tokens)
    prefill_fn, decode_fn = bound_steps(model)
    temperature, top_p = float(temperature), float(top_p)
    cache = None

    def prefill(padded, T, key):
        nonlocal cache
        cache = empty_cache(model.config, B, S, model.dtype)
        tok, _, cache = prefill_fn(padded, cache, np.int32(T - 1), key, temperature, top_p)
        return tok

    def step(tok, pos, key):
        nonlocal cache
        tok, _, cache = decode_fn(tok, cache, np.int32(pos), key, temperature, top_p)
        return tok

    warmup_s = 0.0
    if warmup:
        t0 = time.perf_counter()
        generation_loop(prefill, step, prompt, 2, seed)
        warmup_s = time.perf_counter() - t0
    g = generation_loop(prefill, step, prompt, max_new_tokens, seed, stop_ids, on_token)
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
        prefill = lambda p, T, k: self.prefill(p, T, k, temperature, top_p)[0]  # noqa: E731
        step = lambda tok, pos, k: self.step(tok, pos, k, temperature, top_p)[0]  # noqa: E731
        warmup_s = 0.0
        if warmup:
            t0 = time.perf_counter()
            generation_loop(prefill, step, prompt, self.warmup_tokens, seed)
            warmup_s = time.perf_counter() - t0
            self.reset()
        self._t = Telemetry(peak_device_bytes=self._t.peak_device_bytes)
        self.state = {**self.state, "counters": jax.tree.map(jnp.zeros_like, self.state["counters"])}
        g = generation_loop(prefill, step, prompt, max_new_tokens, seed, stop_ids, on_token)
        g.warmup_s = warmup_s
        self._t.ttft_s, self._t.step_s = g.ttft_s, g.step_s
        return g
