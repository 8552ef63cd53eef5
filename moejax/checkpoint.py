"""The moejax checkpoint format.

    DIR/moejax.json         {"format": 1, "dtype": ..., "config": MoEConfig}
    DIR/config.json         the source's HF config, verbatim
    DIR/tokenizer*.json ... the source's tokenizer files
    DIR/weights/global      orbax: embed, final_norm[, lm_head]
    DIR/weights/layer_000   orbax: one decoder layer; routed experts stacked [E, 3, H, I]

One orbax item per layer so that conversion streams layer by layer and the offloaded
engine can load a layer's experts into host memory without touching the device.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from moejax.config import MoEConfig
from moejax.errors import CheckpointError

FORMAT = 1
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
    meta = {"format": FORMAT, "dtype": dtype, "config": json.loads(cfg.to_json())}
    (path / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(path: Path) -> tuple[MoEConfig, str]:
    try:
        meta = json.loads((Path(path) / MARKER).read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT}")
        return MoEConfig.from_json(json.dumps(meta["config"])), meta["dtype"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a moejax checkpoint ({e})") from None


def _check_path(path: Path) -> None:
    # tensorstore (under orbax) cannot read back a checkpoint whose path holds brackets
    if any(c in str(path.absolute()) for c in "[]"):
        raise CheckpointError(f"{path}: a checkpoint path cannot contain '[' or ']'")


def save_item(path: Path, name: str, tree: dict[str, np.ndarray]) -> None:
    _check_path(path)
    ck = _checkpointer()
    ck.save((path / "weights" / name).absolute(), tree)
    ck.wait_until_finished()


def load_item(path: Path, name: str) -> dict[str, np.ndarray]:
    """One item as host numpy arrays (never placed on a device)."""
    _check_path(path)
    item = (Path(path) / "weights" / name).absolute()
    if not item.is_dir():
        raise CheckpointError(f"{path}: missing weights/{name}")
    return dict(_checkpointer().restore(item))


def layer_name(i: int) -> str:
    return f"layer_{i:03d}"


def load_params(path: Path) -> tuple[MoEConfig, dict, list[dict]]:
    cfg, _ = read_meta(path)
    glob = load_item(path, "global")
    layers = [load_item(path, layer_name(i)) for i in range(cfg.num_layers)]
    return cfg, glob, layers
