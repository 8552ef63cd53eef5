"""bf16 vs f32 resident decode step at a short and a long KV cache (docs/benchmarks.md,
"One cause of bf16 being slower"). Usage: python scripts/kv_write_bench.py"""
import time, statistics, jax, jax.numpy as jnp
import moejax
from moejax.generate import decode_step
from moejax.model.decoder import empty_cache
p = moejax.api.resolve("checkpoints/moejax-shakespeare-moe")
res = {}
for dt in ("float32", "bfloat16"):
    m = moejax.load(p, dtype=dt)
    for S in (128, 2048):
        cache = empty_cache(m.config, 1, S, m.dtype)
        tok, key = jnp.zeros(1, jnp.int32), jax.random.PRNGKey(0)
        out = decode_step(m.graphdef, m.state, tok, cache, jnp.int32(3), key, 0.0, 1.0)
        jax.block_until_ready(out); cache = out[-1] if isinstance(out, tuple) else cache
        ts = []
        for i in range(60):
            t = time.perf_counter()
            out = decode_step(m.graphdef, m.state, tok, cache, jnp.int32(3 + i), key, 0.0, 1.0)
            jax.block_until_ready(out); cache = out[-1]
            ts.append(time.perf_counter() - t)
        res[(dt, S)] = round(1e3 * statistics.median(ts[10:]), 2)
print(res)
