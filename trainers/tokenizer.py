"""Tokenizers: a built-in byte-level one, and local HuggingFace `tokenizer.json` files.

Nothing here downloads: a tokenizer is either 'byte' or a file already on disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import tokenizers

# Special tokens that end a document in common tokenizer families (Llama/T5, GPT-2/NeoX, Gemma, Llama 3),
# tried in this order.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    name: str
    """Short, file-system safe: it names cached datasets and appears in error messages."""

    def encode(self, text: str) -> list[int] | np.ndarray:
        """Token ids of `text`, without any special tokens (the packer adds EOS between documents)."""

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; 256 is EOS. Needs no file and never fails to encode."""

    vocab_size = 257
    eos_id = 256
    name = "byte"

    def encode(self, text: str) -> np.ndarray:
        """(len(text.encode()),) int32."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        # EOS is not a byte: it separates documents and is dropped. A window cut mid-character decodes to U+FFFD.
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A local HuggingFace `tokenizer.json` (the `tokenizers` library); EOS is its document-end special token."""

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a valid HuggingFace tokenizer.json ({err})") from None
        eos = next((i for i in map(self._tok.token_to_id, EOS_CANDIDATES) if i is not None), None)
        if eos is None:
            raise ValueError(f"{path}: no end-of-document token; expected one of {', '.join(EOS_CANDIDATES)}")
        self.eos_id = eos
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # The content hash keeps datasets cached under this name apart when the file changes.
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        self.name = f"hf-{path.parent.name or path.stem}-{digest}"

    def encode(self, text: str) -> np.ndarray:
        """(n_tokens,) int32; no BOS/EOS from the tokenizer's post-processor (the packer adds EOS)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte' for the built-in byte tokenizer, else the path of a local HuggingFace tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {spec!r}: no such file; use 'byte' or the path of a local HuggingFace tokenizer.json")
    return HFTokenizer(path)
