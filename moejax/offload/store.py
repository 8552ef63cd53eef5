"""Host expert store: every routed expert in host memory, one contiguous [3, H, I] block
each, fetched to the device as an explicit transfer future."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import jax
import numpy as np


@dataclass
class Transfer:
    """One expert on its way host -> device. `array` is the device copy (async)."""

    key: tuple[int, int]  # (layer, expert)
    array: jax.Array
    nbytes: int
    t_start: float
    kind: str = "fetch"  # "fetch" | "prefetch" | "prefill"
    t_end: float | None = field(default=None)

    def ready(self) -> bool:
        return self.t_end is not None or self.array.is_ready()

    def wait(self) -> jax.Array:
        if self.t_end is None:
            self.array.block_until_ready()
            self.t_end = time.perf_counter()
        return self.array


class HostExpertStore:
    """Routed experts of every MoE layer, kept off the device.

    Uses `pinned_host` jax arrays where the backend has that memory kind (page-locked, so a
    copy to the device is a straight DMA), numpy arrays otherwise."""

    def __init__(self, experts: dict[int, np.ndarray], device=None):
        self.device = device or jax.devices()[0]
        kinds = {m.kind for m in self.device.addressable_memories()}
        self.memory_kind = "pinned_host" if "pinned_host" in kinds else "numpy"
        self._device_sharding = jax.sharding.SingleDeviceSharding(self.device)
        host = (jax.sharding.SingleDeviceSharding(self.device, memory_kind="pinned_host")
                if self.memory_kind == "pinned_host" else None)
        self._experts: dict[tuple[int, int], object] = {}
        first = next(iter(experts.values()))
        self.expert_shape, self.dtype = first.shape[1:], first.dtype
        self.expert_bytes = int(np.prod(self.expert_shape)) * first.dtype.itemsize
        for layer, stack in experts.items():  # stack [E, 3, H, I]
            for e in range(stack.shape[0]):
                block = np.ascontiguousarray(stack[e])
                self._experts[(layer, e)] = jax.device_put(block, host) if host else block
        self.layers = sorted(experts)

    def fetch(self, layer: int, expert: int, kind: str = "fetch") -> Transfer:
        """Start copying one expert to the device; returns at once."""
        t = time.perf_counter()
        arr = jax.device_put(self._experts[(layer, expert)], self._device_sharding)
        return Transfer((layer, expert), arr, self.expert_bytes, t, kind)
