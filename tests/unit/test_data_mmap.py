"""Datasets at corpus scale: split files read memory-mapped, the old Parquet format refused and converted,
and batches built ahead in a background thread without changing what any step reads."""

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import trainers.corpus as corpus
from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config
from trainers.config import DataConfig, TrainerConfig
from trainers.corpus import build_text_dataset, ensure_stdlib_dataset, read_dataset_info, stdlib_source_files
from trainers.data import BatchPlan, PackedRows, build_splits, load_split
from trainers.documents import DocumentSequences
from trainers.loop import Trainee, step_batches
from trainers.prefetch import Prefetcher, prefetch
from trainers.reporter import LocalReporter
from trainers.run import run
from trainers.token_files import MappedStream, SplitWriter, open_split
from trainers.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[2]


def _batches_equal(a, b) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(vars(a).values(), vars(b).values()))


@pytest.fixture(scope="module")
def byte_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    build_text_dataset(stdlib_source_files()[:40], out, ByteTokenizer(), 0.25)
    return out


# --- the mapped split file ---------------------------------------------------------------------------------

def test_mapped_stream_indexes_like_the_array_it_stands_for(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70_000, n) for n in rng.integers(0, 30, 50)]  # ids past uint16: an int32 file
    with SplitWriter(tmp_path / "s.arrow", vocab_size=70_001, batch_tokens=40) as writer:
        for i, doc in enumerate(docs):
            writer.add(doc, f"d{i}")
    mapped = open_split(tmp_path / "s.arrow", eos_id=70_000)
    stream = np.concatenate([np.append(d, 70_000) for d in docs]).astype(np.int32)
    assert len(mapped) == len(stream) and mapped.dtype == np.int32
    np.testing.assert_array_equal(mapped, stream)
    at = rng.integers(0, len(stream), (3, 17))
    np.testing.assert_array_equal(mapped[at], stream[at])
    view = mapped[100:300]
    assert isinstance(view, MappedStream) and len(view) == 200
    np.testing.assert_array_equal(view[np.arange(200)], stream[100:300])
    np.testing.assert_array_equal(view[50:60], stream[150:160])
    for bad in (np.array([len(stream)]), np.array([-1])):
        with pytest.raises(IndexError, match="out of range"):
            mapped[bad]
    with pytest.raises(IndexError, match="out of range"):
        view[np.array([200])]


def test_split_writer_refuses_ids_its_type_cannot_hold(tmp_path):
    with SplitWriter(tmp_path / "s.arrow", vocab_size=257) as writer:
        with pytest.raises(ValueError, match="70000.*uint16.*vocab_size"):
            writer.add(np.array([1, 70_000]), "big.py")


def test_document_sequences_read_a_mapped_split_as_an_in_memory_one(byte_dataset):
    info = read_dataset_info(byte_dataset)
    rows = load_split(byte_dataset, "train", info.eos_id, 64)
    in_memory = PackedRows(np.asarray(rows.stream), rows.doc_starts, 64)
    mapped, plain = (DocumentSequences.from_rows(r, max_len=300) for r in (rows, in_memory))
    np.testing.assert_array_equal(mapped.lengths, plain.lengths)
    picks = [0, 5, len(plain) - 1, 17]
    assert _batches_equal(mapped.packed(picks, pad_to_multiple=8), plain.packed(picks, pad_to_multiple=8))


RSS_PROBE = """
import json, sys
from trainers.data import BatchPlan, load_split

def rss_mb():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile")}

load_split(sys.argv[2], "train", eos_id=60_000, seq_len=1024).batch([0])  # first use of the code paths
before = rss_mb()
rows = load_split(sys.argv[1], "train", eos_id=60_000, seq_len=1024)
plan = BatchPlan(len(rows), 8, 1, 0, 1, seed=0)
for step in range(20):
    rows.batch(plan.rows(step, 0))
print(json.dumps({"before": before, "after": rss_mb(), "rows": len(rows)}))
"""


def test_a_rank_maps_the_dataset_rather_than_loading_it(tmp_path):
    """200 MB of tokens on disk; a process that opens the split and reads 20 batches of 8 x 1024 tokens grows
    by the document index and the pages it read, a few MB, where loading the split would add 200 MB or more."""
    base = np.random.default_rng(0).integers(0, 60_000, 1 << 20, dtype=np.uint16)
    with SplitWriter(tmp_path / "train.arrow", vocab_size=60_001) as writer:
        for i in range(100 * 1024 * 1024 // 8192):  # 100M uint16 tokens = 200 MB, documents of 8,192
            start = (i * 7919) % (len(base) - 8192)
            writer.add(base[start:start + 8192], f"doc{i}")
    (tmp_path / "warm").mkdir()
    with SplitWriter(tmp_path / "warm" / "train.arrow", vocab_size=60_001) as writer:
        writer.add(base[:2048], "warm")
    size_mb = (tmp_path / "train.arrow").stat().st_size / 2**20
    assert size_mb > 190
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path), str(tmp_path / "warm")], capture_output=True,
                         text=True, cwd=ROOT, check=True)
    probe = json.loads(out.stdout)
    growth = probe["after"]["VmRSS"] - probe["before"]["VmRSS"]
    assert probe["rows"] == (100 * 1024 * 1024 + 12_800 - 1) // 1024  # 12,800 documents, each + EOS
    # mapped pages are dropped past RESIDENT_BYTES (32 MB); reading all 160 rows' folios would map ~150 MB
    assert growth < 50, f"RSS grew by {growth:.0f} MB reading a {size_mb:.0f} MB split: {probe}"


