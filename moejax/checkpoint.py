"""The moejax checkpoint format.

    DIR/moejax.json         {"format": 1, "dtype": ..., "config": MoEConfig, "sizes": {file: bytes}}
    DIR/config.json         the source's HF config, verbatim
    DIR/tokenizer*.json ... the source's tokenizer files
    DIR/weights/global      orbax: embed, final_norm[, lm_head]
    DIR/weights/layer_000   orbax: one decoder layer; routed experts stacked [E, 3, H, I], or
                            packed rows [E, B] uint8 when quantized (config's expert_quant,
                            moejax/quant.py)

One orbax item per layer so that conversion streams layer by layer and the offloaded
engine can load a layer's experts into host memory without touching the device. `sizes`
lists every file under weights/ with its size, so that a truncated file is reported by name
before tensorstore reads it (checkpoints written without it are loaded unchecked).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from moejax.config import MoEConfig
from moejax.errors import CheckpointError, UnsupportedConfig

FORMAT = 1
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}  # a checkpoint's dtypes
MARKER = "moejax.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def _checkpointer():
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.ERROR)
    return ocp.StandardCheckpointer()


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def write_meta(path: Path, cfg: MoEConfig, dtype: str) -> None:
    """The marker file, written last: after every item is saved."""
    files = sorted(f for f in (path / "weights").rglob("*") if f.is_file())
    sizes = {f.relative_to(path).as_posix(): f.stat().st_size for f in files}
    meta = {"format": FORMAT, "dtype": dtype, "config": json.loads(cfg.to_json()), "sizes": sizes}
    (path / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(path: Path) -> tuple[MoEConfig, str]:
    try:
        meta = json.loads((Path(path) / MARKER).read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT}")
        return MoEConfig.from_json(json.dumps(meta["config"])), meta["dtype"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a moejax checkpoint ({e})") from None
    except UnsupportedConfig as e:  # e.g. experts quantized by a scheme this moejax does not know
        raise CheckpointError(f"{path}: {e}") from None


def _check_path(path: Path) -> None:
    # tensorstore (under orbax) cannot read back a checkpoint whose path holds brackets
    if any(c in str(path.absolute()) for c in "[]"):
        raise CheckpointError(f"{path}: a checkpoint path cannot contain '[' or ']'")


def save_item(path: Path, name: str, tree: dict[str, np.ndarray]) -> None:
    _check_path(path)
    ck = _checkpointer()
    ck.save((path / "weights" / name).absolute(), tree)
    ck.wait_until_finished()


def _check_sizes(path: Path, name: str) -> None:
    """Every file of item `name` has the size recorded at conversion."""
    try:
        sizes = json.loads((path / MARKER).read_text()).get("sizes", {})
    except (OSError, ValueError, AttributeError):
        return  # read_meta reports an unreadable marker
    prefix = f"weights/{name}/"
    for rel, size in sizes.items():
        if rel.startswith(prefix):
            f = path / rel
            if not f.is_file():
                raise CheckpointError(f"{path}: {rel} is missing (convert the checkpoint again)")
            if f.stat().st_size != size:
                raise CheckpointError(f"{path}: {rel} is truncated or altered ({f.stat().st_size} bytes, "
                                      f"{size} written; convert the checkpoint again)")


class _AbandonedReads(logging.Filter):
    """asyncio's log of a task or future garbage-collected with its error unread: a read of
    the failed restore that orbax did not wait for."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        unread = str(record.msg).startswith(("Task exception was never retrieved", "Future exception was never retrieved"))
        return not (unread and isinstance(exc, ValueError))


def _quiet_abandoned_reads() -> None:
    """When one read of a restore fails, orbax returns and closes its event loop with the
    item's other tensorstore reads still in flight. Each of those later prints a traceback:
    "Event loop is closed" (an unraisable exception, when its result calls back into the
    closed loop) or "Task/Future exception was never retrieved" (asyncio's log, when it
    failed too).
    The error the user sees is the CheckpointError; drop these two. Installed before the
    first restore and kept: the callbacks can come before the failed restore has returned
    (CI saw one; about 1 run in 5 on this machine)."""
    previous = sys.unraisablehook
    if getattr(previous, "moejax", False):
        return

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            previous(u)

    hook.moejax = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AbandonedReads())


def load_item(path: Path, name: str) -> dict[str, np.ndarray]:
    """One item as host numpy arrays (never placed on a device)."""
    path = Path(path)
    _check_path(path)
    item = (path / "weights" / name).absolute()
    if not item.is_dir():
        raise CheckpointError(f"{path}: missing weights/{name}")
    _check_sizes(path, name)
    _quiet_abandoned_reads()
    try:
        return dict(_checkpointer().restore(item))
    except ValueError as e:  # tensorstore: OUT_OF_RANGE, DATA_LOSS, ... (no sizes recorded, or same size)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: weights/{name} is damaged (convert the checkpoint again): {reason}") from None


def layer_name(i: int) -> str:
    return f"layer_{i:03d}"


def load_params(path: Path) -> tuple[MoEConfig, dict, list[dict]]:
    cfg, _ = read_meta(path)
    glob = load_item(path, "global")
    layers = [load_item(path, layer_name(i)) for i in range(cfg.num_layers)]
    return cfg, glob, layers
