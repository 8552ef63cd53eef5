"""Converter: exact placement of every tensor (arange-filled), layouts, shards, dtypes, bad input."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from moejax import checkpoint  # noqa: E402
from moejax.cli import main  # noqa: E402
from moejax.convert import convert  # noqa: E402
from tiny import hf_config  # noqa: E402


def _arange_model(path, family, fused=False, **over):
    """An HF model whose every tensor holds distinct arange values, saved at path."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(family, **over), dtype=torch.float32)
    offset = 0
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.arange(offset, offset + p.numel(), dtype=torch.float32).reshape(p.shape))
            offset += p.numel()
    model.save_pretrained(path, save_original_format=not fused)
    return path


def _hf_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(safetensors_numpy.load_file(f))
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_arange_hub_layout_exact(tmp_path, family):
    src = _arange_model(tmp_path / "hf", family)
    convert(src, tmp_path / "mj", progress=False)
    hf = _hf_tensors(src)
    cfg, glob, layers = checkpoint.load_params(tmp_path / "mj")
    block, (g, u, d) = ("block_sparse_moe", ("w1", "w3", "w2")) if family == "mixtral" else \
        ("mlp", ("gate_proj", "up_proj", "down_proj"))
    assert np.array_equal(glob["embed"], hf["model.embed_tokens.weight"])
    assert np.array_equal(glob["lm_head"], hf["lm_head.weight"].T)
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}"
        assert np.array_equal(layer["wq"], hf[f"{p}.self_attn.q_proj.weight"].T)
        assert np.array_equal(layer["wo"], hf[f"{p}.self_attn.o_proj.weight"].T)
        assert np.array_equal(layer["attn_norm"], hf[f"{p}.input_layernorm.weight"])
        assert np.array_equal(layer["mlp_norm"], hf[f"{p}.post_attention_layernorm.weight"])
        assert np.array_equal(layer["router"], hf[f"{p}.{block}.gate.weight"].T)
        for e in range(cfg.num_experts):
            x = f"{p}.{block}.experts.{e}"
            assert np.array_equal(layer["experts"][e, 0], hf[f"{x}.{g}.weight"].T)
            assert np.array_equal(layer["experts"][e, 1], hf[f"{x}.{u}.weight"].T)
            assert np.array_equal(layer["experts"][e, 2], hf[f"{x}.{d}.weight"])
            assert layer["experts"][e].flags.c_contiguous
        if family == "qwen2_moe":
            assert np.array_equal(layer["bq"], hf[f"{p}.self_attn.q_proj.bias"])
            assert np.array_equal(layer["shared"][0], hf[f"{p}.mlp.shared_expert.gate_proj.weight"].T)
            assert np.array_equal(layer["shared"][2], hf[f"{p}.mlp.shared_expert.down_proj.weight"])
            assert np.array_equal(layer["shared_gate"], hf[f"{p}.mlp.shared_expert_gate.weight"].T)


def test_arange_fused_layout_exact(tmp_path):
    src = _arange_model(tmp_path / "hf", "qwen3_moe", fused=True)
    convert(src, tmp_path / "mj", progress=False)
    hf = _hf_tensors(src)
    cfg, _, layers = checkpoint.load_params(tmp_path / "mj")
    I = cfg.moe_intermediate_size
    for i, layer in enumerate(layers):
        gate_up = hf[f"model.layers.{i}.mlp.experts.gate_up_proj"]  # [E, 2I, H]
        down = hf[f"model.layers.{i}.mlp.experts.down_proj"]  # [E, H, I]
        for e in range(cfg.num_experts):
            assert np.array_equal(layer["experts"][e, 0], gate_up[e, :I].T)
            assert np.array_equal(layer["experts"][e, 1], gate_up[e, I:].T)
            assert np.array_equal(layer["experts"][e, 2], down[e])
        assert np.array_equal(layer["q_norm"], hf[f"model.layers.{i}.self_attn.q_norm.weight"])


def test_dense_layers_and_sharded_checkpoint(tmp_path):
    """mlp_only_layers gives a dense MLP; a sharded checkpoint converts to the same weights."""
    from transformers import AutoModelForCausalLM

    config = hf_config("qwen2_moe", num_hidden_layers=3, mlp_only_layers=[1])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    convert(tmp_path / "one", tmp_path / "a", progress=False)
    convert(tmp_path / "sharded", tmp_path / "b", progress=False)
    _, ga, la = checkpoint.load_params(tmp_path / "a")
    cfg, gb, lb = checkpoint.load_params(tmp_path / "b")
    assert cfg.moe_layers == (True, False, True)
    assert "mlp" in lb[1] and "experts" not in lb[1]
    hf = _hf_tensors(tmp_path / "one")
    assert np.array_equal(lb[1]["mlp"][0], hf["model.layers.1.mlp.gate_proj.weight"].T)
    for x, y in zip([ga, *la], [gb, *lb]):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_bf16_source_without_torch_reader(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config("olmoe"), dtype=torch.float32).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "f32", dtype="float32", progress=False)
    convert(tmp_path / "hf", tmp_path / "bf16", progress=False)  # keeps the source dtype
    _, _, l32 = checkpoint.load_params(tmp_path / "f32")
    _, _, l16 = checkpoint.load_params(tmp_path / "bf16")
    ref = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
    assert l32[0]["wq"].dtype == np.float32 and np.array_equal(l32[0]["wq"], ref)
    assert l16[0]["experts"].dtype == ml_dtypes.bfloat16
    assert np.array_equal(l16[0]["wq"].astype(np.float32), ref)