# --- the old Parquet format ------------------------------------------------------------------------------

def _old_dataset(path: Path, docs: dict[str, list[list[int]]]) -> None:
    """A dataset as earlier versions wrote it: Parquet splits of list<int32> tokens, and meta.json."""
    path.mkdir(parents=True)
    for split, split_docs in docs.items():
        table = pa.table({"tokens": pa.array(split_docs, pa.list_(pa.int32())),
                          "source": [f"{split}{i}.py" for i in range(len(split_docs))]})
        pq.write_table(table, path / f"{split}.parquet", compression="zstd", row_group_size=7)
    counts = {s: {"docs": len(d), "tokens": sum(map(len, d))} for s, d in docs.items()}
    (path / "meta.json").write_text(json.dumps({"tokenizer": "byte", "vocab_size": 257, "eos_id": 256, "splits": counts}))


def _docs(seed: int, n: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, rng.integers(0, 200)).tolist() for _ in range(n)]


def test_an_old_parquet_dataset_is_refused_with_the_command_that_converts_it(tmp_path, capsys):
    old = tmp_path / "old"
    docs = {"train": _docs(0, 40), "val": _docs(1, 9)}
    _old_dataset(old, docs)
    with pytest.raises(FileNotFoundError, match=f"{old}: a dataset in the old Parquet format.*flotilla data --convert {old}"):
        build_splits(DataConfig(source="parquet", path=str(old)), 257, 32, seed=0)
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  source: parquet\n  path: {old}\nmodel:\n  vocab_size: 320\n")
    with pytest.raises(ConfigError, match=f"data.path = '{old}'.*train.parquet, val.parquet.*--convert"):
        load_config(config)

    assert main(["data", "--convert", str(old)]) == 0
    assert sorted(p.name for p in old.iterdir()) == ["meta.json", "train.arrow", "val.arrow"]
    assert "2/2 files" in capsys.readouterr().err  # the progress line
    load_config(config)
    train, val, eos = build_splits(DataConfig(source="parquet", path=str(old)), 257, 32, seed=0)
    for rows, split_docs in ((train, docs["train"]), (val, docs["val"])):
        np.testing.assert_array_equal(rows.stream, np.concatenate([d + [eos] for d in split_docs]))

    assert main(["data", "--convert", str(old)]) == 2
    assert "no Parquet split files to convert" in capsys.readouterr().err
    assert main(["data", "--convert", str(old), str(tmp_path / "elsewhere")]) == 2


def test_the_config_check_refuses_damaged_or_mismatched_split_files_naming_data_path(tmp_path):
    """Only meta.json used to be read before the workers started: a truncated split file, one from another build
    or a missing one failed in every worker after Ray had started them. Now `load_config` refuses them."""
    ds = tmp_path / "ds"
    build_text_dataset(stdlib_source_files()[:12], ds, ByteTokenizer(), val_fraction=0.3)
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  source: parquet\n  path: {ds}\nmodel:\n  vocab_size: 320\n")
    load_config(config)  # as built: both splits open and hold meta.json's documents

    train = (ds / "train.arrow").read_bytes()
    (ds / "train.arrow").write_bytes(train[: len(train) // 2])
    with pytest.raises(ConfigError, match=f"data.path = '{ds}': {ds / 'train.arrow'}: not an Arrow IPC split file"):
        load_config(config)
    (ds / "train.arrow").write_bytes(train)

    other = tmp_path / "other"
    build_text_dataset(stdlib_source_files()[12:30], other, ByteTokenizer(), val_fraction=0.3)
    shutil.copy2(other / "val.arrow", ds / "val.arrow")
    with pytest.raises(ConfigError, match=rf"{ds / 'val.arrow'}: \d+ documents where meta.json says \d+"):
        load_config(config)
    (ds / "val.arrow").unlink()
    with pytest.raises(ConfigError, match=f"{ds / 'val.arrow'}: no such file"):
        load_config(config)


def test_flotilla_data_writes_arrow_splits_and_shows_progress(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"m{i}.py").write_text(f"x = {i}\n" * (i + 1))
    assert main(["data", str(tmp_path / "ds"), str(src), "--val-fraction", "0.3"]) == 0
    info = read_dataset_info(tmp_path / "ds")
    assert info.train_docs + info.val_docs == 6
    assert f"flotilla data: 6/6 files, {info.train_tokens + info.val_tokens} tokens" in capsys.readouterr().err
    assert main(["data"]) == 2  # neither a directory to write nor --convert


def test_a_stdlib_cache_in_the_old_format_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "stdlib_source_files", lambda: stdlib_source_files()[:10])
    _old_dataset(tmp_path / "byte-0.25-0", {"train": _docs(0, 3), "val": _docs(1, 2)})
    info = ensure_stdlib_dataset(tmp_path, "byte", 0.25, seed=0)
    assert info.train_docs + info.val_docs == 10
    assert sorted(p.name for p in info.path.iterdir()) == ["meta.json", "train.arrow", "val.arrow"]


def test_the_epoch_order_is_numpys_permutation_as_before():
    """Shuffling an int32 arange draws Generator.permutation's order: runs resume on the rows they read before."""
    plan = BatchPlan(997, 4, 2, dp_rank=1, dp_size=3, seed=11)
    for step in (0, 5, 41):  # 41 * 24 rows crosses into the second epoch
        first = step * 24 + 8
        epoch, index = np.divmod(np.arange(first, first + 4), 997)
        expected = [int(np.random.default_rng([11, int(e)]).permutation(997)[i]) for e, i in zip(epoch, index)]
        assert plan.rows(step, 0) == expected


# --- prefetching -----------------------------------------------------------------------------------------

def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "flotilla-prefetch"]


