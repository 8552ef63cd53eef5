"""moejax: importance-driven expert scheduling for MoE inference in JAX/Flax."""

import os


def _round_every_op() -> None:
    """XLA may skip bfloat16 roundings inside a fusion ("excess precision"), so the same
    computation rounds differently in two programs that fuse it differently. The resident
    model, the fused engine's one program per step and the stepwise engine's small programs
    must agree bit for bit (alpha 0 = the resident tokens; the engines make the same
    decisions), so moejax turns that off, as PyTorch rounds after every op. It takes effect
    if moejax is imported before JAX starts its backend; XLA_FLAGS set by the user win."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_allow_excess_precision" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_allow_excess_precision=false".strip()


_round_every_op()

from moejax.errors import MoejaxError  # noqa: E402

__all__ = ["Model", "MoEConfig", "MoejaxError", "load"]
__version__ = "0.1.0"

_LAZY = {"Model": "moejax.api", "load": "moejax.api", "MoEConfig": "moejax.config"}


def __getattr__(name):
    """Model, load and MoEConfig, and submodules (`moejax.api`, ...), are imported on first
    use, so that `moejax -h` and a bad flag answer without importing JAX and Flax (seconds)."""
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"moejax.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"moejax.{name}":
                raise
    raise AttributeError(f"module 'moejax' has no attribute {name!r}")