# ---- bad input: exit code 2, one line, no output directory ------------------------------------


@pytest.fixture(scope="module")
def good_src(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("src") / "hf"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config("mixtral"), dtype=torch.float32).save_pretrained(path)
    return path


def _broken_copy(good_src, tmp_path, edit):
    src = tmp_path / "src"
    shutil.copytree(good_src, src)
    edit(src)
    return src


def _rewrite_tensors(src, edit):
    f = src / "model.safetensors"
    tensors = safetensors_numpy.load_file(f)
    edit(tensors)
    safetensors_numpy.save_file(tensors, f)


def _set_model_type(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))


def _truncate(src):
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])


def _duplicate_shard(src):
    """Two shards that both hold one tensor."""
    t = safetensors_numpy.load_file(src / "model.safetensors")
    keys = sorted(t)
    safetensors_numpy.save_file({k: t[k] for k in keys[:5]}, src / "model-00001-of-00002.safetensors")
    safetensors_numpy.save_file({k: t[k] for k in keys[4:]}, src / "model-00002-of-00002.safetensors")
    (src / "model.safetensors").unlink()
    wm = {k: "model-00001-of-00002.safetensors" for k in keys[:5]}
    wm.update({k: "model-00002-of-00002.safetensors" for k in keys[5:]})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


BAD = {
    "no-config": (lambda s: (s / "config.json").unlink(), "no config.json"),
    "unsupported-type": (_set_model_type, "model_type='llama' is not supported"),
    "missing-tensor": (lambda s: _rewrite_tensors(s, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight")),
                       "missing tensor model.layers.1.self_attn.k_proj.weight"),
    "unknown-tensor": (lambda s: _rewrite_tensors(s, lambda t: t.update(extra=np.zeros(3, np.float32))),
                       "unknown tensor extra"),
    "wrong-shape": (lambda s: _rewrite_tensors(
        s, lambda t: t.update({"model.layers.0.block_sparse_moe.experts.3.w2.weight": np.zeros((32, 23), np.float32)})),
        "tensor model.layers.0.block_sparse_moe.experts.3.w2.weight has shape [32, 23], expected [32, 24]"),
    "truncated": (_truncate, "model.safetensors: truncated"),
    "corrupt-header": (lambda s: (s / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"),
                       "model.safetensors: corrupt safetensors header"),
    "duplicate": (_duplicate_shard, "duplicate tensor"),
    "rope-scaling": (lambda s: (s / "config.json").write_text(json.dumps(
        {**json.loads((s / "config.json").read_text()), "rope_parameters": {"rope_type": "longrope", "factor": 4.0}})),
        "rope type 'longrope' is not supported"),
    "sliding-window": (lambda s: (s / "config.json").write_text(json.dumps(
        {**json.loads((s / "config.json").read_text()), "sliding_window": 128})), "sliding_window=128 is not supported"),
}


def _assert_clean_failure(capsys, argv, message, dst):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err
    assert not dst.exists()
    assert not any(p.name.startswith(f".{dst.name}.tmp") for p in dst.parent.iterdir())


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2(tmp_path, capsys, good_src, case):
    edit, message = BAD[case]
    src = _broken_copy(good_src, tmp_path, edit)
    dst = tmp_path / "out"
    _assert_clean_failure(capsys, ["convert", str(src), str(dst)], message, dst)


def test_missing_src(tmp_path, capsys):
    dst = tmp_path / "out"
    _assert_clean_failure(capsys, ["convert", str(tmp_path / "nope"), str(dst)], "does not exist", dst)


def test_dst_exists_needs_force(tmp_path, capsys, good_src):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc = main(["convert", str(good_src), str(dst)])
    err = capsys.readouterr().err
    assert rc == 2 and "exists (use --force" in err and err.count("\n") == 1
    assert (dst / "keep.txt").read_text() == "mine"
    assert main(["convert", str(good_src), str(dst), "--force"]) == 0
    assert checkpoint.is_checkpoint(dst) and not (dst / "keep.txt").exists()
