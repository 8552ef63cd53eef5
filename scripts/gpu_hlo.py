#!/usr/bin/env python3
"""See what XLA:GPU makes of a jitted function, on a machine without a GPU.

Traces on the CPU client (which has `pinned_host` memory), lowers for CUDA, and compiles with a
compile-only XLA:GPU client for an H200 target. Needs `jax-cuda12-plugin` and `jax-cuda12-pjrt`
of the same version as jax installed next to it (they install on a CPU machine), and
JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 in the environment (there is no CUDA runtime to check).

    from gpu_hlo import h200_hlo, count
    hlo = h200_hlo(jax.jit(step, donate_argnums=(3,)), *abstract_args)   # jax.ShapeDtypeStruct args
    print(count(hlo))

An argument meant for host memory is a ShapeDtypeStruct whose sharding is a NamedSharding
with memory_kind="pinned_host" (a SingleDeviceSharding works for plain fetches but is not seen
as host memory by `compute_on` host computations).
What to look for: `S(5)` (host memory space) on the expert argument; `dynamic-slice-start`/
`-done` pairs (asynchronous host->device fetches) with compute scheduled between them;
no `_xla_compute_type` host ops (compute that fell back to the host); no copies of the
whole expert pool; `conditional` (each one syncs with the host on GPU unless command
buffers with conditionals are enabled).
Run `python scripts/gpu_hlo.py` for a self-check on a tiny 2-layer program; scripts/fetch_modes.py
uses it (--h200-plugin).
"""
import jax
from jax._src import compiler
from jax._src.lib import xla_client as xc
from jax.experimental import topologies

H200 = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 151397597184 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 patch: 0 }
device_description_str: "NVIDIA H200"
"""

KEYS = ["S(5)", "dynamic-slice-start", "dynamic-slice-done", "copy-start", "copy-done",
        "_xla_compute_type", "conditional", "while", "dynamic-update-slice", "gather("]


def h200_hlo(jitted, *args) -> str:
    """Compiled HLO text of `jitted` (a jax.jit-wrapped function) for one H200."""
    lowered = jitted.trace(*args).lower(lowering_platforms=("cuda",))
    topo = topologies.get_topology_desc(platform="cuda", target_config=H200, topology="1x1x1")
    client = topo.devices[0].client
    opts = compiler.get_compile_options(num_replicas=1, num_partitions=1)
    exe = client.compile(lowered._lowering.stablehlo(), executable_devices=xc.DeviceList(tuple(topo.devices)),
                         compile_options=opts)
    return exe.hlo_modules()[0].to_string()


def count(hlo: str) -> dict:
    return {k: hlo.count(k) for k in KEYS if k in hlo}


if __name__ == "__main__":
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(jax.devices("cpu")[:1], ("x",))
    dev, host = (NamedSharding(mesh, PartitionSpec(), memory_kind=k) for k in ("device", "pinned_host"))
    L, E, H, I, K = 2, 8, 256, 128, 2
    W = jax.ShapeDtypeStruct((L, E, 3, H, I), jnp.bfloat16, sharding=host)
    R = jax.ShapeDtypeStruct((L, H, E), jnp.float32, sharding=dev)
    X = jax.ShapeDtypeStruct((1, H), jnp.bfloat16, sharding=dev)

    def step(x, r, w):
        for l in range(L):
            v, idx = jax.lax.top_k(x.astype(jnp.float32) @ r[l], K)
            for k in range(K):
                blk = jax.device_put(jax.lax.dynamic_slice(w, (l, idx[0, k], 0, 0, 0), (1, 1, 3, H, I))[0, 0], dev)
                x = x + (jax.nn.silu(x @ blk[0]) * (x @ blk[1])) @ blk[2].T
        return x

    print(count(h200_hlo(jax.jit(step), X, R, W)))
