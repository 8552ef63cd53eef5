"""The Python API: `moejax.load(path) -> Model`, `Model.forward(tokens) -> logits`."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import checkpoint, kernels
from moejax.checkpoint import DTYPES
from moejax.config import MoEConfig
from moejax.errors import CheckpointError
from moejax.model.decoder import Decoder, empty_cache

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hugging Face Hub spells them
# What a conversion reads: config, tokenizer, safetensors (never *.bin, *.pt or other formats;
# nor the copies in Mistral's own layout that some repositories hold beside the HF one)
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
HUB_SKIP = ["consolidated*", "original/*"]


class Model:
    """A decoder with all experts resident on the device: the reference for offloading."""

    def __init__(self, config: MoEConfig, glob: dict, layers: list[dict], path: Path | None = None):
        self.config = config
        self.path = path
        self.module = Decoder(config, glob, layers)
        self.graphdef, self.state = nnx.split(self.module)
        kernels.huge_pages(jax.tree.leaves(self.state))
        self._tokenizer = None

    @property
    def dtype(self):
        return self.module.dtype

    def forward(self, tokens) -> np.ndarray:
        """tokens int [B, T] -> float32 logits [B, T, V] (full causal forward, all experts resident)."""
        from moejax.generate import run_decoder

        tokens = jnp.asarray(np.asarray(tokens, np.int32))
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        cache = empty_cache(self.config, tokens.shape[0], tokens.shape[1], self.dtype)
        logits, _ = run_decoder(self.graphdef, self.state, tokens, cache, jnp.int32(0))
        return np.asarray(logits)

    def generate(self, prompt, max_new_tokens: int, **kw):
        from moejax.generate import generate

        return generate(self, prompt, max_new_tokens, **kw)

    @property
    def tokenizer(self):
        """The checkpoint's own tokenizer (`tokenizers.Tokenizer`), or None if it has none."""
        if self._tokenizer is None and self.path is not None:
            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer


def cache_dir() -> Path:
    return Path(os.environ.get("MOEJAX_CACHE", Path.home() / ".cache" / "moejax"))


def enable_compile_cache() -> Path | None:
    """Keep compiled XLA programs in cache_dir() / "xla", so a later process reuses them
    instead of compiling again. MOEJAX_NO_COMPILE_CACHE=1 leaves JAX's settings alone.
    -> the directory, or None when turned off."""
    import jax

    if os.environ.get("MOEJAX_NO_COMPILE_CACHE", "0") not in ("", "0"):
        return None
    path = str(cache_dir() / "xla")
    if jax.config.jax_compilation_cache_dir not in (None, path):
        from jax._src import compilation_cache

        compilation_cache.reset_cache()  # JAX opens its cache directory once per process
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return Path(path)


def _converted_copy(src: Path, name: str | None = None) -> Path:
    """Convert an HF directory once into the cache, keyed by its path and file stamps.

    Processes converting the same directory at once take turns on a lock file beside the
    cached copy: the first converts, the others find the finished copy. A copy appears
    complete or not at all (convert renames it into place), so readers need no lock."""
    from filelock import FileLock

    from moejax.convert import convert, remove_stale

    h = hashlib.sha256(str(src.resolve()).encode())
    for f in sorted(src.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    cache = cache_dir()
    dst = cache / f"{name or src.name}-{h.hexdigest()[:16]}"
    if checkpoint.is_checkpoint(dst):
        return dst
    MoEConfig.from_hf(src)  # a bad config.json is reported before the cache is touched
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = FileLock(cache / f".{dst.name}.lock")
        lock.acquire()
    except OSError as e:
        raise CheckpointError(f"cannot write the conversion cache {cache} ({e.strerror or e}): "
                              "set MOEJAX_CACHE to a writable directory") from None
    try:
        remove_stale(cache)  # what killed conversions left
        if not checkpoint.is_checkpoint(dst):
            convert(src, dst, force=True, progress=False)
    finally:
        lock.release()
    return dst


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a Hugging Face Hub model (config, tokenizer and safetensors
    only), downloaded into the Hub's own cache unless it is there (HF_HUB_OFFLINE=1: only
    what is there)."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES,
                                                            ignore_patterns=HUB_SKIP))
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{repo_id} is not a local directory and was not found on the Hugging Face Hub "
                              f"({type(e).__name__}: {reason})") from None


def resolve(path: str | Path) -> Path:
    """A converted checkpoint directory for path: itself, the cached conversion of an HF
    directory, or of a Hugging Face Hub model ("owner/name", when no such path exists)."""
    if not Path(path).exists() and HUB_ID.fullmatch(str(path)):
        return _converted_copy(hub_snapshot(str(path)), name=str(path).replace("/", "--"))
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if checkpoint.is_checkpoint(path):
        return path
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return _converted_copy(path)
    raise CheckpointError(f"{path} is not a moejax or Hugging Face checkpoint")


def load_tokenizer(path: Path):
    """The checkpoint's own tokenizer (`tokenizers.Tokenizer`), or None if it has none."""
    if not (Path(path) / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))


def load(path: str | Path, dtype: str | None = None) -> Model:
    """Load a converted checkpoint, or an HF directory (converted on the fly into the cache)."""
    path = resolve(path)
    cfg, glob, layers = checkpoint.load_params(path)
    if dtype is not None:
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        cast = lambda d: {k: v if v.dtype == np.uint8 else v.astype(DTYPES[dtype]) for k, v in d.items()}  # noqa: E731
        glob, layers = cast(glob), [cast(p) for p in layers]
    return Model(cfg, glob, layers, path)
