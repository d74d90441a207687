"""Variable-length batches of whole documents, the data-centric half of adaptive sequence parallelism.

With `data.batching: documents` a step's global batch is not a fixed number of packed rows but a set of whole
documents whose tokens fit a budget (`train.tokens_per_step`); a document longer than `train.max_doc_len` is
cut into chunks of at most that many tokens, each its own sequence (positions restart at 0). The SP planner
then decides, per step, which group of devices computes which sequence.

A sequence of n inputs is stream[a : a+n] with targets stream[a+1 : a+n+1]; a document's last target is its
EOS, so every target carries a loss (a chunk's last target is the next chunk's first token). Example, max_doc_len
2, documents [a b c] [d] (E = EOS): the stream is a b c E d E; the sequences are (a b -> b c), (c -> E), (d -> E).

Order. Epoch e visits the sequences in a permutation seeded by (seed, e) and cuts it greedily into steps: a
step takes the next sequences while their tokens stay within the budget (always at least one), and a step
never spans two epochs. So the sequences of a step are a pure function of (step, seed): resume needs only the
step number, and every layout reads the same global batch.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from trainers.data import IGNORE_INDEX, Batch, PackedRows
from trainers.token_files import MappedStream


class DocumentSequences:
    """The documents of a split (the stream and starts of its PackedRows) cut into sequences of at most
    `max_len` inputs."""

    def __init__(self, stream: np.ndarray | MappedStream, doc_starts: np.ndarray, max_len: int):
        if max_len < 1:
            raise ValueError(f"train.max_doc_len = {max_len}: must be at least 1")
        self.stream = stream if isinstance(stream, MappedStream) else np.asarray(stream)
        ends = np.append(np.asarray(doc_starts, dtype=np.int64)[1:], len(self.stream))
        inputs = ends - np.asarray(doc_starts, dtype=np.int64) - 1  # the last token (EOS) is only a target
        keep = inputs >= 1
        starts, inputs = np.asarray(doc_starts, dtype=np.int64)[keep], inputs[keep]
        pieces = -(-inputs // max_len)  # chunks per document
        first = np.repeat(starts, pieces)
        within = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # chunk index in its document
        self.starts = first + within * max_len
        self.lengths = np.minimum(max_len, np.repeat(inputs, pieces) - within * max_len)
        """(n_sequences,) stream offset and number of inputs of each sequence."""
        self.max_len = max_len

    @classmethod
    def from_rows(cls, rows: PackedRows, max_len: int) -> "DocumentSequences":
        return cls(rows.stream, rows.doc_starts, max_len)

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of sequence `index`, each (length,) int64."""
        a, n = int(self.starts[index]), int(self.lengths[index])
        window = np.asarray(self.stream[a:a + n + 1], dtype=np.int64)
        return window[:-1], window[1:]

    def packed(self, indices, pad_to_multiple: int = 1) -> Batch:
        """The sequences `indices` end to end in one row (B = 1), padded at the end to a multiple of
        `pad_to_multiple` tokens with a segment that carries no loss. cu_seqlens marks every sequence. No
        sequences: a row of padding alone (an SP group the planner left idle still runs a forward and a
        backward, which FSDP's collectives over every rank need; it adds no loss and no gradient)."""
        parts = [self.tokens(int(i)) for i in indices]
        lengths = [len(x) for x, _ in parts]
        total = sum(lengths)
        pad = -total % pad_to_multiple or (pad_to_multiple if total == 0 else 0)
        tokens = np.concatenate([x for x, _ in parts] + [np.zeros(pad, dtype=np.int64)])
        targets = np.concatenate([y for _, y in parts] + [np.full(pad, IGNORE_INDEX, dtype=np.int64)])
        segments = lengths + ([pad] if pad else [])
        cu = np.concatenate(([0], np.cumsum(segments))).astype(np.int32)
        positions = np.concatenate([np.arange(n) for n in segments])
        return Batch(torch.from_numpy(tokens)[None], torch.from_numpy(targets)[None], torch.from_numpy(positions)[None],
                     torch.from_numpy(cu), int(max(segments)))


class DocumentBatches:
    """Which sequences each step reads; a pure function of (step, seed). See the module docstring.
    shuffle=False keeps the split's own order (validation)."""

    def __init__(self, lengths: np.ndarray, tokens_per_step: int, seed: int, shuffle: bool = True):
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) == 0:
            raise ValueError("the training split has no documents with at least one input token")
        if tokens_per_step < 1:
            raise ValueError(f"train.tokens_per_step = {tokens_per_step}: must be at least 1")
        if lengths.max() > tokens_per_step:
            raise ValueError(f"train.tokens_per_step = {tokens_per_step}: smaller than the longest sequence "
                             f"({int(lengths.max())} tokens, train.max_doc_len caps it); raise it or lower train.max_doc_len")
        self.lengths, self.tokens_per_step, self.seed, self.shuffle = lengths, tokens_per_step, seed, shuffle

    @functools.lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, step_starts): epoch's permutation of sequences and where each of its steps begins in it."""
        n = len(self.lengths)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        starts, used = [0], 0
        for i, n in enumerate(self.lengths[order].tolist()):
            if used + n > self.tokens_per_step and used:
                starts.append(i)
                used = 0
            used += n
        return order, np.asarray(starts + [len(order)])

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self._epoch(epoch)[1]) - 1

    def sequences(self, step: int) -> list[int]:
        """The sequence ids of global step `step` (0-based), in the order the planner receives them."""
        if step < 0:
            raise ValueError(f"step = {step}: must be at least 0")
        epoch = 0
        while step >= (n := self.steps_in_epoch(epoch)):
            step -= n
            epoch += 1
        order, starts = self._epoch(epoch)
        return order[starts[step]:starts[step + 1]].tolist()
