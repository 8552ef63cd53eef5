"""Device expert pool: a fixed number of slots allocated once and written in place, and the
host -> device copy of one expert.

Which experts are cached lives in the decision state (`moejax.offload.decisions`): the pool
is mechanism only. Shapes never depend on the cached set (slots are traced indices), so
nothing recompiles after warm-up."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FETCH_MODES = ("cond", "cond-write", "loop", "always")


# The fused engine's default miss path on every platform (benchmarks.md, "The miss path"): on
# the CPU as fast as cond-write (paired 0.89-1.03) and ~1.45x faster to compile, with the smallest
# temporaries; compiled for an H200 it has one loop per layer where cond has a conditional per
# fetch slot, and each of those makes a GPU wait for the host (11 + fetches against 44 per
# smoe step at batch 1, 11 + fetches against 132 at batch 3, on the bundled model).
DEFAULT_FETCH_MODE = "loop"


def storage_dtype(dtype):
    """The pool's element type (that of the host store, with one exception; quantized experts
    are uint8 rows already): bfloat16 experts are stored as their uint16 bits, because
    XLA:CPU upcasts a bfloat16 dynamic_update_slice to float32 and back over the WHOLE pool
    (measured: 24 fetches into a 3.5 MB pool took 70-350 ms as bfloat16, 0.5-1.2 ms as
    uint16). Blocks are bitcast back (`as_compute`) before any arithmetic."""
    return jnp.uint16 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def new_pool(store, layers, slots: int, full: bool, scratch: int = 0):
    """A committed device pool [slots + scratch, *store.expert_shape] ([3, H, I], or a packed
    row [B]) in the storage dtype: zeros, or (full) every expert of `layers` at slot
    index(layer) * E + expert, the order of `decisions.init_state(full=True)`."""
    dt, shape = storage_dtype(store.dtype), store.expert_shape
    if full:
        blocks = np.concatenate([store.numpy(i) for i in layers] + [np.zeros((scratch, *shape), store.dtype)])
        return jax.device_put(blocks.view(dt), jax.devices()[0])
    return jax.device_put(jnp.zeros((slots + scratch, *shape), dt), jax.devices()[0])


def as_storage(block, dtype):
    return block if block.dtype == dtype else lax.bitcast_convert_type(block, dtype)


def fetch_block(stack, expert, device_sharding):
    """Inside a jitted program: one expert [3, H, I] of a host stack [E, 3, H, I] (pinned_host)
    copied to device memory. A dynamic slice, never a gather (a gather on a host array fails
    on CPU and becomes host compute on GPU); XLA:GPU makes it an async copy."""
    # expert ids are never negative: no wrap of negative indices (one kernel less per fetch on a GPU)
    block = lax.dynamic_slice(stack, (expert,) + (0,) * (stack.ndim - 1), (1, *stack.shape[1:]),
                              allow_negative_indices=False)
    return jax.device_put(block[0], device_sharding)


@partial(jax.jit, static_argnums=(2,))
def fetch_one(stack, expert, device_sharding):
    return fetch_block(stack, expert, device_sharding)


def write_fetches(pool, stack, fetches, device_sharding, mode: str = DEFAULT_FETCH_MODE):
    """pool [S + 1, 3, H, I] (the last slot is scratch) <- experts fetches.experts[:count] of a
    host stack at fetches.slots[:count]. Modes (docs/benchmarks.md measures them):
      "cond":   one fetch slot per possible miss, each copy inside a lax.cond, then one
                unconditional in-place write (unused slots write to the scratch slot);
      "cond-write": the copy and its write into the pool both inside the lax.cond (one copy
                of the expert instead of two; XLA:GPU copies the whole pool for a write
                inside a branch: 26 pool-shaped copies per decode step of the bundled model
                at 25%, compiled for an H200);
      "loop":   a while loop of `count` iterations, copy + in-place write each (the default,
                DEFAULT_FETCH_MODE);
      "always": branch-free: every fetch slot copies, needed or not.
    "cond", "cond-write" and "loop" move no bytes for a resident expert."""
    if mode == "loop":
        def body(j, pool):
            block = fetch_block(stack, fetches.experts[j], device_sharding)
            return lax.dynamic_update_index_in_dim(pool, as_storage(block, pool.dtype), fetches.slots[j], 0)

        return lax.fori_loop(0, fetches.count, body, pool)
    if mode == "cond-write":
        for j in range(fetches.experts.shape[0]):
            def write(p, e=fetches.experts[j], slot=fetches.slots[j]):
                return lax.dynamic_update_index_in_dim(p, as_storage(fetch_block(stack, e, device_sharding), p.dtype),
                                                       slot, 0)
            pool = lax.cond(j < fetches.count, write, lambda p: p, pool)
        return pool
    if mode == "cond":
        blocks = [lax.cond(j < fetches.count, lambda e=e: fetch_block(stack, e, device_sharding),
                           lambda: jnp.zeros(pool.shape[1:], stack.dtype)) for j, e in enumerate(fetches.experts)]
    else:
        blocks = [fetch_block(stack, e, device_sharding) for e in fetches.experts]
    return land(pool, blocks, fetches)


def land(pool, blocks, fetches, *after):
    """pool [S + 1, ...] <- blocks (copied already, one per entry of fetches) at
    fetches.slots[:count]; the blocks past count go to the scratch slot. The writes are
    ordered after the arrays `after`, computed from the pool's earlier reads (ordered_after)."""
    scratch = pool.shape[0] - 1
    slots = ordered_after(fetches.slots, *after) if after else fetches.slots
    for j, block in enumerate(blocks):
        pool = lax.dynamic_update_index_in_dim(pool, as_storage(block, pool.dtype),
                                               jnp.where(j < fetches.count, slots[j], scratch), 0)
    return pool


@partial(jax.jit, donate_argnums=(0,))
def write_block(pool, block, slot):
    """pool [S, 3, H, I] <- block [3, H, I] at slot (traced): the stepwise engine's pool write."""
    return lax.dynamic_update_index_in_dim(pool, as_storage(block, pool.dtype), slot, axis=0)


def ordered_after(slots, *reads):
    """slots (int32: where writes into the pool go), made to depend on `reads` (arrays computed
    from the pool's contents), so that XLA orders those writes after the reads and updates the
    pool in place. Without it XLA copies the whole pool when a write (a fetch, a prefetch) does
    not depend on a read of the same pool (the next layer's prediction, this layer's expert
    compute): it may not reorder them otherwise. The dependency is r * 0 > 0 for any element of
    r: false at run time whatever r holds (0, or NaN for NaN and inf), and XLA does not fold a
    float product by zero (|r| < 0 it folds). It costs one small reduction, where a loop around
    the reads would make a GPU wait on the host."""
    never = jnp.zeros((), bool)
    for r in reads:
        never = never | jnp.any(r.astype(jnp.float32) * 0 > 0)
    return jnp.where(never, 0, slots).astype(slots.dtype)
