"""Token data: datasets on disk or synthetic, packed into fixed-length rows that keep document boundaries.

Packing. Documents, each followed by EOS, are concatenated into one flat stream. With S = seq_len, row i is
stream[i*S : i*S + S + 1]: inputs are its first S tokens, targets its last S. A document that crosses a row
end continues in the next row as a new segment (positions restart at 0; attention cannot see the previous
row). The target of a document's EOS would be the next document's first token, which nothing predicts, so
it is -100. Example, S = 4, documents [a b] [c d e] (E = EOS):

    stream    a b E c d e E
    row 0     inputs a b E c   targets b E -100 d   positions 0 1 2 0   cu_seqlens 0 3 4
    (row 1 would need stream[4:9]: only 3 tokens are left, so there is 1 row.)

Datasets on disk are read memory-mapped (trainers.token_files): a rank holds the document index, not the
tokens, and a batch reads only its rows' pages.

Batching. `BatchPlan` makes the rows of every step a pure function of (step, seed), so resuming needs only
the step number, and every data-parallel layout reads the same global batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from trainers.config import DEFAULT_STDLIB_CACHE, DataConfig
from trainers.corpus import ensure_stdlib_dataset, old_format_error, read_dataset_info
from trainers.token_files import MappedStream, open_split, split_file

IGNORE_INDEX = -100
"""Target value that cross-entropy skips (PyTorch's default ignore_index)."""

# Synthetic documents: log-normal lengths with this sigma (about 95% of lengths within 0.37x..2.7x the
# median), and strides 1..SYNTHETIC_MAX_STRIDE, small enough that a tiny model learns them in a few steps.
SYNTHETIC_LENGTH_SIGMA = 0.5
SYNTHETIC_MAX_STRIDE = 8

Split = Literal["train", "val"]


@dataclass
class Batch:
    tokens: Tensor
    """(B, S) int64 inputs."""
    targets: Tensor
    """(B, S) int64 next tokens; IGNORE_INDEX (-100) where a document's EOS meets the next document."""
    positions: Tensor
    """(B, S) int64 position within the document segment; 0 at each document start and each row start."""
    cu_seqlens: Tensor
    """(n_segments+1,) int32 segment boundaries over the flattened B*S tokens; includes every row start b*S."""
    max_seqlen: int
    """Longest segment in the batch."""

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.tokens.to(device), self.targets.to(device), self.positions.to(device),
                     self.cu_seqlens.to(device), self.max_seqlen)

    @property
    def num_targets(self) -> int:
        """Tokens that carry a loss."""
        return int((self.targets != IGNORE_INDEX).sum())


