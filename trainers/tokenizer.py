"""Tokenizers: a built-in byte-level one, and a local HF `tokenizer.json` through the tokenizers library."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """Ids 0-255 are UTF-8 bytes, 256 is EOS: no vocabulary file, nothing to download, any text."""

    name, vocab_size, eos_id = "byte", 257, 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "[SEP]")


class HFTokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _HF

        self.path = Path(path)
        self._tok = _HF.from_file(str(self.path))
        self.name = f"hf-{self.path.parent.name or self.path.stem}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = next((self._tok.token_to_id(t) for t in EOS_NAMES if self._tok.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"{self.path} has none of the end-of-text tokens {', '.join(EOS_NAMES)}")
        self.eos_id = eos

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}; use 'byte' or the path of a local tokenizer.json")
    return HFTokenizer(path)