def test_prefetched_batches_are_the_batches_of_the_plain_loop(byte_dataset):
    """Through the loop's own step_batches: 2 micro-batches, this rank's half of every row (sp 2 of 2)."""
    cfg = TrainerConfig.model_validate({"train": {"micro_batch_size": 3, "grad_accum": 2, "seq_len": 64}})
    rows = load_split(byte_dataset, "train", 256, 64)
    t = Trainee(cfg, engine=None, train_rows=rows, val_rows=rows, device=torch.device("cpu"), sp_rank=1, sp_size=2)
    plan = BatchPlan(len(rows), 3, 2, dp_rank=0, dp_size=1, seed=4)
    plain = [step_batches(t, plan, step) for step in range(5, 17)]
    with prefetch(lambda step: step_batches(t, plan, step), range(5, 17), depth=2) as upcoming:
        got = list(upcoming)
    assert [step for step, _ in got] == list(range(5, 17))
    assert all(_batches_equal(a, b) for (_, ours), theirs in zip(got, plain) for a, b in zip(ours, theirs))
    assert got[0][1][0].tokens.shape == (3, 32)
    assert not _prefetch_threads()


def test_the_producer_runs_at_most_depth_steps_ahead():
    made = []
    with Prefetcher(lambda step: made.append(step) or step, range(1000), depth=2) as upcoming:
        assert next(upcoming) == (0, 0)
        deadline = time.monotonic() + 5
        while len(made) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        # one consumed, two in the queue, one made and waiting for room
        assert made == [0, 1, 2, 3]
        assert [next(upcoming) for _ in range(3)] == [(1, 1), (2, 2), (3, 3)]
    assert not _prefetch_threads() and len(made) <= 7


def test_an_error_in_the_producer_is_raised_in_the_consumer_at_its_step():
    def make(step):
        if step == 3:
            raise ValueError("row 3 is unreadable")
        return step

    got = []
    with pytest.raises(ValueError, match="row 3 is unreadable"):
        with prefetch(make, range(10), depth=2) as upcoming:
            for step, value in upcoming:
                got.append(value)
    assert got == [0, 1, 2]
    assert not _prefetch_threads()


@pytest.mark.parametrize("leave", ["break", "raise"])
def test_leaving_the_loop_early_stops_and_joins_the_thread(leave):
    with pytest.raises(RuntimeError) if leave == "raise" else contextlib.nullcontext():
        with prefetch(lambda step: step, range(10**9), depth=2) as upcoming:
            for step, _ in upcoming:
                if step == 2:
                    if leave == "raise":
                        raise RuntimeError("the step failed")
                    break
    assert not _prefetch_threads()


def _train(tmp: Path, prefetch_depth: int, steps: int, every: int = 0) -> list[tuple[int, float, float]]:
    cfg = TrainerConfig.model_validate({
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32},
        "data": {"source": "synthetic", "synthetic_docs": 200, "synthetic_mean_len": 20, "prefetch": prefetch_depth},
        "train": {"steps": steps, "micro_batch_size": 2, "grad_accum": 2, "seq_len": 16, "val_every": 0, "log_every": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "checkpoint": {"every": every}})
    reporter = LocalReporter(tmp)
    run(cfg, reporter)
    return [(m["step"], m["loss"], m["grad_norm"]) for m in reporter.metrics if "loss" in m]


def test_training_with_prefetch_gives_the_losses_without_and_resumes_exactly(tmp_path):
    plain = _train(tmp_path / "plain", prefetch_depth=0, steps=6)
    ahead = _train(tmp_path / "ahead", prefetch_depth=2, steps=6, every=3)
    assert ahead == plain and len(plain) == 6
    shutil.rmtree(tmp_path / "ahead" / "checkpoint_6")  # as if the run had died after step 3's checkpoint
    assert _train(tmp_path / "ahead", prefetch_depth=2, steps=6) == plain[3:]
    assert not _prefetch_threads()
