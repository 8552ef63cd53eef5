"""Host expert store: every routed expert in host memory, one contiguous [3, H, I] block
each, fetched to the device as an explicit transfer future."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import jax
import numpy as np

from moejax.offload.cache import storage_dtype

if TYPE_CHECKING:
    from moejax.config import MoEConfig


@dataclass(eq=False)  # identity, not field equality: two transfers of one expert are distinct
class Transfer:
    """One expert on its way host -> device. `array` is the device copy (async). On an
    emulated link, link_start/link_end say when the link moves it; on a real link both are
    the issue time and readiness is the array's own."""

    key: tuple[int, int]  # (layer, expert)
    array: jax.Array
    nbytes: int
    t_start: float  # when it was issued
    kind: str = "fetch"  # "fetch" | "prefetch" | "prefill"
    link_start: float = 0.0
    link_end: float = 0.0

    def ready(self) -> bool:
        return time.perf_counter() >= self.link_end and self.array.is_ready()

    def wait(self) -> jax.Array:
        delay = self.link_end - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return self.array.block_until_ready()


class Link:
    """The host -> device link. Real (bandwidth None): transfers take what device_put takes.
    Emulated: one transfer at a time, each done no earlier than latency + bytes / bandwidth
    after it starts, concurrently with compute -- for machines where host and device share
    memory (docs/design.md, "Measuring"). Transfers that have not started can be cancelled."""

    def __init__(self, bandwidth: float | None = None, latency: float = 0.0):
        self.bandwidth, self.latency = bandwidth, latency
        self.queue: list[Transfer] = []  # scheduled and not yet finished, in link order

    @property
    def emulated(self) -> bool:
        return self.bandwidth is not None

    def describe(self) -> str:
        if not self.emulated:
            return "real"
        return f"emulated link: {self.bandwidth / 1e9:g} GB/s, {self.latency * 1e6:g} us latency"

    def _place(self, tr: Transfer, now: float) -> None:
        begin = max(now, self.queue[-1].link_end if self.queue else now)
        tr.link_start, tr.link_end = begin, begin + self.latency + tr.nbytes / self.bandwidth
        self.queue.append(tr)

    def schedule(self, tr: Transfer) -> None:
        tr.link_start = tr.link_end = tr.t_start
        if self.emulated:
            self.queue = [t for t in self.queue if t.link_end > tr.t_start]
            self._place(tr, tr.t_start)

    def cancel(self, tr: Transfer) -> bool:
        """Drop a transfer the link has not started; the ones queued after it move up."""
        now = time.perf_counter()
        if not self.emulated or tr not in self.queue or tr.link_start <= now:
            return False
        i = self.queue.index(tr)
        later = self.queue[i + 1:]
        del self.queue[i:]
        for t in later:
            self._place(t, now)
        return True


def parse_link(text: str) -> Link:
    """'real' or 'emulated:BW,LAT' with BW in bytes/s units (e.g. 2GB/s) and LAT in s/ms/us."""
    from moejax.errors import MoejaxError

    if text == "real":
        return Link()
    m = re.fullmatch(r"emulated:(\d+(?:\.\d+)?)\s*([kmgt]?)b/s,(\d+(?:\.\d+)?)\s*(s|ms|us)", text.strip().lower())
    if not m:
        raise MoejaxError(f"--link {text!r}: expected 'real' or 'emulated:BW,LAT' such as emulated:2GB/s,10us")
    bw = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
    lat = float(m.group(3)) * {"s": 1, "ms": 1e-3, "us": 1e-6}[m.group(4)]
    if bw <= 0:
        raise MoejaxError(f"--link {text!r}: bandwidth must be positive")
    return Link(bw, lat)


class HostExpertStore:
    """Routed experts of every MoE layer, kept off the device: one [E, 3, H, I] stack per
    layer (each expert a contiguous block), in `pinned_host` memory where the backend has
    that memory kind (page-locked, so a copy to the device is a straight DMA), numpy arrays
    otherwise. A fetch is `cache.fetch_block` (a dynamic slice + device_put inside a jitted
    program), the same copy the fused engine makes in its one program per step."""

    def __init__(self, experts: dict[int, np.ndarray], device=None):
        self.device = device or jax.devices()[0]
        kinds = {m.kind for m in self.device.addressable_memories()}
        self.memory_kind = "pinned_host" if "pinned_host" in kinds else "numpy"
        self.device_sharding = jax.sharding.SingleDeviceSharding(self.device, memory_kind="device")
        host = jax.sharding.SingleDeviceSharding(self.device, memory_kind="pinned_host")
        first = next(iter(experts.values()))
        self.expert_shape, self.dtype = first.shape[1:], first.dtype
        self.expert_bytes = int(np.prod(self.expert_shape)) * first.dtype.itemsize
        # in the pool's storage dtype (bfloat16 as uint16 bits): XLA:CPU slices a bfloat16 host
        # stack through float32 (a convert per element, 25 us per 72 KiB expert), bits it copies
        store = {layer: np.ascontiguousarray(stack).view(storage_dtype(stack.dtype)) for layer, stack in experts.items()}
        self.stacks = {layer: jax.device_put(stack, host) if self.memory_kind == "pinned_host" else stack
                       for layer, stack in store.items()}  # [E, 3, H, I]
        self.layers = sorted(experts)

    def numpy(self, layer: int) -> np.ndarray:
        """The layer's stack [E, 3, H, I] in the experts' dtype."""
        return np.asarray(self.stacks[layer]).view(self.dtype)

    def fetch(self, layer: int, expert: int, kind: str = "fetch", link: Link | None = None) -> Transfer:
        """Start copying one expert to the device; returns at once."""
        from moejax.offload.cache import fetch_one

        t = time.perf_counter()
        stack = self.stacks[layer]
        if self.memory_kind == "pinned_host":
            arr = fetch_one(stack, np.int32(expert), self.device_sharding)
        else:
            arr = jax.device_put(stack[expert], self.device_sharding)
        tr = Transfer((layer, expert), arr, self.expert_bytes, t, kind)
        (link or Link()).schedule(tr)
        return tr


class Parts(NamedTuple):
    """What an engine needs from a checkpoint. Engines may share one (benchmarks build many)."""

    config: "MoEConfig"
    glob: dict  # global params (embedding, final norm, LM head)
    layers: list  # per-layer params, without the routed experts
    store: HostExpertStore  # the routed experts, in host memory


def load_parts(path) -> Parts:
    """A checkpoint (a path) -> Parts; the routed experts never touch the device here."""
    from pathlib import Path

    from moejax import checkpoint

    path = Path(path)
    cfg, _ = checkpoint.read_meta(path)
    glob = checkpoint.load_item(path, "global")
    layers, experts = [], {}
    for i in range(cfg.num_layers):
        p = checkpoint.load_item(path, checkpoint.layer_name(i))
        if cfg.moe_layers[i]:
            experts[i] = p.pop("experts")
        layers.append(p)
    return Parts(cfg, glob, layers, HostExpertStore(experts))
