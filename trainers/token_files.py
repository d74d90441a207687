"""One split of a token dataset on disk: an Arrow IPC file, written a record batch at a time and read
memory-mapped.

The file holds one row per document: tokens list<uint16> (list<int32> for vocabularies past 65,536 ids),
without EOS, and source string. It is uncompressed, so the reader's arrays point into the mapped file:
a rank holds only the document index (8 bytes a document), and reads pull in just the pages of the tokens
they touch. `MappedStream` presents the file as the packer's token stream (trainers.data): the documents
back to back, each followed by EOS, without writing that stream anywhere.

Mapped pages that a rank has read stay in its RSS until it drops them, so over an epoch its RSS would grow
to the size of the split. `_Mapping` drops them (madvise MADV_DONTNEED) once the pages read since the
last drop may exceed RESIDENT_BYTES: the page cache keeps them for the other ranks of the node, and a
later read maps them again.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

SPLIT_SUFFIX = ".arrow"
BATCH_TOKENS = 1 << 24
"""Tokens buffered before a record batch is written: 32 MB of uint16 held by the writer, and about 150
batches in a 5 GB split, so mapping a token to its batch stays one small binary search."""
LIST_OFFSET_LIMIT = 2**31
"""A list<...> column indexes its values with int32 offsets: one document (one row) can hold no more."""
FOLIO_SHIFT = 21
"""Reading one mapped token can map its whole page-cache folio, up to 2 MB (the x86-64 PMD size): on Linux
6.18 a random 2 KB row read from a file just written added 0.9 MB of RSS. So a read is charged 2 MB for
each distinct 2 MB-aligned window of the file that it touches."""
RESIDENT_BYTES = 32 << 20
"""Mapped pages a split file may hold in a process (as charged above) before they are dropped. Dropping
costs a page-table walk, well under a millisecond; at 16 MB charged per 8-row batch it runs every other batch."""


def token_type(vocab_size: int) -> pa.DataType:
    """The smallest integer type that holds every id of the vocabulary."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.int32()


def split_file(dataset: str | Path, split: str) -> Path:
    return Path(dataset) / f"{split}{SPLIT_SUFFIX}"