class PackedRows:
    """Rows of seq_len inputs (+1 target) cut from a flat token stream; see the module docstring."""

    def __init__(self, stream: np.ndarray | MappedStream, doc_starts: np.ndarray, seq_len: int):
        """stream: (n_tokens,) int32, documents back to back, each ending with EOS, in memory or mapped from
        a split file. doc_starts: (n_docs,) strictly increasing offsets into stream, the first 0."""
        if seq_len < 1:
            raise ValueError(f"seq_len = {seq_len}: must be at least 1")
        stream = stream if isinstance(stream, MappedStream) else np.asarray(stream)
        doc_starts = np.asarray(doc_starts, dtype=np.int64)
        if len(stream) and (len(doc_starts) == 0 or doc_starts[0] != 0 or np.any(np.diff(doc_starts) <= 0)
                            or doc_starts[-1] >= len(stream)):
            raise ValueError("doc_starts must be strictly increasing offsets into the stream, starting at 0")
        self.stream, self.doc_starts, self.seq_len = stream, doc_starts, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.seq_len)

    def head(self, n_tokens: int) -> "PackedRows":
        """The rows of the first n_tokens of the stream (a document cut there ends without its EOS)."""
        return PackedRows(self.stream[:n_tokens], self.doc_starts[self.doc_starts < n_tokens], self.seq_len)

    def batch(self, row_ids: Sequence[int]) -> Batch:
        rows = np.asarray(row_ids, dtype=np.int64)
        if rows.ndim != 1 or len(rows) == 0:
            raise ValueError(f"row_ids must be a non-empty list of row indices, got {row_ids!r}")
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"row ids {rows.min()}..{rows.max()} out of range: this split has {len(self)} rows")
        s = self.seq_len
        at = rows[:, None] * s + np.arange(s + 1)  # (B, S+1) stream offsets: inputs [:, :-1], targets [:, 1:]
        window = self.stream[at].astype(np.int64)
        is_start = self._starts_at(at)
        tokens, targets = window[:, :-1].copy(), window[:, 1:].copy()  # copies: they overlap in `window`
        targets[is_start[:, 1:]] = IGNORE_INDEX

        starts = is_start[:, :-1].copy()  # (B, S) segment starts: document starts ...
        starts[:, 0] = True  # ... and every row start (a continued document is a new segment)
        flat = starts.ravel()
        seg_begin = np.flatnonzero(flat)  # (n_segments,)
        positions = np.arange(flat.size) - seg_begin[np.cumsum(flat) - 1]
        cu_seqlens = np.append(seg_begin, flat.size).astype(np.int32)
        return Batch(torch.from_numpy(tokens), torch.from_numpy(targets), torch.from_numpy(positions.reshape(tokens.shape)),
                     torch.from_numpy(cu_seqlens), int(np.diff(cu_seqlens).max()))

    def _starts_at(self, at: np.ndarray) -> np.ndarray:
        """(at's shape) bool: a document starts at stream offset `at`. A binary search in doc_starts rather
        than a per-token table, which would hold a byte per token of the split."""
        i = np.minimum(np.searchsorted(self.doc_starts, at), len(self.doc_starts) - 1)
        return self.doc_starts[i] == at


def _pack(values: np.ndarray, offsets: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents as flat values (n_tokens,) + offsets (n_docs+1,) -> (stream with EOS after each document,
    doc_starts (n_docs,)). Document i gains i EOS tokens before it, hence the shifted starts."""
    stream = np.insert(values.astype(np.int32, copy=False), offsets[1:], eos_id)
    return stream, offsets[:-1] + np.arange(len(offsets) - 1)


def load_split(path: str | Path, split: Split, eos_id: int, seq_len: int) -> PackedRows:
    """The `split` of the dataset directory `path` (built by trainers.corpus), memory-mapped and packed into rows."""
    if split not in ("train", "val"):
        raise ValueError(f"split = {split!r}: must be 'train' or 'val'")
    file = split_file(path, split)
    if not file.is_file():
        old = old_format_error(path)
        raise old or FileNotFoundError(f"{file}: no such file; build the dataset with `flotilla data`")
    stream = open_split(file, eos_id)
    return PackedRows(stream, stream.doc_starts, seq_len)


def _synthetic_doc_count(cfg: DataConfig, split: Split) -> int:
    n_val = min(cfg.synthetic_docs - 1, max(1, round(cfg.synthetic_docs * cfg.val_fraction)))
    return n_val if split == "val" else cfg.synthetic_docs - n_val


def synthetic_split(cfg: DataConfig, vocab_size: int, seq_len: int, seed: int, split: Split) -> PackedRows:
    """Seeded, learnable documents: each starts at a random token and steps by a random stride,
    token[t+1] = (token[t] + stride) mod (vocab_size-1); EOS is vocab_size-1. After two tokens the rest of a
    document is determined, so a model's loss can fall far below log(vocab_size).

    Lengths are log-normal with mean cfg.synthetic_mean_len. The train and val splits draw from different
    seeds derived from `seed`. Documents are added past cfg's count if needed so that a split holds a row."""
    if split not in ("train", "val"):
        raise ValueError(f"split = {split!r}: must be 'train' or 'val'")
    rng = np.random.default_rng([seed, ("train", "val").index(split)])
    modulus = vocab_size - 1
    n_docs = _synthetic_doc_count(cfg, split)
    # mu chosen so that E[length] = exp(mu + sigma^2/2) = synthetic_mean_len
    mu = math.log(cfg.synthetic_mean_len) - SYNTHETIC_LENGTH_SIGMA**2 / 2

    def draw_lengths() -> np.ndarray:
        return np.maximum(1, np.rint(rng.lognormal(mu, SYNTHETIC_LENGTH_SIGMA, n_docs))).astype(np.int64)

    lengths = draw_lengths()
    while lengths.sum() + len(lengths) < seq_len + 1:  # stream (with EOS) must hold one row
        lengths = np.concatenate([lengths, draw_lengths()])
    first = rng.integers(0, modulus, len(lengths))
    stride = rng.integers(1, max(1, min(SYNTHETIC_MAX_STRIDE, modulus - 1)) + 1, len(lengths))

    offsets = np.concatenate(([0], np.cumsum(lengths)))
    t = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)  # index of each token within its document
    values = (np.repeat(first, lengths) + t * np.repeat(stride, lengths)) % modulus
    return PackedRows(*_pack(values, offsets, eos_id=modulus), seq_len)


