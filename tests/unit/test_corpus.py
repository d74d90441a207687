import io
import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pytest

import trainers.corpus as corpus
import trainers.token_files as token_files
from trainers.corpus import BuildProgress, build_text_dataset, ensure_stdlib_dataset, read_dataset_info, stdlib_source_files
from trainers.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()


@pytest.fixture(scope="module")
def stdlib_subset() -> list[Path]:
    """40 standard-library files spread over the tree (top level and packages)."""
    files = stdlib_source_files()
    return files[:: len(files) // 40][:40]


def _read(out_dir: Path, split: str) -> dict[str, list[int]]:
    table = pa.ipc.open_file(out_dir / f"{split}.arrow").read_all()
    assert table.schema.field("tokens").type == pa.list_(pa.uint16())  # byte tokens: 257 ids fit uint16
    return dict(zip(table.column("source").to_pylist(), table.column("tokens").to_pylist()))


def _leftovers(parent: Path, keep: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != keep)


def test_stdlib_source_files_lists_the_standard_library_only():
    files = stdlib_source_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 500
    assert files == sorted(files)
    assert root / "os.py" in files and root / "json" / "decoder.py" in files
    assert all(f.suffix == ".py" for f in files)
    assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in files)


def test_build_splits_by_file_and_meta_matches_contents(tmp_path, stdlib_subset):
    info = build_text_dataset(stdlib_subset, tmp_path / "ds", BYTE, val_fraction=0.25)
    train, val = _read(tmp_path / "ds", "train"), _read(tmp_path / "ds", "val")
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = {f.relative_to(root).as_posix() for f in stdlib_subset if f.stat().st_size}

    assert not set(train) & set(val)
    assert set(train) | set(val) == expected
    assert (info.train_docs, info.val_docs) == (len(train), len(val)) and info.val_docs > 0
    assert info.train_tokens == sum(map(len, train.values())) and info.val_tokens == sum(map(len, val.values()))
    assert (info.tokenizer, info.vocab_size, info.eos_id, info.path) == ("byte", 257, 256, tmp_path / "ds")
    assert read_dataset_info(tmp_path / "ds") == info
    assert "created" in json.loads((tmp_path / "ds" / "meta.json").read_text())
    for source, tokens in list(val.items())[:3]:  # documents are the files' bytes, without EOS
        assert bytes(tokens) == (root / source).read_bytes()


def test_build_is_deterministic_and_the_split_follows_the_seed(tmp_path, stdlib_subset):
    build_text_dataset(stdlib_subset, tmp_path / "a", BYTE, 0.25, seed=1)
    build_text_dataset(list(reversed(stdlib_subset)), tmp_path / "b", BYTE, 0.25, seed=1)
    build_text_dataset(stdlib_subset, tmp_path / "c", BYTE, 0.25, seed=2)
    for split in ("train", "val"):
        assert list(_read(tmp_path / "a", split).items()) == list(_read(tmp_path / "b", split).items())
    assert set(_read(tmp_path / "a", "val")) != set(_read(tmp_path / "c", "val"))


def test_adding_files_does_not_move_others_between_splits(tmp_path, stdlib_subset):
    build_text_dataset(stdlib_subset[:20], tmp_path / "small", BYTE, 0.3)
    build_text_dataset(stdlib_subset, tmp_path / "large", BYTE, 0.3)
    small_val, large_val = set(_read(tmp_path / "small", "val")), set(_read(tmp_path / "large", "val"))
    small_files = small_val | set(_read(tmp_path / "small", "train"))
    assert large_val & small_files == small_val


def test_neither_split_is_empty_with_two_files(tmp_path):
    (tmp_path / "src").mkdir()
    files = [tmp_path / "src" / "a.txt", tmp_path / "src" / "b.txt"]
    for f in files:
        f.write_text("text")
    for fraction in (1e-9, 1 - 1e-9):
        info = build_text_dataset(files, tmp_path / "ds", BYTE, fraction)
        assert (info.train_docs, info.val_docs) == (1, 1)


