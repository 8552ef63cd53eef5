"""moejax: importance-driven expert scheduling for MoE inference in JAX/Flax."""

from moejax.api import Model, load
from moejax.config import MoEConfig
from moejax.errors import MoejaxError

__all__ = ["Model", "MoEConfig", "MoejaxError", "load"]
__version__ = "0.1.0"
