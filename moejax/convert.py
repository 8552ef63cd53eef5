"""Hugging Face safetensors -> moejax checkpoint.

The key map is declarative: `source_table(cfg, layout)` lists every tensor the source must
hold, with its expected shape and where (and how transformed) it lands in our parameters.
Unknown, missing, duplicate and mis-shaped tensors are all found from the headers before a
byte is written; then layers are converted one at a time into a temporary directory
`.DST.tmp-PID` that is renamed into place at the end, so DST is either absent or complete.
A conversion killed before the rename leaves its temporary directory behind; the next
conversion into the same place removes it once process PID has ended.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from moejax import checkpoint, families
from moejax.checkpoint import DTYPES
from moejax.config import MoEConfig, read_hf_config
from moejax.errors import CheckpointError, ConversionError
from moejax.model.params import dtype_of, global_shapes, layer_shapes
from moejax.quant import quantize
from moejax.safetensors_io import TensorInfo, index_checkpoint, read_tensor


@dataclasses.dataclass(frozen=True)
class Source:
    """One HF tensor: expected shape, and where it goes: target[index] = transform(tensor)."""

    key: str
    shape: tuple[int, ...]
    scope: int | None  # layer index, or None for global parameters
    target: str
    index: tuple = ()
    transform: Callable[[np.ndarray], np.ndarray] = lambda a: a


def _t(a):
    return a.T


def _linear(key, scope, target, n_in, n_out):
    """nn.Linear weight [out, in] -> ours [in, out]."""
    return Source(key, (n_out, n_in), scope, target, (), _t)


def _swiglu(prefix, names, scope, target, H, I, lead=()):
    """gate/up [I, H] -> target[..., 0/1] = [H, I]; down [H, I] -> target[..., 2] as is."""
    gate, up, down = names
    return [
        Source(f"{prefix}.{gate}.weight", (I, H), scope, target, (*lead, 0), _t),
        Source(f"{prefix}.{up}.weight", (I, H), scope, target, (*lead, 1), _t),
        Source(f"{prefix}.{down}.weight", (H, I), scope, target, (*lead, 2)),
    ]


def _rope_rows(cfg: MoEConfig, lead: int, heads: int) -> np.ndarray | None:
    """Row order that moves each head's rope dims (the last head_dim of every lead + head_dim
    rows) from interleaved pairs (0, 1), (2, 3), ... to HF's half split (0, 2, ..., 1, 3, ...);
    None if the checkpoint is not interleaved. Applied to the rows that make q and the rope
    key alike, it leaves every q . k unchanged."""
    if not cfg.rope_interleave:
        return None
    Dr = cfg.head_dim
    within = np.concatenate([np.arange(lead), lead + np.arange(0, Dr, 2), lead + np.arange(1, Dr, 2)])
    return (np.arange(heads)[:, None] * (lead + Dr) + within).reshape(-1)


def _linear_rows(key, scope, target, n_in, n_out, rows):
    """nn.Linear weight [out, in], output rows reordered by `rows` (None: as is) -> [in, out]."""
    if rows is None:
        return _linear(key, scope, target, n_in, n_out)
    return Source(key, (n_out, n_in), scope, target, (), lambda a, rows=rows: a[rows].T)


def _mla_sources(cfg: MoEConfig, a: str, i: int) -> list[Source]:
    H, Q, R, Ql = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.q_lora_rank
    Dn, Dr, Dv = cfg.qk_nope_head_dim, cfg.head_dim, cfg.v_head_dim
    q_rows, kv_rows = _rope_rows(cfg, Dn, Q), _rope_rows(cfg, R, 1)
    src = [
        _linear_rows(f"{a}.kv_a_proj_with_mqa.weight", i, "wkv_a", H, R + Dr, kv_rows),
        Source(f"{a}.kv_a_layernorm.weight", (R,), i, "kv_a_norm"),
        _linear(f"{a}.kv_b_proj.weight", i, "wkv_b", R, Q * (Dn + Dv)),
        _linear(f"{a}.o_proj.weight", i, "wo", Q * Dv, H),
    ]
    if Ql:
        src += [
            _linear(f"{a}.q_a_proj.weight", i, "wq_a", H, Ql),
            Source(f"{a}.q_a_layernorm.weight", (Ql,), i, "q_a_norm"),
            _linear_rows(f"{a}.q_b_proj.weight", i, "wq", Ql, Q * (Dn + Dr), q_rows),
        ]
    else:
        src.append(_linear_rows(f"{a}.q_proj.weight", i, "wq", H, Q * (Dn + Dr), q_rows))
    return src


def source_table(cfg: MoEConfig, fused: bool) -> dict[str, Source]:
    """Every tensor the HF checkpoint must contain, by key."""
    H, V, D = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_heads * D, cfg.num_kv_heads * D
    E, I = cfg.num_experts, cfg.moe_intermediate_size
    names = families.get(cfg.model_type).EXPERTS
    hf_mlp = ("gate_proj", "up_proj", "down_proj")
    src = [
        Source("model.embed_tokens.weight", (V, H), None, "embed"),
        Source("model.norm.weight", (H,), None, "final_norm"),
    ]
    if not cfg.tie_word_embeddings:
        src.append(_linear("lm_head.weight", None, "lm_head", H, V))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        src += [
            Source(f"{p}.input_layernorm.weight", (H,), i, "attn_norm"),
            Source(f"{p}.post_attention_layernorm.weight", (H,), i, "mlp_norm"),
        ]
        if cfg.attention == "mla":
            src += _mla_sources(cfg, a, i)
        else:
            src += [
                _linear(f"{a}.q_proj.weight", i, "wq", H, q),
                _linear(f"{a}.k_proj.weight", i, "wk", H, kv),
                _linear(f"{a}.v_proj.weight", i, "wv", H, kv),
                _linear(f"{a}.o_proj.weight", i, "wo", q, H),
            ]
        if cfg.qkv_bias:
            src += [Source(f"{a}.{n}_proj.bias", (s,), i, f"b{n}") for n, s in (("q", q), ("k", kv), ("v", kv))]
        if cfg.o_bias:
            src.append(Source(f"{a}.o_proj.bias", (H,), i, "bo"))
        if cfg.qk_norm != "none":
            qs, ks = ((D,), (D,)) if cfg.qk_norm == "head" else ((q,), (kv,))
            src += [Source(f"{a}.q_norm.weight", qs, i, "q_norm"), Source(f"{a}.k_norm.weight", ks, i, "k_norm")]
        if not cfg.moe_layers[i]:
            src += _swiglu(f"{p}.mlp", hf_mlp, i, "mlp", H, cfg.dense_intermediate_size)
            continue
        block = f"{p}.mlp" if fused else f"{p}.{names.block}"
        src.append(_linear(f"{block}.gate.weight", i, "router", H, E))
        if cfg.topk_method == "noaux_tc":
            src.append(Source(f"{block}.gate.e_score_correction_bias", (E,), i, "router_bias"))
        if fused:
            # gate_up_proj [E, 2I, H] (gate rows first) -> experts[:, 0:2] = [E, 2, H, I]
            src.append(Source(f"{block}.experts.gate_up_proj", (E, 2 * I, H), i, "experts",
                              (slice(None), slice(0, 2)),
                              lambda a, E=E, I=I, H=H: a.reshape(E, 2, I, H).transpose(0, 1, 3, 2)))
            src.append(Source(f"{block}.experts.down_proj", (E, H, I), i, "experts", (slice(None), 2)))
        else:
            gate_up_down = (names.gate, names.up, names.down)
            for e in range(E):
                src += _swiglu(f"{block}.experts.{e}", gate_up_down, i, "experts", H, I, lead=(e,))
        if cfg.shared_intermediate_size:
            src += _swiglu(f"{block}.{names.shared}", hf_mlp, i, "shared", H, cfg.shared_intermediate_size)
            if cfg.shared_expert_gate:
                src.append(_linear(f"{block}.shared_expert_gate.weight", i, "shared_gate", H, 1))
    return {s.key: s for s in src}


def check_tensors(table: dict[str, Source], tensors: dict[str, TensorInfo], cfg: MoEConfig) -> None:
    """Key-set equality and shapes, from headers only."""
    extra = set(tensors) - set(table)
    if cfg.tie_word_embeddings:
        extra.discard("lm_head.weight")  # some writers keep the tied copy; it is the embedding
    ignored = getattr(families.get(cfg.model_type), "ignored", None)
    if ignored is not None:  # tensors a family knows and does not use (e.g. deepseek_v3's MTP layers)
        extra = {k for k in extra if not ignored(k, cfg)}
    if extra:
        raise ConversionError(f"unknown tensor {sorted(extra)[0]} ({len(extra)} unknown in all)")
    missing = set(table) - set(tensors)
    if missing:
        raise ConversionError(f"missing tensor {sorted(missing)[0]} ({len(missing)} missing in all)")
    for key, s in table.items():
        if tensors[key].shape != s.shape:
            raise ConversionError(f"tensor {key} has shape {list(tensors[key].shape)}, expected {list(s.shape)}")


def _assemble(cfg: MoEConfig, sources: list[Source], shapes: dict, tensors: dict[str, TensorInfo],
              dtype) -> dict[str, np.ndarray]:
    out = {name: np.empty(shape, dtype_of(cfg, name, dtype)) for name, shape in shapes.items()}
    for s in sources:
        value = s.transform(read_tensor(tensors[s.key]))
        if s.index:
            out[s.target][s.index] = value
        else:
            out[s.target] = np.ascontiguousarray(value, dtype=dtype_of(cfg, s.target, dtype))
    return out


def _quantized(cfg: MoEConfig, scheme: str, group: int | None) -> MoEConfig:
    """cfg with its routed experts stored as `scheme`; ConversionError for a bad scheme or group."""
    from moejax.errors import UnsupportedConfig
    from moejax.quant import DEFAULT_GROUP, SCHEMES

    if scheme not in SCHEMES:
        raise ConversionError(f"--experts {scheme!r} is not one of {', '.join(SCHEMES)}")
    if scheme == "int8" and group is not None:
        raise ConversionError("--group-size applies to --experts int4 only (int8 has a scale per output channel)")
    group = 0 if scheme == "int8" else DEFAULT_GROUP if group is None else group
    try:
        return dataclasses.replace(cfg, expert_quant=scheme, expert_group=group)
    except UnsupportedConfig as e:
        raise ConversionError(f"--experts {scheme} --group-size {group}: {e}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; not a process id: leave it
        return True
    return True


def remove_stale(parent: Path, name: str | None = None) -> None:
    """Remove the `.NAME.tmp-PID` directories of conversions into parent whose process has
    ended (all names when name is None: the cache, which only moejax writes), and the
    `.NAME.old-PID` copies they had moved aside if NAME is back in place. Process ids are
    those of this machine: do not share one cache between machines."""
    pattern = re.compile(rf"\.({re.escape(name) if name else '.+'})\.(tmp|old)-(\d+)")
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        m = pattern.fullmatch(p.name)
        if not m or not p.is_dir() or _alive(int(m[3])):
            continue
        if m[2] == "tmp" or (parent / m[1]).exists():
            shutil.rmtree(p, ignore_errors=True)


def _check_apart(src: Path, dst: Path) -> None:
    """DST may not be SRC, lie inside it or contain it: --force would delete the source."""
    s, d = src.resolve(), dst.resolve()
    if s == d:
        raise CheckpointError(f"destination {dst} is the source: choose another directory")
    if s in d.parents:
        raise CheckpointError(f"destination {dst} is inside the source {src}: choose another directory")
    if d in s.parents:
        raise CheckpointError(f"destination {dst} contains the source {src}: choose another directory")


def convert(src: str | Path, dst: str | Path, dtype: str | None = None, force: bool = False,
            progress: bool = True, experts: str | None = None, group_size: int | None = None) -> MoEConfig:
    """Convert an HF checkpoint directory into a moejax checkpoint at dst. experts: "int8" or
    "int4" quantizes the routed experts (moejax/quant.py; group_size: int4's, default
    quant.DEFAULT_GROUP); None keeps them in dtype like everything else."""
    from tqdm.auto import tqdm

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise CheckpointError(f"source {src} does not exist")
    if not src.is_dir():
        raise CheckpointError(f"source {src} is not a directory")
    _check_apart(src, dst)
    if dst.exists() and not force:
        raise CheckpointError(f"destination {dst} exists (use --force to overwrite)")
    hf = read_hf_config(src)
    cfg = MoEConfig.from_hf(hf)
    plain = cfg  # the experts as the source holds them: assembled in float32, then quantized
    if experts is not None:
        cfg = _quantized(cfg, experts, group_size)
    elif group_size is not None:
        raise ConversionError("--group-size applies to --experts int4 only")
    if dtype is None:
        dtype = "bfloat16" if str(hf.get("dtype", hf.get("torch_dtype"))) == "bfloat16" else "float32"
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    np_dtype = DTYPES[dtype]

    tensors = index_checkpoint(src)
    fused = any(k.endswith("experts.gate_up_proj") for k in tensors)
    table = source_table(cfg, fused)
    check_tensors(table, tensors, cfg)

    by_scope: dict[int | None, list[Source]] = {}
    for s in table.values():
        by_scope.setdefault(s.scope, []).append(s)

    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(dst.parent, dst.name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"cannot write {dst}: {e.strerror or e}") from None
    try:
        scopes = [None, *range(cfg.num_layers)]
        for scope in tqdm(scopes, desc=f"convert {src.name}", unit="layer", disable=not progress):
            if scope is None:
                tree = _assemble(cfg, by_scope[None], global_shapes(cfg), tensors, np_dtype)
                checkpoint.save_item(tmp, "global", tree)
            elif cfg.quant is not None and cfg.moe_layers[scope]:
                tree = _assemble(plain, by_scope[scope], layer_shapes(plain, scope), tensors, np.float32)
                tree = {k: quantize(v, cfg.quant) if k == "experts" else v.astype(dtype_of(cfg, k, np_dtype))
                        for k, v in tree.items()}
                checkpoint.save_item(tmp, checkpoint.layer_name(scope), tree)
            else:
                tree = _assemble(cfg, by_scope[scope], layer_shapes(cfg, scope), tensors, np_dtype)
                checkpoint.save_item(tmp, checkpoint.layer_name(scope), tree)
        shutil.copy(src / "config.json", tmp / "config.json")
        for name in checkpoint.TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, tmp / name)
        checkpoint.write_meta(tmp, cfg, dtype)
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg
