"""Errors that mean "bad input", as opposed to bugs. The CLI turns each into a one-line
`error: ...` on stderr and exit code 2; the Python API lets them propagate."""


class MoejaxError(Exception):
    """Base class for user-facing errors."""


class UnsupportedConfig(MoejaxError, ValueError):
    """The checkpoint uses a model type or option that moejax does not implement."""


class ConversionError(MoejaxError):
    """A source checkpoint cannot be converted (missing, unknown, mis-shaped or corrupt tensors)."""


class CheckpointError(MoejaxError):
    """A path is not a usable moejax or Hugging Face checkpoint."""
