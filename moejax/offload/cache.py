"""Device expert pool: a fixed number of slots allocated once, written in place through a
jitted, donated update with a traced slot index, plus the expert -> slot table.

Which experts are cached changes only the table and the slot indices the compute gathers
from, never a shape, so nothing recompiles."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


@partial(jax.jit, donate_argnums=(0,))
def _write(pool, block, slot):
    """pool [S, 3, H, I] <- block [3, H, I] at slot (traced)."""
    return jax.lax.dynamic_update_index_in_dim(pool, block.astype(pool.dtype), slot, axis=0)


class ExpertPool:
    """Slots shared by all MoE layers (the paper's global cache), or split evenly per layer."""

    def __init__(self, slots: int, expert_shape, dtype, layers: list[int], num_experts: int,
                 per_layer: bool = False, device: bool = True):
        """device=False keeps only the bookkeeping (trace replay simulates a pool)."""
        if slots < 1:
            raise ValueError("the expert pool needs at least one slot")
        self.slots = slots
        self.array = (jax.device_put(jnp.zeros((slots, *expert_shape), dtype), jax.devices()[0])  # committed
                      if device else None)
        self.slot_of: dict[tuple[int, int], int] = {}
        self.key_of: list[tuple[int, int] | None] = [None] * slots
        # table[layer, expert] = slot or -1: turns routed ids into slot ids with one numpy take
        self.table = np.full((max(layers) + 1, num_experts), -1, np.int32)
        self.per_layer = per_layer
        if per_layer:
            share = slots // len(layers)
            self._range = {l: range(i * share, (i + 1) * share) for i, l in enumerate(layers)}
        self.writes = 0

    def slot_range(self, layer: int) -> range:
        return self._range[layer] if self.per_layer else range(self.slots)

    def resident(self, layer: int) -> set[int]:
        return {e for (l, e) in self.slot_of if l == layer}

    def free_slot(self, layer: int) -> int | None:
        for s in self.slot_range(layer):
            if self.key_of[s] is None:
                return s
        return None

    def keys_in_range(self, layer: int) -> list[tuple[int, int]]:
        return [k for s in self.slot_range(layer) if (k := self.key_of[s]) is not None]

    def evict(self, key: tuple[int, int]) -> int:
        slot = self.slot_of.pop(key)
        self.key_of[slot] = None
        self.table[key] = -1
        return slot

    def put(self, key: tuple[int, int], slot: int, block: jax.Array) -> None:
        """Place a (device) expert block in a free slot."""
        assert self.key_of[slot] is None, f"slot {slot} is taken by {self.key_of[slot]}"
        if self.array is not None:
            self.array = _write(self.array, block, np.int32(slot))
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self.table[key] = slot
        self.writes += 1

    @property
    def nbytes(self) -> int:
        return self.array.nbytes
