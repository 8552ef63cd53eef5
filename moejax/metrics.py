"""Telemetry of an offloaded run; the metric definitions are in docs/method.md ("Metric definitions")."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Telemetry:
    # hit_rate: over decode steps and MoE layers, unique experts computed that were resident
    # when the layer's plan was made (a landed prefetch counts) / all unique experts computed.
    decode_hits: int = 0
    decode_unique: int = 0
    # substitution_rate: substituted experts / routed expert computations, decode only.
    substituted: int = 0
    # skip_rate: experts dropped by --substitute skip / routed expert computations, decode only.
    skipped: int = 0
    routed: int = 0
    bytes_h2d_decode: int = 0
    bytes_h2d_prefill: int = 0
    transfers: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0  # prefetched experts that the layer then computed
    prefetch_dropped: int = 0  # queued prefetches cancelled once the real scores were known
    prefetch_idle: int = 0  # fixed-width prefetch slots that had no expert to load
    peak_device_bytes: int = 0
    ttft_s: float = float("nan")
    step_s: list[float] = field(default_factory=list)
    # host planning work per MoE layer: classification, substitution, plans (not device waits)
    sched_us: list[float] = field(default_factory=list)

    def count(self, c: dict, expert_bytes: int, idle_copies: bool = False) -> "Telemetry":
        """Take the decision counters (`offload.decisions.COUNTERS`, read from the device).
        idle_copies: the engine copies a block for every idle fixed-width prefetch slot too (the
        fused engine's unconditional copies): those bytes moved, and count."""
        self.decode_hits, self.decode_unique, self.substituted, self.skipped, self.routed = (
            c["hits"], c["unique"], c["substituted"], c["skipped"], c["routed"])
        self.transfers, self.prefetch_issued, self.prefetch_used = c["fetched"], c["prefetch_issued"], c["prefetch_used"]
        self.prefetch_idle, self.prefetch_dropped = c["prefetch_idle"], c["prefetch_dropped"]
        if idle_copies:
            self.transfers += c["prefetch_idle"]
        self.bytes_h2d_decode, self.bytes_h2d_prefill = self.transfers * expert_bytes, c["prefill_fetched"] * expert_bytes
        return self

    @property
    def hit_rate(self) -> float:
        return self.decode_hits / self.decode_unique if self.decode_unique else float("nan")

    @property
    def substitution_rate(self) -> float:
        return self.substituted / self.routed if self.routed else 0.0

    @property
    def skip_rate(self) -> float:
        return self.skipped / self.routed if self.routed else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetch_issued if self.prefetch_issued else float("nan")

    @property
    def tpot_ms(self) -> float:
        return 1e3 * float(np.mean(self.step_s)) if self.step_s else float("nan")

    def summary(self) -> dict:
        return {
            "hit_rate": self.hit_rate, "substitution_rate": self.substitution_rate, "skip_rate": self.skip_rate,
            "bytes_h2d": self.bytes_h2d_decode, "bytes_h2d_prefill": self.bytes_h2d_prefill,
            "transfers": self.transfers, "prefetch_precision": self.prefetch_precision,
            "prefetch_issued": self.prefetch_issued, "prefetch_dropped": self.prefetch_dropped,
            "prefetch_idle": self.prefetch_idle,
            "ttft_ms": 1e3 * self.ttft_s, "tpot_ms": self.tpot_ms, "peak_device_bytes": self.peak_device_bytes,
            "sched_us_median": float(np.median(self.sched_us)) if self.sched_us else float("nan"),
        }