def test_empty_files_are_skipped_and_bad_utf8_is_replaced(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.py").write_bytes(b"")
    (src / "latin1.py").write_bytes(b"caf\xe9\n")
    (src / "ok.py").write_text("x = 1\n")
    build_text_dataset(sorted(src.iterdir()), tmp_path / "ds", BYTE, 0.5)
    docs = _read(tmp_path / "ds", "train") | _read(tmp_path / "ds", "val")
    assert set(docs) == {"latin1.py", "ok.py"}
    assert BYTE.decode(docs["latin1.py"]) == "caf\ufffd\n"


class CrashingTokenizer(ByteTokenizer):
    """Dies (as a Ctrl-C would) at the `at`-th file, with record batches of both splits already on disk."""

    def __init__(self, at: int):
        self.calls, self.at = 0, at

    def encode(self, text):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().encode(text)


def test_a_crash_while_writing_leaves_no_dataset_and_no_debris(tmp_path, stdlib_subset, monkeypatch):
    monkeypatch.setattr(token_files, "BATCH_TOKENS", 1000)
    with pytest.raises(KeyboardInterrupt):
        build_text_dataset(stdlib_subset, tmp_path / "ds", CrashingTokenizer(at=30), 0.25)
    assert list(tmp_path.iterdir()) == []

    # A failed rebuild keeps the dataset that was there.
    info = build_text_dataset(stdlib_subset[:10], tmp_path / "ds", BYTE, 0.25)
    with pytest.raises(KeyboardInterrupt):
        build_text_dataset(stdlib_subset, tmp_path / "ds", CrashingTokenizer(at=30), 0.25)
    assert read_dataset_info(tmp_path / "ds") == info
    assert _leftovers(tmp_path, keep="ds") == []


def test_the_build_streams_documents_to_disk_as_it_reads_them(tmp_path, stdlib_subset, monkeypatch):
    """Record batches reach the split file while later files are still unread: the corpus is never held."""
    monkeypatch.setattr(token_files, "BATCH_TOKENS", 1000)
    seen = []

    class Watching(ByteTokenizer):
        def encode(self, text):
            seen.append(sum(f.stat().st_size for f in tmp_path.glob(".ds.tmp-*/train.arrow")))
            return super().encode(text)

    build_text_dataset(stdlib_subset, tmp_path / "ds", Watching(), 0.25)
    assert seen[-1] > 100_000 and seen[-1] > 10 * seen[1]  # the stdlib files are kilobytes each
    batches = pa.ipc.open_file(tmp_path / "ds" / "train.arrow").num_record_batches
    assert batches > len(stdlib_subset) // 2  # about a batch per file of 1000+ tokens


def test_build_progress_is_throttled_and_says_files_tokens_and_rate():
    class Log(io.StringIO):
        def isatty(self):
            return False

    now = [0.0]
    out = Log()
    progress = BuildProgress(out, log_every_s=10.0, clock=lambda: now[0])
    for files in range(1, 101):
        now[0] = files * 0.5  # a file every half second: 50 s in all
        progress(files, 100, files * 2_000_000)
    lines = out.getvalue().splitlines()
    assert lines[0] == "flotilla data: 1/100 files, 2.0M tokens, 4.0M tokens/s"
    assert lines[-1] == "flotilla data: 100/100 files, 200.0M tokens, 4.0M tokens/s"
    assert 5 <= len(lines) <= 7  # one every 10 s, plus the first and the last


def test_a_second_build_replaces_the_first_cleanly(tmp_path, stdlib_subset):
    build_text_dataset(stdlib_subset[:10], tmp_path / "ds", BYTE, 0.25)
    second = build_text_dataset(stdlib_subset[10:], tmp_path / "ds", BYTE, 0.25)
    fresh = build_text_dataset(stdlib_subset[10:], tmp_path / "fresh", BYTE, 0.25)
    for split in ("train", "val"):
        assert _read(tmp_path / "ds", split) == _read(tmp_path / "fresh", split)
    assert (second.train_docs, second.val_docs) == (fresh.train_docs, fresh.val_docs)
    assert _leftovers(tmp_path, keep="ds") == ["fresh"]
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["meta.json", "train.arrow", "val.arrow"]


def test_read_dataset_info_names_a_missing_or_broken_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nothing'}.*flotilla data"):
        read_dataset_info(tmp_path / "nothing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "meta.json").write_text('{"tokenizer": "byte"}')
    with pytest.raises(FileNotFoundError, match="broken"):
        read_dataset_info(tmp_path / "broken")


def test_ensure_stdlib_dataset_builds_once_then_reuses(tmp_path, stdlib_subset, monkeypatch):
    monkeypatch.setattr(corpus, "stdlib_source_files", lambda: stdlib_subset)
    info = ensure_stdlib_dataset(tmp_path, "byte", 0.25, seed=3)
    assert info.path == tmp_path / "byte-0.25-3" and info.train_docs + info.val_docs > 30

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached dataset")

    monkeypatch.setattr(corpus, "build_text_dataset", no_rebuild)
    assert ensure_stdlib_dataset(tmp_path, "byte", 0.25, seed=3) == info
