"""Text files -> a token dataset on disk, and the corpus every machine has: the Python standard library.

A dataset is a directory:
    train.arrow, val.arrow  Arrow IPC files, one row per document: tokens list<uint16> (list<int32> past 65,536
                            ids; no EOS), source string (relative path); read memory-mapped (trainers.token_files)
    meta.json               tokenizer name, vocab_size, eos_id, per-split document and token counts, created
It is written into a temporary directory beside its final place and renamed there, so a crash never leaves
a half-written dataset where a reader would find it. Datasets of earlier versions held train.parquet and
val.parquet instead; `convert_parquet_dataset` (`flotilla data --convert DIR`) rewrites them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import numpy as np
import pyarrow.parquet as pq

from trainers.token_files import SplitWriter, split_file
from trainers.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "val")


@dataclass
class DatasetInfo:
    path: Path
    """The dataset directory."""
    tokenizer: str
    """Name of the tokenizer that produced the tokens."""
    vocab_size: int
    eos_id: int
    train_docs: int
    train_tokens: int
    """Tokens in the training documents, not counting the EOS the packer adds after each."""
    val_docs: int
    val_tokens: int


def stdlib_source_files() -> list[Path]:
    """The running Python's standard-library *.py files (third-party packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    # os.walk does not follow symlinked directories, so nothing outside the stdlib tree is picked up.
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        found += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(found)


def _val_score(relpath: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, relpath) on every machine and process; Python's hash()
    is salted per process, so it cannot decide the split."""
    digest = hashlib.blake2b(f"{seed}:{relpath}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _assign_splits(scores: np.ndarray, val_fraction: float) -> np.ndarray:
    """is_val (n_docs,) bool: a document is held out when its score is below val_fraction, so adding files
    never moves another file between splits. With two or more documents neither split is left empty: the
    lowest score then goes to val, or the highest to train."""
    is_val = scores < val_fraction
    if len(scores) >= 2 and not is_val.any():
        is_val[np.argmin(scores)] = True
    if len(scores) >= 2 and is_val.all():
        is_val[np.argmax(scores)] = False
    return is_val


def _common_root(files: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(f.parent) for f in files]))


@contextlib.contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside out_dir to write a dataset into; on success it replaces out_dir, on any
    error (or interrupt) it is deleted and out_dir is left as it was."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        yield tmp
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, out_dir: Path) -> None:
    """Moves the finished `new` to `out_dir`; an existing dataset there is moved aside first and then deleted,
    so at any moment `out_dir` is either absent or a whole dataset."""
    if not out_dir.exists():
        new.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    out_dir.rename(old / out_dir.name)
    new.rename(out_dir)
    shutil.rmtree(old)


class BuildProgress:
    """Progress of writing a dataset, one throttled line on a stream (stderr):
    'flotilla data: 1,200/5,000 files, 45.2M tokens, 3.1M tokens/s'. On a terminal the line is redrawn at most
    every `every_s`; elsewhere (logs) a new line is printed at most every `log_every_s`; the last one always."""

    def __init__(self, out: TextIO | None = None, every_s: float = 0.5, log_every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.out, self.clock = out or sys.stderr, clock
        self.interactive = self.out.isatty()
        self.every_s = every_s if self.interactive else log_every_s
        self.started = clock()
        self.shown_at: float | None = None

    def __call__(self, files_done: int, files_total: int, tokens: int) -> None:
        now = self.clock()
        last = files_done >= files_total
        if not last and self.shown_at is not None and now - self.shown_at < self.every_s:
            return
        self.shown_at = now
        rate = tokens / max(now - self.started, 1e-9)
        line = f"flotilla data: {files_done:,}/{files_total:,} files, {_count(tokens)} tokens, {_count(rate)} tokens/s"
        if self.interactive:
            print("\r" + line.ljust(80), end="\n" if last else "", file=self.out, flush=True)
        else:
            print(line, file=self.out, flush=True)


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


Progress = Callable[[int, int, int], None]
"""Called as progress(files_done, files_total, tokens_written) while a dataset is written (BuildProgress)."""


def build_text_dataset(files: Sequence[Path], out_dir: Path, tokenizer: Tokenizer, val_fraction: float, seed: int = 0,
                       progress: Progress | None = None) -> DatasetInfo:
    """One document per file; files are split into train and val by a stable hash of (seed, path relative to
    the files' common folder), so a file is never in both and the split is the same on every machine.
    Bytes that are not UTF-8 decode to U+FFFD; empty files are skipped. Replaces any dataset at out_dir.

    The input streams: each file is read, tokenised and handed to its split's writer, which holds at most a
    record batch of tokens, so memory does not grow with the corpus."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction = {val_fraction}: must be between 0 and 1")
    out_dir = Path(out_dir).absolute()
    files = sorted({Path(f).absolute() for f in files})  # sorted: the same file set in any order gives the same dataset
    if not files:
        raise ValueError(f"{out_dir}: no input files")
    root = _common_root(files)
    files = [f for f in files if f.stat().st_size]
    sources = [f.relative_to(root).as_posix() for f in files]
    # The split depends on paths only, so it is settled before any file is read.
    is_val = _assign_splits(np.array([_val_score(s, seed) for s in sources]), val_fraction)

    with _staged(out_dir) as tmp:
        with (SplitWriter(split_file(tmp, "train"), tokenizer.vocab_size) as train,
              SplitWriter(split_file(tmp, "val"), tokenizer.vocab_size) as val):
            for done, (f, source, held_out) in enumerate(zip(files, sources, is_val), 1):
                text = f.read_bytes().decode("utf-8", errors="replace")
                (val if held_out else train).add(tokenizer.encode(text), source)
                if progress is not None:
                    progress(done, len(files), train.tokens + val.tokens)
        counts = {"train": {"docs": train.docs, "tokens": train.tokens}, "val": {"docs": val.docs, "tokens": val.tokens}}
        meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "splits": counts, "val_fraction": val_fraction, "seed": seed, "root": str(root),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return read_dataset_info(out_dir)


