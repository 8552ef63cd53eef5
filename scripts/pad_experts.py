"""A converted checkpoint with every routed expert zero-padded to a larger intermediate size.

    python scripts/pad_experts.py SRC DST --intermediate 15040

Why: random weights route unlike a trained model, so a policy comparison on a random model
with large experts says little about hit rates. Padding the trained bundled model's experts
with zeros keeps its routing and its outputs (gate and up columns of zeros give silu(0) * 0
= 0, which meets zero rows of down), while each expert moves and computes as many bytes as
a large model's: with hidden 192, --intermediate 15040 gives [3, 192, 15040] experts of
17.3 MB in bfloat16, the size of Qwen1.5-MoE-A2.7B's [3, 2048, 1408]. Attention and the
dense parts stay small, so there is less compute to hide transfers behind than in the large
model: a conservative setting for overlap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np


def pad_experts(src: Path, dst: Path, intermediate: int) -> int:
    """Write DST from the converted checkpoint SRC -> bytes of one padded expert."""
    from moejax import checkpoint

    cfg, dtype = checkpoint.read_meta(src)
    if intermediate < cfg.moe_intermediate_size:
        raise SystemExit(f"error: --intermediate {intermediate} is below the experts' {cfg.moe_intermediate_size}")
    glob = checkpoint.load_item(src, "global")
    tmp = dst.parent / f".{dst.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    checkpoint.save_item(tmp, "global", glob)
    expert_bytes = 0
    for i in range(cfg.num_layers):
        p = checkpoint.load_item(src, checkpoint.layer_name(i))
        if "experts" in p:
            e = p["experts"]  # [E, 3, H, I]: gate, up and down (transposed) share the I axis
            pad = [(0, 0)] * (e.ndim - 1) + [(0, intermediate - e.shape[-1])]
            p["experts"] = np.pad(e, pad)
            expert_bytes = p["experts"][0].nbytes
        checkpoint.save_item(tmp, checkpoint.layer_name(i), p)
    for name in checkpoint.TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, tmp / name)
    if (src / "config.json").is_file():  # the Hugging Face config, with the padded width
        hf = json.loads((src / "config.json").read_text())
        hf["moe_intermediate_size"] = intermediate
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    checkpoint.write_meta(tmp, dataclasses.replace(cfg, moe_intermediate_size=intermediate), dtype)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return expert_bytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="converted moejax checkpoint (or a directory moejax.api.resolve accepts)")
    p.add_argument("dst", help="output directory (replaced)")
    p.add_argument("--intermediate", type=int, default=15040, help="padded expert width (default 15040: "
                   "Qwen1.5-MoE-sized experts for hidden 192)")
    a = p.parse_args(argv)
    from moejax import api

    n = pad_experts(api.resolve(a.src), Path(a.dst), a.intermediate)
    print(f"{a.dst}: experts of {n / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
