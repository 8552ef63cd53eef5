"""The bundled checkpoint loads in transformers and in moejax, with the same logits (this is
also the proof that its HF export is right), and the CLI decodes it without --model."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moejax  # noqa: E402
from moejax.cli import BUNDLED, main  # noqa: E402

PATH = Path(__file__).resolve().parent.parent / "checkpoints" / BUNDLED
pytestmark = pytest.mark.skipif(not (PATH / "config.json").is_file(), reason="bundled checkpoint not present")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    import os

    old = os.environ.get("MOEJAX_CACHE")
    os.environ["MOEJAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["MOEJAX_CACHE"]
    else:
        os.environ["MOEJAX_CACHE"] = old


def test_bundled_parity_with_transformers(cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(PATH)
    ref_model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()
    model = moejax.load(PATH, dtype="float32")
    assert model.config.model_type == "qwen2_moe" and model.config.num_experts >= 16 and model.config.top_k >= 4
    text = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
    ids = model.tokenizer.encode(text).ids
    assert ids == hf_tok(text)["input_ids"]
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits.numpy()
    ours = model.forward(np.array([ids]))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_decode_without_model_uses_bundled(cache, capsys):
    assert main(["decode", "--prompt", "ROMEO:", "--max-new-tokens", "12"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("ROMEO:") and len(cap.out.strip()) > len("ROMEO:")
    assert "TPOT" in cap.err


@pytest.mark.parametrize("kind,policy,budget", [("fused", "smoe", 0.25), ("stepwise", "lru", 1.0)])
def test_offloaded_bfloat16_decode_equals_resident(cache, kind, policy, budget):
    """The first engine diverged from the resident model at the 14th token of this prompt
    (prefill summed the experts in another order); now the engines share the resident
    model's expert arithmetic, so alpha 0 gives its tokens in bfloat16 at any budget."""
    from moejax.engine import make_engine

    model = moejax.load(PATH)
    assert model.dtype.name == "bfloat16"
    ids = np.array([model.tokenizer.encode("To be, or not to be, that is the question").ids])
    ref = model.generate(ids, 40)
    e = make_engine(kind, model.path, policy, ("pct", budget), alpha=0.0, cache_len=64)
    assert e.generate(ids, 40).tokens == ref.tokens


def test_padded_experts_keep_the_model(cache, tmp_path):
    """scripts/pad_experts.py (the GPU check's large-expert model): zero-padded experts give the
    bundled model's logits (float32: the padding adds exact zeros) and its greedy tokens."""
    import sys

    sys.path.insert(0, str(PATH.parent.parent / "scripts"))
    from pad_experts import pad_experts

    src = moejax.api.resolve(PATH)
    n = pad_experts(src, tmp_path / "padded", 256)
    ref, padded = moejax.load(src, dtype="float32"), moejax.load(tmp_path / "padded", dtype="float32")
    assert padded.config.moe_intermediate_size == 256 and n == 3 * padded.config.hidden_size * 256 * 2  # bf16
    ids = np.asarray([ref.tokenizer.encode("ROMEO: But soft, what light").ids])
    np.testing.assert_allclose(padded.forward(ids), ref.forward(ids), rtol=1e-5, atol=1e-5)
    assert padded.generate(ids, 8).tokens == ref.generate(ids, 8).tokens


def test_chunked_decode_equals_one_step_per_dispatch(cache, monkeypatch):
    """The resident loop runs up to CHUNK decode steps per dispatch (generate.decode_steps).
    Its tokens must be those of one step per dispatch, with a stop id that one row hits inside
    a chunk (the chunk runs on for the other row); on_token sees the same tokens in order."""
    from moejax import generate as G

    model = moejax.load(PATH)
    tok = model.tokenizer
    ids = np.array([tok.encode("To be, or not to be, that is the question").ids[:8],
                    tok.encode("Now is the winter of our discontent made").ids[:8]])
    free = model.generate(ids, 40)
    row = free.tokens[0]
    j = next(j for j in range(17, 32) if row[j] not in row[:j])  # row 0 stops inside the second chunk of 16
    stop = row[j]
    seen, seen_single = [], []
    chunked = model.generate(ids, 40, stop_ids=(stop,), on_token=seen.append)
    monkeypatch.setattr(G, "CHUNK", 1)
    single = model.generate(ids, 40, stop_ids=(stop,), on_token=seen_single.append)
    assert chunked.tokens == single.tokens
    assert chunked.tokens[0] == row[:j + 1]
    assert np.array_equal(np.stack(seen), np.stack(seen_single))
    assert len(chunked.step_s) == len(seen) - 1
