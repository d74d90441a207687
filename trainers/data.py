"""Token data: datasets on disk or synthetic, packed into fixed-length rows that keep document boundaries.

Documents (each followed by EOS) are concatenated into one flat stream; row i is stream[i*S : i*S+S+1]
(inputs = [:-1], targets = [1:]). A document crossing a row end continues in the next row as a new
segment (positions restart at 0). Batches are a pure function of the step (`BatchPlan`), so resuming needs
only the step number and every data-parallel layout reads the same global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from trainers.config import DataConfig

IGNORE = -100


@dataclass
class Batch:
    tokens: Tensor      # (B, S) int64 inputs
    targets: Tensor     # (B, S) int64 next tokens, IGNORE where nothing is to be predicted
    positions: Tensor   # (B, S) int64 position within the document segment
    cu_seqlens: Tensor  # (n_segments+1,) int32 boundaries over the flattened B*S tokens
    max_seqlen: int

    def to(self, device) -> "Batch":
        return Batch(self.tokens.to(device), self.targets.to(device), self.positions.to(device),
                     self.cu_seqlens.to(device), self.max_seqlen)

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


class PackedRows:
    def __init__(self, stream: np.ndarray, doc_starts: np.ndarray, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        # is_start[t]: a document starts at stream position t
        self.is_start = np.zeros(len(stream) + 1, dtype=bool)
        self.is_start[doc_starts] = True

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.seq_len)

    def batch(self, row_ids: Sequence[int]) -> Batch:
        s = self.seq_len
        idx = np.asarray(row_ids, dtype=np.int64)[:, None] * s + np.arange(s)  # (B, S) stream positions
        tokens = self.stream[idx].astype(np.int64)
        targets = self.stream[idx + 1].astype(np.int64)
        targets[self.is_start[idx + 1]] = IGNORE  # EOS -> next document's first token: nothing to learn
        starts = self.is_start[idx].copy()
        starts[:, 0] = True  # every row begins a segment (a continued document restarts its positions)
        flat = starts.ravel()
        seg_start = np.flatnonzero(flat)
        seg_id = np.cumsum(flat) - 1
        positions = (np.arange(flat.size) - seg_start[seg_id]).reshape(tokens.shape)
        cu = np.append(seg_start, flat.size).astype(np.int32)
        return Batch(torch.from_numpy(tokens), torch.from_numpy(targets), torch.from_numpy(positions),
                     torch.from_numpy(cu), int(np.diff(cu).max()))


def pack(docs_flat: np.ndarray, offsets: np.ndarray, eos_id: int, seq_len: int) -> PackedRows:
    """docs_flat: all documents' tokens back to back; offsets: (n_docs+1,) their boundaries. Each
    non-empty document gets length+1 slots in the stream, the last one EOS."""
    lengths = np.diff(offsets)
    keep = lengths > 0
    src_starts, lengths = offsets[:-1][keep], lengths[keep]
    dst_starts = np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))
    stream = np.full(int((lengths + 1).sum()), eos_id, dtype=np.int32)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # index inside its document
    stream[np.repeat(dst_starts, lengths) + within] = docs_flat[np.repeat(src_starts, lengths) + within]
    return PackedRows(stream, dst_starts, seq_len)


def load_split(path, split: str, eos_id: int, seq_len: int) -> PackedRows:
    column = pq.read_table(Path(path) / f"{split}.parquet", columns=["tokens"]).column("tokens").combine_chunks()
    values = column.values.to_numpy().astype(np.int32)
    offsets = column.offsets.to_numpy().astype(np.int64)
    return pack(values, offsets - offsets[0], eos_id, seq_len)


def synthetic_split(cfg: DataConfig, vocab_size: int, seq_len: int, seed: int, split: str) -> PackedRows:
    """Learnable documents: each starts at a random token and steps by a random stride (mod vocab-1), so a
    model that reads two tokens can predict the rest. EOS is the last id."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    n = max(1, round(cfg.synthetic_docs * (1 - cfg.val_fraction))) if split == "train" else max(1, round(cfg.synthetic_docs * cfg.val_fraction))
    lengths = np.maximum(1, rng.lognormal(np.log(cfg.synthetic_mean_len), 0.5, n).astype(np.int64))
    first = rng.integers(0, vocab_size - 1, n)
    stride = rng.integers(1, 8, n)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    step_in_doc = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    tokens = (np.repeat(first, lengths) + np.repeat(stride, lengths) * step_in_doc) % (vocab_size - 1)
    return pack(tokens.astype(np.int32), offsets, vocab_size - 1, seq_len)


class BatchPlan:
    """Global batch at step s: rows [s*G, (s+1)*G) of a seeded permutation (re-drawn each epoch),
    G = micro_batch_size * grad_accum * dp_size. Rank r's micro-batch a: slice [r*mb*accum + a*mb, +mb)."""

    def __init__(self, num_rows: int, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int, seed: int):
        if num_rows < 1:
            raise ValueError("the training split has no rows: the dataset is smaller than one train.seq_len")
        self.num_rows, self.mb, self.accum = num_rows, micro_batch_size, grad_accum
        self.rank, self.global_batch, self.seed = dp_rank, micro_batch_size * grad_accum * dp_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)}
        return self._perms[epoch]

    def rows(self, step: int, micro: int) -> list[int]:
        start = step * self.global_batch + self.rank * self.mb * self.accum + micro * self.mb
        out = []
        for g in range(start, start + self.mb):
            epoch, i = divmod(g, self.num_rows)
            out.append(int(self._perm(epoch)[i]))
        return out


def validation_rows(num_rows: int, micro_batch_size: int, num_batches: int, dp_rank: int, dp_size: int) -> list[list[int]]:
    """The first rows of the validation split, the same every time, split across data-parallel ranks."""
    per_rank = max(1, min(num_batches, num_rows // (micro_batch_size * dp_size)))
    mb = min(micro_batch_size, max(1, num_rows // (per_rank * dp_size)))
    base = dp_rank * per_rank * mb
    return [[(base + b * mb + j) % num_rows for j in range(mb)] for b in range(per_rank)]


def build_splits(cfg: DataConfig, vocab_size: int, seq_len: int, seed: int) -> tuple[PackedRows, PackedRows, int]:
    """(train, val, eos_id) for the configured source."""
    if cfg.source == "synthetic":
        return (synthetic_split(cfg, vocab_size, seq_len, seed, "train"),
                synthetic_split(cfg, vocab_size, seq_len, seed, "val"), vocab_size - 1)
    from trainers.corpus import ensure_stdlib_dataset, read_dataset_info

    if cfg.source == "stdlib":
        info = ensure_stdlib_dataset(Path(cfg.path or "data/cache"), cfg.tokenizer, cfg.val_fraction, seed)
    else:
        info = read_dataset_info(cfg.path)
    if info.vocab_size > vocab_size:
        raise ValueError(f"model.vocab_size = {vocab_size} is smaller than the dataset's tokenizer ({info.tokenizer}, {info.vocab_size} tokens)")
    return (load_split(info.path, "train", info.eos_id, seq_len), load_split(info.path, "val", info.eos_id, seq_len), info.eos_id)
