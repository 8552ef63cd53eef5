"""Byte-level BPE tokenizer for the bundled model (trained on the training split only)."""

from __future__ import annotations

import json
from pathlib import Path

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Train a GPT-2-style byte-level BPE and save tokenizer.json + tokenizer_config.json.

    The saved directory loads with `transformers.AutoTokenizer.from_pretrained` and
    `tokenizers.Tokenizer.from_file(out_dir / "tokenizer.json")`. Returns the Tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOS) == 0 and tok.get_vocab_size() == vocab_size, tok.get_vocab_size()

    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, model_max_length=2048)
    fast.save_pretrained(str(out_dir))
    # transformers 5 writes its own class name ("TokenizersBackend"); the portable name
    # loads in transformers 4 and 5 alike.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return Tokenizer.from_file(str(out_dir / "tokenizer.json"))


def encode_works(tok, works: list[tuple[str, str]]):
    """Concatenate the works' token ids, each work followed by EOS. Returns uint16 array."""
    import numpy as np

    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch([text for _, text in works]):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)
