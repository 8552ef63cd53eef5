"""Relative error of quantized experts against the checkpoint's own, per scheme and group size
(docs/accuracy.md, "int4 group size"). Usage:

    python scripts/quant_error.py CONVERTED_CHECKPOINT [--groups 16,32,64]
"""

from __future__ import annotations

import argparse

import numpy as np

from moejax import checkpoint
from moejax.quant import Quant, dequantize_np, quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="a converted checkpoint with plain (not quantized) experts")
    ap.add_argument("--groups", default="16,32,64", help="int4 group sizes")
    a = ap.parse_args()
    cfg, dtype = checkpoint.read_meta(a.path)
    w = np.stack([checkpoint.load_item(a.path, checkpoint.layer_name(i))["experts"].astype(np.float32)
                  for i in cfg.moe_layer_ids])  # [L, E, 3, H, I]
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    plain = 3 * H * I * checkpoint.DTYPES[dtype].itemsize
    print(f"| scheme | bytes / expert | vs {dtype} | relative error |\n|---|---|---|---|")
    for q in [Quant("int8", 0, H, I)] + [Quant("int4", int(g), H, I) for g in a.groups.split(",")]:
        back = dequantize_np(quantize(w, q), q)
        rel = np.linalg.norm(back - w) / np.linalg.norm(w)
        print(f"| {q.describe()} | {q.nbytes:,} | {plain / q.nbytes:.2f}x | {rel:.4f} |")


if __name__ == "__main__":
    main()
