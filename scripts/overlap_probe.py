"""Does `jax.device_put` from pinned host memory overlap with compute on this device?

    python scripts/overlap_probe.py --json OUT.json

Times 32 expert-sized copies (bf16 [3, 2048, 1408]) and a chain of bf16 matmuls alone and
together: issued from the same thread, and with the copies issued from a second thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import ml_dtypes
import numpy as np


def measure() -> dict:
    import jax
    import jax.numpy as jnp

    d = jax.devices()[0]
    dev = jax.sharding.SingleDeviceSharding(d)
    kinds = {m.kind for m in d.addressable_memories()}
    host = jax.sharding.SingleDeviceSharding(d, memory_kind="pinned_host" if "pinned_host" in kinds else "device")
    experts = [jax.device_put(np.ones((3, 2048, 1408), ml_dtypes.bfloat16), host) for _ in range(32)]
    jax.block_until_ready(experts)
    x = jnp.ones((8192, 8192), jnp.bfloat16)

    @jax.jit
    def chain(x):
        for _ in range(20):
            x = (x @ x) * 1e-4
        return x

    chain(x).block_until_ready()

    def copies():
        return jax.block_until_ready([jax.device_put(e, dev) for e in experts])

    def med(fn, n=5):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def same_thread():
        y = chain(x)
        copies()
        y.block_until_ready()

    def two_threads():
        th = threading.Thread(target=copies)
        y = chain(x)
        th.start()
        th.join()
        y.block_until_ready()

    r = {"device": str(d), "copy_s": med(copies), "compute_s": med(lambda: chain(x).block_until_ready()),
         "same_thread_s": med(same_thread), "two_threads_s": med(two_threads)}
    shorter = min(r["copy_s"], r["compute_s"])
    for k in ("same_thread", "two_threads"):
        r[f"{k}_hidden_fraction"] = (r["copy_s"] + r["compute_s"] - r[f"{k}_s"]) / shorter
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    r = measure()
    print(json.dumps(r, indent=2))
    open(a.json, "w").write(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
