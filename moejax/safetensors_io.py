"""A small, strict safetensors reader (no torch; bf16 through ml_dtypes).

Only headers are parsed up front; tensor data is read lazily, one tensor at a time, with a
plain read into a buffer of its own (no memory map, so no open file or mapping outlives
the call), so converting a model needs host memory for about one layer. Every header is
validated against the file size, so a truncated or corrupt file is reported by name
before anything is written.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from moejax.errors import ConversionError

# safetensors dtype codes (not a checkpoint's dtypes: those are moejax.checkpoint.DTYPES)
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one .safetensors header; raise ConversionError naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path.name}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise ConversionError(f"{path.name}: corrupt or truncated safetensors header")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConversionError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path.name}: corrupt safetensors header")
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path.name}: tensor {name}: unsupported or malformed header entry") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise ConversionError(f"{path.name}: tensor {name}: byte range does not match its shape")
        if base + end > size:
            raise ConversionError(f"{path.name}: truncated: tensor {name} ends past the end of the file")
        out[name] = TensorInfo(path, dtype, shape, base + begin, base + end)
    return out


def index_checkpoint(src: Path) -> dict[str, TensorInfo]:
    """All tensors of a single-file or sharded checkpoint directory, by name."""
    index_file = src / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise ConversionError(f"{index_file.name}: not a valid safetensors index") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise ConversionError(f"shard {missing[0]} listed in {index_file.name} does not exist")
        paths = [src / f for f in files]
    else:
        paths = sorted(src.glob("*.safetensors"))
        if not paths:
            raise ConversionError(f"no *.safetensors files in {src}")
    tensors: dict[str, TensorInfo] = {}
    for p in paths:
        for name, info in read_header(p).items():
            if name in tensors:
                raise ConversionError(f"duplicate tensor {name} in {tensors[name].file.name} and {p.name}")
            tensors[name] = info
    return tensors


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor's bytes (a copy, so no file handle outlives the call)."""
    count = math.prod(info.shape)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        buf = f.read(info.end - info.start)
    if len(buf) != info.end - info.start:
        raise ConversionError(f"{info.file.name}: truncated while reading a tensor")
    return np.frombuffer(buf, dtype=info.dtype, count=count).reshape(info.shape)
