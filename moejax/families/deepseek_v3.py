"""DeepSeek-V3 / R1 style checkpoints.

Differs from deepseek_v2: sigmoid router scores; an `e_score_correction_bias` added to the
scores only to choose experts ("noaux_tc"), groups ranked by the sum of their two best
corrected scores, the top `topk_group` of `n_group` eligible; the weights are the chosen
experts' sigmoid scores, renormalised (`norm_topk_prob`) and times `routed_scaling_factor`.
Rope dims are interleaved pairs unless `rope_interleave` is false. The multi-token
prediction layers (`num_nextn_predict_layers`, stored as layers past `num_hidden_layers`)
are not used for decoding and are skipped on conversion. FP8 block-quantised checkpoints
(a `quantization_config`) are rejected: convert a bfloat16 copy.
"""

from moejax.families import _reject, common_fields
from moejax.families.deepseek_v2 import EXPERTS, mla_fields, moe_fields

__all__ = ["EXPERTS", "fields", "ignored"]


def fields(hf: dict) -> dict:
    _reject(hf, "scoring_func", lambda v: v == "sigmoid")
    _reject(hf, "topk_method", lambda v: v == "noaux_tc")
    moe = moe_fields(hf)
    moe["norm_topk_prob"] = bool(hf.get("norm_topk_prob", True))
    moe["routed_scaling_factor"] = float(hf.get("routed_scaling_factor") or 2.5)
    return dict(
        **{**common_fields(hf), **mla_fields(hf)},
        **moe,
        router="sigmoid",
        topk_method="noaux_tc",
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        router_fp32=True,
        rope_interleave=bool(hf.get("rope_interleave", True)),
    )


def ignored(key: str, cfg) -> bool:
    """The multi-token-prediction module's tensors: layers numbered past the decoder's."""
    parts = key.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() \
        and int(parts[2]) >= cfg.num_layers
