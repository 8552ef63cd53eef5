"""Decode-mode evaluation: teacher forcing token by token through the offloaded engine, so
that cache state and substitution act exactly as in generation, compared with the resident
model teacher-forced the same way (prefill, then one decode step per token). Comparing
decode with decode isolates what offloading changes: in bfloat16 a full-sequence forward
and token-by-token decoding round differently (on the bundled model: top-1 agreement 0.988
between the two), which would otherwise be charged to substitution."""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(tokens: np.ndarray, ref_logits: np.ndarray, logits: np.ndarray) -> dict:
    """tokens [T'] the true next tokens; logits [T', V] of each model for them."""
    lr, lo = log_softmax(ref_logits.astype(np.float64)), log_softmax(logits.astype(np.float64))
    nll_ref = -lr[np.arange(len(tokens)), tokens]
    nll = -lo[np.arange(len(tokens)), tokens]
    return {
        "ppl": float(np.exp(nll.mean())), "ppl_resident": float(np.exp(nll_ref.mean())),
        "top1_agreement": float(np.mean(lr.argmax(-1) == lo.argmax(-1))),
        "kl": float(np.mean(np.sum(np.exp(lr) * (lr - lo), axis=-1))),  # KL(resident || offloaded)
        "tokens": int(len(tokens)),
    }


def teacher_forced(engine, tokens: np.ndarray, prefix: int, progress: bool = False) -> np.ndarray:
    """tokens [T] -> the engine's logits [T - prefix, V] predicting tokens[prefix:], after
    prefilling tokens[:prefix] and then one decode step per token."""
    import jax
    from tqdm.auto import tqdm

    from moejax.generate import pad_prompt

    key = jax.random.PRNGKey(0)
    if hasattr(engine, "prepare"):  # the fused engine: its one-step decode program (not generate's chunks)
        engine.prepare(prefix, chunk=1)
    _, logits = engine.prefill(pad_prompt(tokens[None, :prefix]), prefix, key)
    out = [np.asarray(logits)[0]]
    for t in tqdm(range(prefix, len(tokens) - 1), desc="decode-mode eval", unit="tok", disable=not progress):
        _, logits = engine.step(np.asarray(tokens[t:t + 1], np.int32), t, key)
        out.append(np.asarray(logits)[0])
    return np.stack(out)


class _ResidentSteps:
    """The resident model behind the engine's prefill/step interface (for teacher forcing)."""

    def __init__(self, model, length: int):
        from moejax.generate import cache_length
        from moejax.model.decoder import empty_cache

        self.model, self.cache = model, empty_cache(model.config, 1, cache_length(length, 0), model.dtype)

    def prefill(self, padded, T, key):
        import jax.numpy as jnp

        from moejax.generate import prefill_step

        m = self.model
        tok, logits, self.cache = prefill_step(m.graphdef, m.state, jnp.asarray(padded), self.cache,
                                               np.int32(T - 1), key, 0.0, 1.0)
        return tok, logits

    def step(self, token, pos, key):
        from moejax.generate import decode_step

        m = self.model
        tok, logits, self.cache = decode_step(m.graphdef, m.state, token, self.cache, np.int32(pos), key, 0.0, 1.0)
        return tok, logits


def evaluate(model, engine, tokens: np.ndarray, prefix: int = 8, progress: bool = False, reference=None) -> dict:
    """Everything `moejax eval ppl` reports, for one token sequence [T]. engine None: the
    resident model (against itself: `--policy resident`, the reference point). reference: the
    resident model scored against instead of `model` (e.g. the bfloat16 original of a copy with
    quantized experts; `--reference`)."""
    tokens = np.asarray(tokens, np.int32)
    base = model if reference is None else reference
    ref = teacher_forced(_ResidentSteps(base, len(tokens)), tokens, prefix, progress and engine is None)
    if engine is None and reference is None:
        ours = ref
    else:
        ours = teacher_forced(engine or _ResidentSteps(model, len(tokens)), tokens, prefix, progress)
    result = compare(tokens[prefix:], ref, ours)
    if engine is None:
        result.update(hit_rate=1.0, substitution_rate=0.0, skip_rate=0.0, bytes_h2d=0, prefetch_precision=float("nan"))
        return result
    t = engine.telemetry
    result.update(hit_rate=t.hit_rate, substitution_rate=t.substitution_rate, skip_rate=t.skip_rate,
                  bytes_h2d=t.bytes_h2d_decode,
                  prefetch_precision=t.prefetch_precision)
    return result
