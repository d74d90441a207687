import numpy as np
import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from trainers.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n", "import os\nprint(os.getcwd())\n"] * 4


def _save_bpe(path, special_tokens: list[str]):
    """A tiny byte-level BPE trained on TEXTS, saved as a tokenizer.json: encodes any text, decodes exactly."""
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def test_byte_tokenizer_round_trips_any_text_as_utf8_bytes():
    tok = ByteTokenizer()
    text = "naïve café → 世界 🙂\n\ttabs"
    ids = tok.encode(text)
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")
    assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_byte_tokenizer_decode_drops_eos_and_replaces_cut_characters():
    tok = ByteTokenizer()
    ids = tok.encode("é")  # two bytes
    assert tok.decode([*tok.encode("a"), tok.eos_id, *tok.encode("b")]) == "ab"
    assert tok.decode(ids[:1]) == "\ufffd"


def test_hf_tokenizer_round_trips_and_finds_eos(tmp_path):
    path = tmp_path / "tiny-bpe" / "tokenizer.json"
    raw = _save_bpe(path, ["<pad>", "<|endoftext|>"])
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.eos_id == raw.token_to_id("<|endoftext|>") == 1
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    assert tok.name.startswith("hf-tiny-bpe-")
    text = "def add(x, y):\n    return x + y  # naïve\n"
    ids = tok.encode(text)
    assert tok.eos_id not in ids.tolist()  # no special tokens added on encode
    assert len(ids) < len(text.encode())  # merges learned from TEXTS apply
    assert tok.decode(ids) == text


def test_hf_tokenizer_name_changes_with_the_file(tmp_path):
    # The name keys cached datasets, so a retrained tokenizer at the same path must not reuse them.
    path = tmp_path / "tok" / "tokenizer.json"
    _save_bpe(path, ["</s>"])
    before = load_tokenizer(str(path)).name
    _save_bpe(path, ["</s>", "<extra>"])
    assert load_tokenizer(str(path)).name != before


def test_hf_tokenizer_without_eos_names_the_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    _save_bpe(path, ["<pad>"])
    with pytest.raises(ValueError, match="tokenizer.json.*end-of-document.*</s>"):
        load_tokenizer(str(path))


def test_load_tokenizer_errors_name_the_path_and_the_choices(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*'byte'.*tokenizer.json"):
        load_tokenizer(str(missing))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="garbage.json"):
        load_tokenizer(str(garbage))
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
