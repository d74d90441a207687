import numpy as np
import pytest
import torch

import trainers.corpus as corpus
from trainers.config import DataConfig
from trainers.corpus import build_text_dataset, stdlib_source_files
from trainers.data import IGNORE_INDEX, BatchPlan, PackedRows, build_splits, load_split, synthetic_split, validation_rows
from trainers.token_files import MappedStream, SplitWriter
from trainers.tokenizer import ByteTokenizer

EOS = 99


def _random_docs(seed: int, n: int = 30) -> list[list[int]]:
    """Documents of 0..40 tokens (ids below EOS), many shorter than a row, some longer."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, EOS, rng.integers(0, 41)).tolist() for _ in range(n)]


def _reference_stream(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    stream, starts = [], []
    for doc in docs:
        starts.append(len(stream))
        stream += doc + [EOS]
    return np.array(stream, dtype=np.int32), np.array(starts)


def test_docstring_example():
    rows = PackedRows(np.array([1, 2, EOS, 3, 4, 5, EOS], np.int32), np.array([0, 3]), seq_len=4)
    assert len(rows) == 1
    b = rows.batch([0])
    assert b.tokens.tolist() == [[1, 2, EOS, 3]]
    assert b.targets.tolist() == [[2, EOS, IGNORE_INDEX, 4]]
    assert b.positions.tolist() == [[0, 1, 2, 0]]
    assert b.cu_seqlens.tolist() == [0, 3, 4] and b.cu_seqlens.dtype == torch.int32
    assert b.max_seqlen == 3 and b.num_targets == 3


@pytest.mark.parametrize("seq_len", [1, 3, 8, 50])
def test_rows_are_true_next_token_pairs_with_document_positions(seq_len):
    stream, starts = _reference_stream(_random_docs(seq_len))
    rows = PackedRows(stream, starts, seq_len)
    assert len(rows) == (len(stream) - 1) // seq_len
    doc_of = np.searchsorted(starts, np.arange(len(stream)), side="right") - 1
    start_set = set(starts.tolist())

    row_ids = list(range(len(rows)))[::-1]  # any order, every row
    b = rows.batch(row_ids)
    assert b.tokens.shape == b.targets.shape == b.positions.shape == (len(rows), seq_len)
    assert b.tokens.dtype == b.targets.dtype == b.positions.dtype == torch.int64
    expected_targets = 0
    for i, r in enumerate(row_ids):
        for j in range(seq_len):
            at = r * seq_len + j
            assert b.tokens[i, j] == stream[at]
            if at + 1 in start_set:  # EOS -> next document: nothing to predict
                assert stream[at] == EOS and b.targets[i, j] == IGNORE_INDEX
            else:
                assert b.targets[i, j] == stream[at + 1]
                expected_targets += 1
            segment_start = max(starts[doc_of[at]], r * seq_len)  # a continued document restarts at the row
            assert b.positions[i, j] == at - segment_start
    assert b.num_targets == expected_targets

    flat = b.positions.flatten()
    boundaries = b.cu_seqlens.tolist()
    assert boundaries == torch.nonzero(flat == 0).flatten().tolist() + [flat.numel()]
    assert set(range(0, flat.numel(), seq_len)) <= set(boundaries)
    assert b.max_seqlen == max(np.diff(boundaries))


def test_batch_to_and_rejects_bad_rows():
    stream, starts = _reference_stream(_random_docs(0))
    rows = PackedRows(stream, starts, 16)
    b = rows.batch([0, 2])
    moved = b.to("cpu")
    assert all(torch.equal(getattr(b, k), getattr(moved, k)) for k in ("tokens", "targets", "positions", "cu_seqlens"))
    with pytest.raises(IndexError, match=f"{len(rows)} rows"):
        rows.batch([len(rows)])
    with pytest.raises(ValueError, match="non-empty"):
        rows.batch([])


@pytest.mark.parametrize("batch_tokens", [1, 37, 10**6])
def test_load_split_maps_arrow_documents_with_eos(tmp_path, batch_tokens):
    docs = _random_docs(1)  # some empty: their EOS alone stands for them
    with SplitWriter(tmp_path / "train.arrow", vocab_size=EOS + 1, batch_tokens=batch_tokens) as writer:
        for i, doc in enumerate(docs):
            writer.add(np.array(doc), f"d{i}")
    rows = load_split(tmp_path, "train", EOS, seq_len=8)
    stream, starts = _reference_stream(docs)
    assert isinstance(rows.stream, MappedStream) and rows.stream.dtype == np.int32
    np.testing.assert_array_equal(rows.stream, stream)
    np.testing.assert_array_equal(rows.doc_starts, starts)
    reference = PackedRows(stream, starts, seq_len=8)
    ids = list(range(len(rows)))[::-1]
    for got, want in zip(vars(rows.batch(ids)).values(), vars(reference.batch(ids)).values()):
        assert torch.equal(got, want) if isinstance(got, torch.Tensor) else got == want
    with pytest.raises(FileNotFoundError, match="val.arrow"):
        load_split(tmp_path, "val", EOS, 8)


@pytest.mark.parametrize("layout", [(1, 4), (2, 2), (4, 1)])
def test_batch_plan_global_batch_is_the_same_for_every_layout(layout):
    dp, accum = layout
    reference = BatchPlan(1000, 8, 4, 0, 1, seed=5)
    for step in (0, 1, 7, 40):  # 40 * 32 rows crosses the first epoch boundary
        expected = [r for a in range(4) for r in reference.rows(step, a)]
        got = [r for rank in range(dp) for a in range(accum) for r in BatchPlan(1000, 8, accum, rank, dp, 5).rows(step, a)]
        assert got == expected
        assert len(expected) == 32


def test_batch_plan_covers_each_epoch_once_then_reshuffles():
    num_rows, mb, accum, dp = 50, 3, 2, 2  # G = 12 does not divide 50: batches span epochs
    plans = [BatchPlan(num_rows, mb, accum, rank, dp, seed=0) for rank in range(dp)]
    order = [r for step in range(9) for p in plans for a in range(accum) for r in p.rows(step, a)]
    epoch0, epoch1 = order[:num_rows], order[num_rows:2 * num_rows]
    assert sorted(epoch0) == sorted(epoch1) == list(range(num_rows))  # within an epoch no step repeats a row
    assert epoch0 != epoch1 and epoch0 != list(range(num_rows))


def test_batch_plan_is_deterministic_and_seeded():
    a, b, c = (BatchPlan(500, 4, 2, 1, 2, seed) for seed in (0, 0, 1))
    assert [a.rows(s, m) for s in range(20) for m in range(2)] == [b.rows(s, m) for s in range(20) for m in range(2)]
    assert a.rows(3, 1) != c.rows(3, 1)
    with pytest.raises(ValueError, match="dp_rank"):
        BatchPlan(500, 4, 2, 2, 2, 0)
    with pytest.raises(ValueError, match="micro"):
        a.rows(0, 2)


@pytest.mark.parametrize("num_rows, mb, batches, dp, n_read",
                         [(100, 4, 3, 2, 24), (10, 4, 3, 2, 10), (7, 4, 8, 3, 7), (5, 2, 2, 1, 4), (7, 1, 8, 3, 6), (2, 4, 3, 4, 2), (1, 8, 2, 2, 1)])
def test_validation_rows_are_fixed_first_rows_with_equal_batch_counts(num_rows, mb, batches, dp, n_read):
    per_rank = [validation_rows(num_rows, mb, batches, rank, dp) for rank in range(dp)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs as many forward passes
    assert all(b and all(1 <= len(rows) <= mb for rows in b) for b in per_rank)
    assert len(per_rank[0]) <= batches
    seen = [r for b in per_rank for rows in b for r in rows]
    if num_rows >= dp:  # the first rows, each read once
        assert seen == list(range(n_read))
    else:  # fewer rows than ranks: ranks share them
        assert sorted(set(seen)) == list(range(n_read))
    assert validation_rows(0, mb, batches, 0, dp) == []


def test_validation_reads_a_small_split_whole_in_every_layout():
    # 14 rows, 2 batches per rank: one process with mb=8 and four with mb=4 both read rows 0..13.
    for mb, dp in [(8, 1), (8, 2), (4, 2), (4, 4)]:
        assert sorted(r for rank in range(dp) for rows in validation_rows(14, mb, 2, rank, dp) for r in rows) == list(range(14))


def test_synthetic_documents_are_determined_by_start_and_stride():
    cfg = DataConfig(synthetic_docs=400, synthetic_mean_len=40, val_fraction=0.1)
    vocab = 64
    rows = synthetic_split(cfg, vocab, seq_len=32, seed=0, split="train")
    bounds = np.append(rows.doc_starts, len(rows.stream))
    lengths = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        doc = rows.stream[begin:end].astype(np.int64)
        assert doc[-1] == vocab - 1 and np.all(doc[:-1] < vocab - 1)  # EOS = vocab-1 ends each document only
        steps = np.diff(doc[:-1]) % (vocab - 1)
        assert len(set(steps.tolist())) <= 1 and np.all((1 <= steps) & (steps <= 8))
        lengths.append(end - begin - 1)
    assert len(lengths) == 360
    assert abs(np.mean(lengths) / 40 - 1) < 0.1


def test_synthetic_splits_are_seeded_and_distinct():
    cfg = DataConfig(synthetic_docs=100)
    train = synthetic_split(cfg, 128, 16, seed=0, split="train")
    again = synthetic_split(cfg, 128, 16, seed=0, split="train")
    val = synthetic_split(cfg, 128, 16, seed=0, split="val")
    other = synthetic_split(cfg, 128, 16, seed=1, split="train")
    np.testing.assert_array_equal(train.stream, again.stream)
    assert len(train.doc_starts) == 95 and len(val.doc_starts) == 5
    assert not np.array_equal(val.stream[:50], train.stream[:50])
    assert not np.array_equal(other.stream[:50], train.stream[:50])


def test_a_tiny_synthetic_split_still_holds_a_row():
    cfg = DataConfig(synthetic_docs=2, synthetic_mean_len=1)
    assert len(synthetic_split(cfg, 16, seq_len=64, seed=0, split="val")) >= 1


def test_build_splits_synthetic():
    train, val, eos = build_splits(DataConfig(synthetic_docs=200), vocab_size=32, seq_len=16, seed=0)
    assert eos == 31 and len(train) > len(val) > 0
    assert train.stream.max() == 31


@pytest.fixture(scope="module")
def byte_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ds"
    build_text_dataset(stdlib_source_files()[:40], out, ByteTokenizer(), 0.25)
    return out


def test_build_splits_parquet_and_vocab_check(byte_dataset):
    train, val, eos = build_splits(DataConfig(source="parquet", path=str(byte_dataset)), 300, 64, seed=0)
    assert eos == 256 and len(train) > 0 and len(val) > 0
    with pytest.raises(ValueError, match="model.vocab_size = 200.*257"):
        build_splits(DataConfig(source="parquet", path=str(byte_dataset)), 200, 64, seed=0)
    with pytest.raises(ValueError, match="data.path"):
        build_splits(DataConfig(source="parquet"), 300, 64, seed=0)
    with pytest.raises(ValueError, match="seq_len = 100000000"):
        build_splits(DataConfig(source="parquet", path=str(byte_dataset)), 300, 10**8, seed=0)


def test_build_splits_stdlib_builds_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "stdlib_source_files", lambda: stdlib_source_files()[:40])
    cfg = DataConfig(source="stdlib", path=str(tmp_path), val_fraction=0.25)
    train, val, eos = build_splits(cfg, 257, 32, seed=4)
    info = corpus.read_dataset_info(tmp_path / "byte-0.25-4")
    assert eos == 256 and (len(train.doc_starts), len(val.doc_starts)) == (info.train_docs, info.val_docs)
    assert len(train.stream) == info.train_tokens + info.train_docs  # one EOS per document


def test_train_tokens_keeps_the_head_of_the_training_split_only(byte_dataset):
    full = DataConfig(source="parquet", path=str(byte_dataset))
    train, val, _ = build_splits(full, 300, 64, seed=0)
    cut_train, cut_val, _ = build_splits(full.model_copy(update={"train_tokens": 1000}), 300, 64, seed=0)
    assert len(cut_train) == (1000 - 1) // 64 < len(train)
    np.testing.assert_array_equal(cut_train.stream, train.stream[:1000])
    assert np.all(cut_train.doc_starts < 1000) and len(cut_train.doc_starts) >= 1
    np.testing.assert_array_equal(cut_val.stream, val.stream)  # validation is never cut
    first = cut_train.batch([0, 14])
    again = train.batch([0, 14])
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.targets, again.targets)
    with pytest.raises(ValueError, match="data.train_tokens = 64: fewer than one row of train.seq_len = 64"):
        build_splits(full.model_copy(update={"train_tokens": 64}), 300, 64, seed=0)