class SplitWriter:
    """Writes one split file document by document; memory holds at most one record batch (BATCH_TOKENS
    tokens plus the document that crosses it), never the split. Use as a context manager: the file is
    complete only after close()."""

    def __init__(self, path: str | Path, vocab_size: int, batch_tokens: int | None = None):
        self.path = Path(path)
        self.batch_tokens = BATCH_TOKENS if batch_tokens is None else batch_tokens
        self.type = token_type(vocab_size)
        self.schema = pa.schema({"tokens": pa.list_(self.type), "source": pa.string()})
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._docs: list[np.ndarray] = []
        self._sources: list[str] = []
        self._buffered = 0
        self.docs = self.tokens = 0

    def add(self, tokens: np.ndarray, source: str) -> None:
        """One document: its token ids (n_tokens,), any integer dtype, no EOS; and where it came from."""
        tokens, dtype = np.asarray(tokens), np.dtype(self.type.to_pandas_dtype())
        if len(tokens) >= LIST_OFFSET_LIMIT:
            raise ValueError(f"{source}: {len(tokens)} tokens in one document, more than the 2**31 a list column "
                             "row can hold; split it into several files")
        if len(tokens) and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
            raise ValueError(f"{source}: token ids {tokens.min()}..{tokens.max()} do not fit this split's {dtype} "
                             "(chosen from the tokenizer's vocab_size); is the vocab_size right?")
        self._docs.append(tokens.astype(dtype, copy=False))
        self._sources.append(source)
        self._buffered += len(tokens)
        self.docs, self.tokens = self.docs + 1, self.tokens + len(tokens)
        if self._buffered >= self.batch_tokens:
            self._flush()

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Documents already in Arrow form (a tokens list column and a source string column), e.g. from an
        older dataset; the tokens are cast to this file's type, which refuses ids it cannot hold."""
        self._flush()
        tokens = batch.column("tokens").cast(pa.list_(self.type))
        self._writer.write_batch(pa.record_batch([tokens, batch.column("source").cast(pa.string())], schema=self.schema))
        self.docs += len(batch)
        self.tokens += len(tokens.flatten())

    def _flush(self) -> None:
        if not self._docs:
            return
        lengths = np.fromiter(map(len, self._docs), dtype=np.int64, count=len(self._docs))
        # Offsets + one flat values array build the list column without a Python object per token.
        offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32))
        tokens = pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(self._docs), type=self.type))
        self._writer.write_batch(pa.record_batch([tokens, pa.array(self._sources, pa.string())], schema=self.schema))
        self._docs, self._sources, self._buffered = [], [], 0

    def close(self) -> None:
        try:
            self._flush()
            self._writer.close()
        finally:
            self._sink.close()

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MappedStream:
    """A split file as the packer's stream: documents back to back, each followed by EOS (trainers.data),
    read through a memory map. Like a 1-D numpy array: an integer array index gathers those tokens (int32,
    the index's shape), touching only their pages; a slice is a view; np.asarray reads the whole view
    (for tests and small splits)."""

    dtype = np.dtype(np.int32)

    def __init__(self, split: "_Split", start: int = 0, stop: int | None = None):
        """The view stream[start:stop] of the split (all of it by default)."""
        self._split, self.eos_id = split, split.eos_id
        self._start = start
        self._stop = int(split.bounds[-1]) if stop is None else stop

    @property
    def doc_starts(self) -> np.ndarray:
        """(n_docs,) int64 stream offsets where the documents begin, over the whole file."""
        return self._split.bounds[:-1]

    def __len__(self) -> int:
        return self._stop - self._start

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, index) -> "MappedStream | np.ndarray":
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError(f"slice step {step}: a MappedStream slices with step 1 only")
            return MappedStream(self._split, self._start + start, self._start + max(start, stop))
        at = np.asarray(index)
        if at.dtype.kind not in "iu":
            raise IndexError(f"index {index!r}: a MappedStream takes a slice or an array of integer offsets")
        if at.size and (at.min() < 0 or at.max() >= len(self)):
            raise IndexError(f"offsets {at.min()}..{at.max()} out of range: the stream holds {len(self)} tokens")
        return self._gather(at.astype(np.int64) + self._start)

    def _gather(self, at: np.ndarray) -> np.ndarray:
        split, flat = self._split, at.ravel()
        out = np.full(flat.shape, self.eos_id, dtype=np.int32)
        doc = np.searchsorted(split.bounds, flat, side="right") - 1
        is_token = flat + 1 < split.bounds[doc + 1]  # the last offset of each document is its EOS
        where = np.flatnonzero(is_token)
        value = flat[where] - doc[where]  # document d has d EOS tokens before it in the stream
        chunk = np.searchsorted(split.chunk_starts, value, side="right") - 1
        within = value - split.chunk_starts[chunk]
        for c in np.unique(chunk):
            here = chunk == c
            out[where[here]] = split.chunks[c][within[here]]
        if len(value):
            split.mapping.charge(split.chunk_offsets[chunk] + within * split.chunks[0].itemsize)
        return out.reshape(at.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self._gather(np.arange(self._start, self._stop, dtype=np.int64))
        return whole if dtype is None else whole.astype(dtype)


@dataclass
class _Split:
    """What every view of one split file shares."""

    mapping: "_Mapping"
    chunks: list[np.ndarray]
    """Each record batch's token values, back to back: zero-copy arrays into the map."""
    chunk_starts: np.ndarray
    """(n_chunks+1,) int64 where each chunk begins among all values, then their count."""
    chunk_offsets: np.ndarray
    """(n_chunks,) int64 where each chunk begins in the file, in bytes."""
    bounds: np.ndarray
    """(n_docs+1,) int64 the stream offset of each document's first token, then the stream's length."""
    eos_id: int


class _Mapping:
    """One split file's read-only memory map, and the pages read from it since they were last dropped."""

    def __init__(self, path: Path):
        # Python's mmap rather than pyarrow.memory_map: the same zero-copy Arrow buffers, and madvise.
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.buffer = pa.py_buffer(self.map)
        self.charged = 0

    def offset_of(self, array: np.ndarray) -> int:
        """Where a zero-copy array into this map begins in the file, in bytes."""
        return array.ctypes.data - self.buffer.address

    def charge(self, file_offsets: np.ndarray) -> None:
        """A read of the bytes at `file_offsets`: drop every mapped page once reads may have mapped RESIDENT_BYTES."""
        self.charged += len(np.unique(file_offsets >> FOLIO_SHIFT)) << FOLIO_SHIFT
        if self.charged > RESIDENT_BYTES:
            self.map.madvise(mmap.MADV_DONTNEED)
            self.charged = 0


def _open_reader(path: Path) -> tuple[_Mapping, pa.ipc.RecordBatchFileReader]:
    """The split file mapped and its Arrow reader (footer and schema read, no tokens); ValueError naming the
    file if it is not a split file."""
    try:
        mapping = _Mapping(path)
        reader = pa.ipc.open_file(pa.BufferReader(mapping.buffer))
    except (OSError, ValueError) as err:  # pa.ArrowInvalid is a ValueError; so is mmap's "cannot mmap an empty file"
        raise ValueError(f"{path}: not an Arrow IPC split file ({err}); rebuild the dataset with `flotilla data`") from None
    field = reader.schema.field("tokens") if "tokens" in reader.schema.names else None
    if field is None or not pa.types.is_list(field.type) or not pa.types.is_integer(field.type.value_type):
        raise ValueError(f"{path}: expected a 'tokens' column of integer lists, found schema {reader.schema}")
    return mapping, reader


def check_split(path: str | Path, docs: int) -> None:
    """ValueError naming the file unless it opens as a split file holding `docs` documents (its meta.json's
    count): the driver's check before any worker starts. Reads the footer and record-batch headers, not tokens."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; rebuild the dataset with `flotilla data`")
    mapping, reader = _open_reader(path)
    try:
        found = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: a damaged record batch ({err}); rebuild the dataset with `flotilla data`") from None
    finally:
        del reader
        mapping.map.madvise(mmap.MADV_DONTNEED)
    if found != docs:
        raise ValueError(f"{path}: {found} documents where meta.json says {docs}; the file and meta.json are from "
                         "different builds: rebuild the dataset with `flotilla data`")


def open_split(path: str | Path, eos_id: int) -> MappedStream:
    """The split file at `path`, memory-mapped. Reads only its document index (the list offsets)."""
    path = Path(path)
    mapping, reader = _open_reader(path)
    chunks, value_ends, total = [], [np.zeros(1, np.int64)], 0
    for i in range(reader.num_record_batches):
        tokens = reader.get_batch(i).column("tokens")
        if tokens.null_count:
            raise ValueError(f"{path}: record batch {i} has {tokens.null_count} null documents")
        offsets = tokens.offsets.to_numpy().astype(np.int64)
        values = tokens.flatten().to_numpy()  # zero-copy: a view into the mapped file
        value_ends.append(offsets[1:] - offsets[0] + total)
        if len(values):
            chunks.append(values)
        total += len(values)
    value_offsets = np.concatenate(value_ends)  # (n_docs+1,) where each document's values begin
    chunk_starts = np.concatenate(([0], np.cumsum([len(c) for c in chunks], dtype=np.int64)))
    bounds = value_offsets + np.arange(len(value_offsets))  # each earlier document adds its EOS
    chunk_offsets = np.array([mapping.offset_of(c) for c in chunks], dtype=np.int64)
    mapping.map.madvise(mmap.MADV_DONTNEED)  # the index pages are copied into `bounds` now
    return MappedStream(_Split(mapping, chunks, chunk_starts, chunk_offsets, bounds, eos_id))
