"""`--vram-budget`: parsing, and how a budget splits into dense weights, KV cache, staging
buffers for transfers in flight, and expert-pool slots (docs/design.md's definition)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from moejax.config import MoEConfig
from moejax.errors import MoejaxError
from moejax.model.decoder import cache_bytes
from moejax.model.params import global_shapes, layer_shapes, nbytes

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def parse_budget(text: str) -> tuple[str, float]:
    """'6GiB' -> ('bytes', 6442450944); '25%' -> ('pct', 0.25)."""
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", s)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise MoejaxError(f"--vram-budget {text}: a percentage must be in (0, 100]")
        return "pct", pct / 100
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", s)
    if not m or m.group(2) not in UNITS:
        raise MoejaxError(f"--vram-budget {text!r}: expected a size like 512MiB, 6GiB, 1.5GB or a share like 25%")
    value = float(m.group(1)) * UNITS[m.group(2)]
    if value <= 0:
        raise MoejaxError(f"--vram-budget {text}: must be positive")
    return "bytes", value


@dataclass(frozen=True)
class BudgetPlan:
    budget_bytes: int  # everything the engine may hold on the device
    dense_bytes: int  # embeddings, attention, norms, routers, shared experts, dense MLPs
    kv_bytes: int
    expert_bytes: int  # one routed expert
    staging_slots: int  # transfers that may be in flight at once (their device copies)
    pool_slots: int
    total_experts: int
    min_bytes: int  # the smallest budget that can run
    program_bytes: int = 0  # temporaries of the fused engine's compiled programs
    expert_kind: str = ""  # how a routed expert is stored when quantized: "int8", "int4 g64"

    @property
    def pool_share(self) -> float:
        return self.pool_slots / self.total_experts

    def describe(self) -> str:
        mib = human_bytes
        return (f"budget {mib(self.budget_bytes)} = dense {mib(self.dense_bytes)} + KV cache {mib(self.kv_bytes)} "
                f"+ staging {self.staging_slots} x {mib(self.expert_bytes)} "
                + (f"+ program temporaries {mib(self.program_bytes)} " if self.program_bytes else "")
                + f"+ pool {self.pool_slots} x "
                f"{mib(self.expert_bytes)}{' ' + self.expert_kind if self.expert_kind else ''} "
                f"({100 * self.pool_share:.1f}% of {self.total_experts} experts)")


def dense_bytes(cfg: MoEConfig, itemsize: int) -> int:
    total = nbytes(cfg, global_shapes(cfg), itemsize)
    for i in range(cfg.num_layers):
        shapes = dict(layer_shapes(cfg, i))
        shapes.pop("experts", None)
        total += nbytes(cfg, shapes, itemsize)
    return total


def plan_budget(cfg: MoEConfig, itemsize: int, batch: int, cache_len: int, spec: tuple[str, float] | None,
                prefetch: bool = False, staging: int | None = None, program_bytes: int = 0) -> BudgetPlan:
    """staging: device copies of experts in flight (default: the stepwise engine's, one
    step's worth, twice with prefetch); program_bytes: compiled temporaries (fused engine).
    Quantized experts count their packed bytes (cfg.expert_bytes): a byte budget holds about
    twice the int8 experts it holds in bfloat16; a share (PCT%) is a share of the experts."""
    total = cfg.num_experts * len(cfg.moe_layer_ids)
    eb = cfg.expert_bytes(itemsize)
    per_step = min(batch * cfg.top_k, cfg.num_experts)  # the most one layer needs at once
    if staging is None:
        staging = per_step * (2 if prefetch else 1)
    dense, kv = dense_bytes(cfg, itemsize), cache_bytes(cfg, batch, cache_len, itemsize)
    fixed = dense + kv + staging * eb + program_bytes
    min_bytes = fixed + per_step * eb
    if spec is None:
        slots = total
    elif spec[0] == "pct":
        slots = min(total, int(spec[1] * total + 1e-9))
        if slots < per_step:
            raise MoejaxError(f"--vram-budget {100 * spec[1]:g}% holds {slots} experts; this model needs at least "
                              f"{per_step} ({100 * per_step / total:.2f}%) for one step at batch {batch}")
    else:
        if spec[1] < min_bytes:
            raise MoejaxError(f"--vram-budget {spec[1] / 2**20:.2f} MiB is below the minimum of "
                              f"{min_bytes / 2**20:.2f} MiB ({min_bytes} bytes: dense {dense} + KV {kv} + "
                              f"{per_step + staging} experts of {eb}"
                              + (f" + program temporaries {program_bytes}" if program_bytes else "") + ")")
        slots = min(total, int((spec[1] - fixed) // eb))
    kind = "" if cfg.quant is None else cfg.expert_quant + (f" g{cfg.expert_group}" if cfg.expert_group else "")
    return BudgetPlan(fixed + slots * eb, dense, kv, eb, staging, slots, total, min_bytes, program_bytes, kind)
