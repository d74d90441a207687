"""Text files -> a token dataset on disk: train.parquet and val.parquet (one document per row) + meta.json.

The demo's corpus is the running Python's own standard library: real text that every machine has.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trainers.tokenizer import Tokenizer, load_tokenizer


@dataclass
class DatasetInfo:
    path: str
    tokenizer: str
    vocab_size: int
    eos_id: int
    train_docs: int
    train_tokens: int
    val_docs: int
    val_tokens: int


def stdlib_source_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))


def _is_val(name: str, val_fraction: float, seed: int) -> bool:
    # crc32, not hash(): Python salts str hashes per process, and the split must be the same everywhere
    return (zlib.crc32(f"{seed}:{name}".encode()) % 1_000_000) / 1_000_000 < val_fraction


def _common_root(files: Sequence[Path]) -> Path:
    parents = [p.resolve().parent for p in files]
    root = parents[0]
    while not all(root == p or root in p.parents for p in parents):
        root = root.parent
    return root


def build_text_dataset(files: Sequence[Path], out_dir: Path, tokenizer: Tokenizer, val_fraction: float, seed: int = 0) -> DatasetInfo:
    out_dir = Path(out_dir)
    root = _common_root(files)
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    for f in files:
        text = Path(f).read_bytes().decode("utf-8", errors="replace")
        if not text:
            continue
        name = str(Path(f).resolve().relative_to(root))
        tokens, sources = splits["val" if _is_val(name, val_fraction, seed) else "train"]
        tokens.append(tokenizer.encode(text))
        sources.append(name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    counts = {}
    for split, (tokens, sources) in splits.items():
        array = pa.array([t.tolist() if hasattr(t, "tolist") else t for t in tokens], type=pa.list_(pa.int32()))
        pq.write_table(pa.table({"tokens": array, "source": sources}), tmp / f"{split}.parquet")
        counts[split] = (len(tokens), sum(len(t) for t in tokens))
    info = DatasetInfo(str(out_dir), tokenizer.name, tokenizer.vocab_size, tokenizer.eos_id,
                       counts["train"][0], counts["train"][1], counts["val"][0], counts["val"][1])
    (tmp / "meta.json").write_text(json.dumps(asdict(info) | {"created": time.time()}, indent=1))
    if out_dir.exists():  # replace: move the old one aside first so a crash leaves one whole dataset
        old = out_dir.with_name(f".{out_dir.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
    return info


def read_dataset_info(path) -> DatasetInfo:
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"no dataset at {path} (no meta.json); build one with `flotilla data`")
    data = json.loads(meta.read_text())
    return DatasetInfo(**{k: data[k] for k in DatasetInfo.__dataclass_fields__} | {"path": str(path)})


def ensure_stdlib_dataset(cache_dir: Path, tokenizer_spec: str, val_fraction: float, seed: int = 0) -> DatasetInfo:
    tokenizer = load_tokenizer(tokenizer_spec)
    out = Path(cache_dir) / f"stdlib-{tokenizer.name}-{val_fraction}-{seed}"
    if (out / "meta.json").is_file():
        return read_dataset_info(out)
    return build_text_dataset(stdlib_source_files(), out, tokenizer, val_fraction, seed)
