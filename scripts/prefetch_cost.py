"""Where smoe's time over score-sub goes, fused engine, 25%, batch B (docs/benchmarks.md).
Usage: python scripts/prefetch_cost.py B"""
import sys, statistics, numpy as np, jax.numpy as jnp
from moejax import api
api.enable_compile_cache()
from moejax import fused
from moejax.fused import FusedEngine
from moejax.offload.budget import parse_budget
from moejax.offload.store import load_parts
path = api.resolve("checkpoints/moejax-shakespeare-moe")
parts = load_parts(path)
B = int(sys.argv[1])
prompt = np.random.default_rng(0).integers(5, 4000, (B, 16))
real = fused.predict_next
def cheap(cfg, policy, nxt, x, h, dense, pool, slots, hit, weights):
    return (slots.reshape(-1) % cfg.num_experts), jnp.ones(slots.size, bool)
def noexp(cfg, policy, nxt, x, h, dense, pool, slots, hit, weights):
    from moejax.model import moe, layers as L
    from moejax.offload.importance import classify
    router, bias, norm = nxt
    approx = x.reshape(h.shape) + dense
    scores, _, idx = moe.route(cfg, L.rms_norm(approx, norm, cfg.rms_norm_eps), router, bias)
    _, top = classify(moe.importance(scores, cfg.router), idx, policy.alpha)
    return idx.reshape(-1), top.reshape(-1)
engines = {}
for name, fn in (("real", real), ("no_expert_approx", noexp), ("no_prediction", cheap)):
    fused.predict_next = fn
    e = FusedEngine(path, "smoe", parse_budget("25%"), batch=B, cache_len=64, alpha=0.3, parts=parts)
    e.generate(prompt, 4)
    engines[name] = e
e = FusedEngine(path, "score-sub", parse_budget("25%"), batch=B, cache_len=64, alpha=0.3, parts=parts); e.generate(prompt, 4); engines["score-sub"] = e
res = {k: [] for k in engines}
for t in range(5):
    for k, e in engines.items():
        e.reset(); g = e.generate(prompt, 32); res[k].append(g.tpot_ms)
print(B, {k: round(statistics.median(v), 2) for k, v in res.items()})