def old_format_error(path: str | Path) -> FileNotFoundError | None:
    """The error to raise if `path` holds a dataset in the Parquet format of earlier versions, else None."""
    path = Path(path)
    old = [s for s in SPLITS if (path / f"{s}.parquet").is_file() and not split_file(path, s).is_file()]
    if not old:
        return None
    return FileNotFoundError(
        f"{path}: a dataset in the old Parquet format ({', '.join(f'{s}.parquet' for s in old)}); datasets are now "
        f"Arrow IPC files read memory-mapped ({', '.join(split_file(path, s).name for s in SPLITS)}). "
        f"Convert it once, in place: flotilla data --convert {path}")


# Parquet rows (documents) per record batch when converting: bounded memory whatever the row groups hold.
CONVERT_BATCH_DOCS = 8192


def convert_parquet_dataset(path: str | Path, progress: Progress | None = None) -> DatasetInfo:
    """Rewrites a dataset of earlier versions (train.parquet, val.parquet, meta.json) in place as Arrow IPC
    split files, streaming CONVERT_BATCH_DOCS documents at a time; the documents, their order and meta.json
    stay the same. `progress` counts split files."""
    path = Path(path).absolute()
    info = read_dataset_info(path)
    if old_format_error(path) is None:
        raise ValueError(f"{path}: no Parquet split files to convert (expected train.parquet and val.parquet); "
                         f"it already holds {', '.join(split_file(path, s).name for s in SPLITS)}")
    with _staged(path) as tmp:
        shutil.copy2(path / "meta.json", tmp / "meta.json")
        written = 0
        for done, split in enumerate(SPLITS):
            with SplitWriter(split_file(tmp, split), info.vocab_size) as writer:
                parquet = pq.ParquetFile(path / f"{split}.parquet")
                for batch in parquet.iter_batches(batch_size=CONVERT_BATCH_DOCS, columns=["tokens", "source"]):
                    writer.write_batch(batch)
                    if progress is not None:
                        progress(done, len(SPLITS), written + writer.tokens)
            written += writer.tokens
        if progress is not None:
            progress(len(SPLITS), len(SPLITS), written)
    return read_dataset_info(path)


def read_dataset_info(path: str | Path) -> DatasetInfo:
    """The dataset at `path`, from its meta.json."""
    path = Path(path)
    meta_file = path / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
        splits = meta["splits"]
        return DatasetInfo(path, meta["tokenizer"], meta["vocab_size"], meta["eos_id"],
                           splits["train"]["docs"], splits["train"]["tokens"], splits["val"]["docs"], splits["val"]["tokens"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FileNotFoundError(f"{path}: no valid dataset there ({meta_file}: {err!r}); build one with `flotilla data`") from None


def ensure_stdlib_dataset(cache_dir: Path, tokenizer_spec: str, val_fraction: float, seed: int = 0) -> DatasetInfo:
    """The standard-library dataset in cache_dir/<tokenizer name>-<val_fraction>-<seed>/, built on first use."""
    tokenizer = load_tokenizer(tokenizer_spec)
    out_dir = Path(cache_dir) / f"{tokenizer.name}-{val_fraction}-{seed}"
    # A cache written by an earlier version (Parquet splits) is rebuilt rather than converted: it is a cache.
    if (out_dir / "meta.json").is_file() and all(split_file(out_dir, s).is_file() for s in SPLITS):
        return read_dataset_info(out_dir)
    return build_text_dataset(stdlib_source_files(), out_dir, tokenizer, val_fraction, seed)