def build_splits(cfg: DataConfig, vocab_size: int, seq_len: int, seed: int) -> tuple[PackedRows, PackedRows, int]:
    """(train rows, val rows, eos_id) for cfg.source. vocab_size is the model's (model.vocab_size);
    the training rows are cut to cfg.train_tokens when it is set."""
    if cfg.train_tokens is not None and cfg.train_tokens < seq_len + 1:
        raise ValueError(f"data.train_tokens = {cfg.train_tokens}: fewer than one row of train.seq_len = {seq_len} "
                         f"needs ({seq_len + 1}); raise it or leave it unset to train on the whole split")
    train, val, eos_id = _full_splits(cfg, vocab_size, seq_len, seed)
    return (train if cfg.train_tokens is None else train.head(cfg.train_tokens)), val, eos_id


def _full_splits(cfg: DataConfig, vocab_size: int, seq_len: int, seed: int) -> tuple[PackedRows, PackedRows, int]:
    if cfg.source == "synthetic":
        train, val = (synthetic_split(cfg, vocab_size, seq_len, seed, split) for split in ("train", "val"))
        return train, val, vocab_size - 1
    if cfg.source == "stdlib":
        info = ensure_stdlib_dataset(Path(cfg.path or DEFAULT_STDLIB_CACHE), cfg.tokenizer, cfg.val_fraction, seed)
    elif cfg.path:
        info = read_dataset_info(cfg.path)
    else:
        raise ValueError("data.path: required when data.source = 'parquet' (a directory built by `flotilla data`)")
    if info.vocab_size > vocab_size:
        raise ValueError(f"model.vocab_size = {vocab_size}: smaller than the {info.tokenizer} tokenizer's "
                         f"{info.vocab_size} tokens (dataset {info.path}); raise model.vocab_size")
    train, val = (load_split(info.path, split, info.eos_id, seq_len) for split in ("train", "val"))
    for split, rows in (("train", train), ("val", val)):
        if len(rows) == 0:
            raise ValueError(f"{info.path}: the {split} split has {len(rows.stream)} tokens, fewer than one row of "
                             f"train.seq_len = {seq_len} needs ({seq_len + 1}); lower train.seq_len or use more data")
    return train, val, info.eos_id


