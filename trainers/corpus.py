"""Text files -> a token dataset on disk, and the corpus every machine has: the Python standard library.

A dataset is a directory:
    train.parquet, val.parquet  one row per document: tokens list<int32> (no EOS), source string (relative path)
    meta.json                   tokenizer name, vocab_size, eos_id, per-split document and token counts, created
It is written into a temporary directory beside its final place and renamed there, so a crash never leaves
a half-written dataset where a reader would find it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


def _write_split(path: Path, docs: list[np.ndarray], sources: list[str]) -> int:
    """Writes one split from per-document token arrays; returns its token count."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum())
    if total >= 2**31:
        raise ValueError(f"{path}: {total} tokens exceed the 2**31 that a list<int32> column can index; split the input files into several datasets")
    # One flat values array + offsets builds the list column without a Python object per token.
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    values = np.concatenate(docs).astype(np.int32) if docs else np.zeros(0, np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    # zstd: the stdlib byte dataset's train split is 7 MB and reads in 0.24 s, against 10 MB and 0.53 s with
    # the default snappy (measured on 30M tokens, 2 cores).
    pq.write_table(pa.table({"tokens": tokens, "source": pa.array(sources, pa.string())}), path, compression="zstd")
    return total


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


def build_text_dataset(files: Sequence[Path], out_dir: Path, tokenizer: Tokenizer, val_fraction: float, seed: int = 0) -> DatasetInfo:
    """One document per file; files are split into train and val by a stable hash of (seed, path relative to
    the files' common folder), so a file is never in both and the split is the same on every machine.
    Bytes that are not UTF-8 decode to U+FFFD; empty files are skipped. Replaces any dataset at out_dir."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction = {val_fraction}: must be between 0 and 1")
    out_dir = Path(out_dir).absolute()
    files = sorted({Path(f).absolute() for f in files})  # sorted: the same file set in any order gives the same dataset
    if not files:
        raise ValueError(f"{out_dir}: no input files")
    root = _common_root(files)

    docs, sources = [], []
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")
        if text:
            docs.append(np.asarray(tokenizer.encode(text), dtype=np.int32))
            sources.append(f.relative_to(root).as_posix())
    is_val = _assign_splits(np.array([_val_score(s, seed) for s in sources]), val_fraction)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        counts = {}
        for split, members in (("train", ~is_val), ("val", is_val)):
            chosen = np.flatnonzero(members)
            n_tokens = _write_split(tmp / f"{split}.parquet", [docs[i] for i in chosen], [sources[i] for i in chosen])
            counts[split] = {"docs": len(chosen), "tokens": n_tokens}
        meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "splits": counts, "val_fraction": val_fraction, "seed": seed, "root": str(root),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_dataset_info(out_dir)


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
    if (out_dir / "meta.json").is_file():
        return read_dataset_info(out_dir)
    return build_text_dataset(stdlib_source_files(), out_dir, tokenizer, val_fraction, seed)
