"""Document batching (data.batching = documents): whole documents cut at train.max_doc_len, steps chosen by a
token budget as a pure function of (step, seed); and the config rules around adaptive sequence parallelism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import Config, ConfigError, validate_config
from trainers.config import DataConfig, TrainerConfig
from trainers.data import IGNORE_INDEX, synthetic_split
from trainers.documents import DocumentBatches, DocumentSequences


def sequences(max_len: int) -> DocumentSequences:
    rows = synthetic_split(DataConfig(synthetic_docs=300, synthetic_mean_len=40), vocab_size=64, seq_len=16, seed=1,
                           split="train")
    return DocumentSequences.from_rows(rows, max_len)


def test_documents_are_cut_into_chunks_that_cover_every_target_once():
    whole, cut = sequences(10_000), sequences(16)
    assert cut.lengths.max() <= 16 and whole.lengths.max() > 16  # something was cut
    assert cut.lengths.sum() == whole.lengths.sum()  # every input token in exactly one chunk
    for i in range(len(whole)):
        x, y = whole.tokens(i)
        assert np.array_equal(x[1:], y[:-1])  # targets are the next tokens
        assert y[-1] == 63  # the last target of a document is its EOS
    # the chunks of a document, end to end, are the document
    a, n = int(whole.starts[0]), int(whole.lengths[0])
    pieces = [cut.tokens(i) for i in np.flatnonzero((cut.starts >= a) & (cut.starts < a + n))]
    assert np.array_equal(np.concatenate([x for x, _ in pieces]), whole.tokens(0)[0])
    assert np.array_equal(np.concatenate([y for _, y in pieces]), whole.tokens(0)[1])


def test_a_packed_group_keeps_sequence_boundaries_and_pads_without_loss():
    seqs = sequences(16)
    batch = seqs.packed([3, 0, 7], pad_to_multiple=4)
    n = int(seqs.lengths[[3, 0, 7]].sum())
    assert batch.tokens.shape == (1, n + (-n % 4))
    assert batch.num_targets == n  # padding carries no loss
    assert (batch.targets[0, n:] == IGNORE_INDEX).all()
    bounds = np.cumsum([0, *seqs.lengths[[3, 0, 7]]])
    assert batch.cu_seqlens.tolist()[:4] == bounds.tolist()
    assert (batch.positions[0, bounds[:-1]] == 0).all()  # positions restart at each sequence
    assert np.array_equal(batch.tokens[0, bounds[1]:bounds[2]].numpy(), seqs.tokens(0)[0])
    idle = seqs.packed([], pad_to_multiple=4)  # an SP group the planner left idle: padding, no loss
    assert idle.tokens.shape == (1, 4) and idle.num_targets == 0 and idle.cu_seqlens.tolist() == [0, 4]


def test_steps_are_a_pure_function_of_step_and_seed_within_the_budget():
    seqs = sequences(16)
    plan = DocumentBatches(seqs.lengths, tokens_per_step=100, seed=5)
    again = DocumentBatches(seqs.lengths, tokens_per_step=100, seed=5)
    epoch = plan.steps_in_epoch(0)
    seen = [i for step in range(epoch) for i in plan.sequences(step)]
    assert sorted(seen) == list(range(len(seqs)))  # one epoch reads every sequence once
    for step in (0, 3, epoch - 1, epoch, epoch + 2):  # into the second epoch too
        ids = again.sequences(step)
        assert ids == plan.sequences(step)
        assert seqs.lengths[ids].sum() <= 100
        # greedy: the step stopped only because the next sequence would not fit
    assert plan.sequences(epoch) != plan.sequences(0)  # a new permutation each epoch
    assert DocumentBatches(seqs.lengths, 100, seed=6).sequences(0) != plan.sequences(0)


def test_a_budget_below_the_longest_sequence_is_refused():
    with pytest.raises(ValueError, match="train.tokens_per_step = 8: smaller than the longest sequence"):
        DocumentBatches(sequences(16).lengths, tokens_per_step=8, seed=0)


ADAPTIVE = {
    "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256},
    "data": {"source": "synthetic", "batching": "documents"},
    "train": {"max_doc_len": 256, "tokens_per_step": 1024},
    "parallel": {"sp": 4, "sp_mode": "adaptive", "dp_shard": 1, "adaptive": {"cost_model": "flexsp-7b"}},
    "cluster": {"num_workers": 4},
}


def adaptive(**changes) -> Config:
    data = {name: {**ADAPTIVE.get(name, {}), **changes.get(name, {})} for name in {*ADAPTIVE, *changes}}
    return validate_config(data)


@pytest.mark.parametrize("changes, fragment", [
    ({"data": {"batching": "rows"}}, "set data.batching = documents"),
    ({"parallel": {"sp": 2, "dp_shard": 2}}, "parallel.dp_shard = 2 with parallel.sp_mode = 'adaptive'"),
    ({"parallel": {"adaptive": {"cost_model": None}}}, "parallel.adaptive.cost_model is unset, and no built-in"),
    ({"parallel": {"adaptive": {"cost_model": "nowhere.json"}}}, "parallel.adaptive.cost_model = 'nowhere.json'"),
    ({"train": {"max_doc_len": 512}}, "train.max_doc_len = 512: must be at most model.max_seq_len = 256"),
])
def test_adaptive_configs_are_checked_before_anything_starts(changes, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        adaptive(**changes)


def test_train_command_exits_2_on_documents_without_adaptive_sp(tmp_path: Path, capsys):
    path = tmp_path / "documents.yaml"
    path.write_text(yaml.safe_dump({**ADAPTIVE, "parallel": {"sp": 1}, "cluster": {"num_workers": 1}}))
    assert main(["train", str(path)]) == 2
    assert "data.batching = documents: its steps of whole documents run through adaptive" in capsys.readouterr().err


def test_plan_lengths_refuses_a_bad_line(tmp_path: Path, capsys):
    path, lengths = tmp_path / "adaptive.yaml", tmp_path / "lengths.txt"
    path.write_text(yaml.safe_dump(ADAPTIVE))
    lengths.write_text("12\n\nabc\n")
    assert main(["plan", str(path), "--lengths", str(lengths)]) == 2
    assert "line 3: 'abc' is not a sequence length" in capsys.readouterr().err


def test_plan_lengths_prints_the_plan_as_json(tmp_path: Path, capsys):
    # one sequence only a degree-4 group can hold (80 tokens per device) and many short ones
    path, file = tmp_path / "adaptive.yaml", tmp_path / "lengths.txt"
    path.write_text(yaml.safe_dump(ADAPTIVE))
    lengths = [300] + [20 + 7 * i for i in range(12)]
    file.write_text("\n".join(map(str, lengths)) + "\n")
    assert main(["plan", str(path), "--lengths", str(file), "--json", "-o", "parallel.adaptive.max_tokens_per_device=80"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["devices"] == 4 and report["static"]["degree"] == 4
    placed = sorted(s for m in report["micro_batches"] for g in m["groups"] for s in g["sequences"])
    assert placed == list(range(len(lengths)))
    for micro in report["micro_batches"]:
        assert sum(g["degree"] for g in micro["groups"]) == 4
        for g in micro["groups"]:
            assert sum(lengths[s] for s in g["sequences"]) <= 80 * g["degree"]
    holder = next(g for m in report["micro_batches"] for g in m["groups"] if 0 in g["sequences"])
    assert holder["degree"] == 4
    assert report["estimated_s"] <= report["best_homogeneous"]["estimated_s"] <= report["static"]["estimated_s"]
    assert report["planning_ms"] > 0
    # too long for any group: refused with the length and the capacity
    file.write_text("400\n")
    assert main(["plan", str(path), "--lengths", str(file), "-o", "parallel.adaptive.max_tokens_per_device=80"]) == 2
    err = capsys.readouterr().err
    assert "400" in err and "320" in err