# Two epochs: a step that crosses an epoch boundary reads both. An order holds 4 bytes a row (39 MB for the
# 9.8M rows of 5 GB of uint16 tokens at seq_len 256), so more cached epochs would cost a rank real memory.
@functools.lru_cache(maxsize=2)
def _epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """(num_rows,) the order of rows in `epoch`: a permutation seeded by (seed, epoch).

    Shuffling an int32 arange in place draws the same permutation as Generator.permutation(num_rows), which
    does exactly that on an int64 arange, in half the memory."""
    order = np.arange(num_rows, dtype=np.int32 if num_rows < 2**31 else np.int64)
    np.random.default_rng([seed, epoch]).shuffle(order)
    order.flags.writeable = False  # shared by every caller through the cache
    return order


class BatchPlan:
    """Which rows each data-parallel rank reads at each step; a pure function of its arguments.

    Global batch at step s: positions [s*G, (s+1)*G) of the concatenated per-epoch permutations of all rows,
    G = micro_batch_size * grad_accum * dp_size (8 rows * 2 accum * 4 ranks = 64 rows a step); epoch e's
    permutation is seeded by (seed, e), and a global batch may span an epoch boundary. Rank r's micro-batch a
    is the slice [r*mb*accum + a*mb, +mb) of it, so (dp=1, accum=4), (dp=2, accum=2) and (dp=4, accum=1)
    read the same global batch.
    """

    def __init__(self, num_rows: int, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int, seed: int):
        if num_rows < 1:
            raise ValueError("the training split has no rows: it holds fewer tokens than train.seq_len + 1")
        if micro_batch_size < 1 or grad_accum < 1:
            raise ValueError(f"micro_batch_size = {micro_batch_size} and grad_accum = {grad_accum}: both must be at least 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank = {dp_rank}: must be in [0, dp_size = {dp_size})")
        self.num_rows, self.micro_batch_size, self.grad_accum = num_rows, micro_batch_size, grad_accum
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.global_batch = micro_batch_size * grad_accum * dp_size

    def rows(self, step: int, micro: int) -> list[int]:
        """The micro_batch_size row ids of micro-batch `micro` (0..grad_accum-1) at `step` on this rank."""
        if not 0 <= micro < self.grad_accum:
            raise ValueError(f"micro = {micro}: must be in [0, grad_accum = {self.grad_accum})")
        mb = self.micro_batch_size
        first = step * self.global_batch + self.dp_rank * mb * self.grad_accum + micro * mb
        epoch, index = np.divmod(np.arange(first, first + mb), self.num_rows)
        out = np.empty(mb, dtype=np.int64)
        for e in np.unique(epoch):
            here = epoch == e
            out[here] = _epoch_order(self.num_rows, self.seed, int(e))[index[here]]
        return out.tolist()


def validation_rows(num_rows: int, micro_batch_size: int, num_batches: int, dp_rank: int, dp_size: int) -> list[list[int]]:
    """This rank's validation micro-batches: the first rows of the split, in order, the same every time.

    The rows read are [0, n), n = min(num_rows, num_batches * micro_batch_size * dp_size), each once, cut into
    k * dp_size contiguous micro-batches of nearly equal size (at most micro_batch_size), k per rank. So every
    layout that can hold a whole small validation split reads all of it and reports the same loss, and every
    rank runs k forward passes, which a sharded model needs (its forward pass is a collective). Edge cases:
    with micro_batch_size 1, n rounds down to a multiple of dp_size; with fewer rows than ranks, rank r reads
    row r mod num_rows, so some rows count twice.
    """
    if num_rows < 1:
        return []
    if num_rows < dp_size:
        return [[dp_rank % num_rows]]
    n = min(num_rows, num_batches * micro_batch_size * dp_size)
    per_rank = -(-n // (micro_batch_size * dp_size))  # ceil
    if per_rank * dp_size > n:  # only when micro_batch_size is 1: each micro-batch is one row
        per_rank = n // dp_size
        n = per_rank * dp_size
    chunks = np.array_split(np.arange(n), per_rank * dp_size)
    return [chunk.tolist() for chunk in chunks[dp_rank * per_rank:(dp_rank + 1) * per_rank]]
