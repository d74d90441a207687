"""Adaptive SP over two SP domains (parallel.dp_replicate = 2 x parallel.sp = 2, 4 gloo ranks; FSDP2 as HSDP:
replicated over the domains, sharded within each) trains the same model as one process on the same documents.
Each step's documents are split between the domains by the cost model (trainers/parallel/adaptive/domains.py),
and in some steps (the first, whose gradients are compared, among them) the domains run different numbers of
micro-batches: their gradients meet in one all-reduce after each domain's last. The same first-step gradients,
losses, gradient norms and validation loss; a run stopped after a checkpoint resumes to the same losses; a
rank that splits a step otherwise stops the job at that step."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.distributed.spawn import spawn
from tests.distributed.test_adaptive_sp import COST, _train_with_another_cost_model_on
from tests.distributed.test_data_parallel import _train_then_crash, losses, train_curve
from tests.distributed.test_tensor_parallel import STEPS, assert_same_training, series, train_run
from trainers.config import TrainerConfig
from trainers.data import build_splits
from trainers.documents import DocumentBatches, DocumentSequences
from trainers.parallel.adaptive.cost import CostModel, load_cost_model
from trainers.parallel.adaptive.executor import plan_step

TOKEN_CAP = 48
"""Tokens a device holds per micro-batch: a degree-1 group holds 48, a degree-2 group (a whole domain) 96."""


def config(dp_replicate: int, sp: int, token_cap: int | None, **train) -> TrainerConfig:
    """Steps of ~500 tokens, documents cut at 96: ~250 tokens a domain, in 2-5 micro-batches of 2 x 48."""
    return TrainerConfig.model_validate({
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256},
        "data": {"source": "synthetic", "synthetic_docs": 300, "synthetic_mean_len": 40, "batching": "documents"},
        "train": {"steps": STEPS, "tokens_per_step": 500, "max_doc_len": 96, "seq_len": 32, "val_every": STEPS,
                  "val_batches": 2, "seed": 3, "log_every": 1, **train},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "parallel": {"dp_replicate": dp_replicate, "sp": sp, "dp_shard": 1, "sp_mode": "adaptive",
                     "adaptive": {"cost_model": str(COST), "max_tokens_per_device": token_cap}},
    })


def domain_micro_batches(cfg: TrainerConfig) -> list[list[int]]:
    """Each step's micro-batches in each domain, as every rank plans them."""
    train_rows, _, _ = build_splits(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    sequences = DocumentSequences.from_rows(train_rows, cfg.train.max_doc_len)
    batches = DocumentBatches(sequences.lengths, cfg.train.tokens_per_step, cfg.train.seed)
    cost = load_cost_model(cfg.parallel.adaptive.cost_model).with_token_cap(cfg.parallel.adaptive.max_tokens_per_device)
    counts = []
    for step in range(cfg.train.steps):
        ids = batches.sequences(step)
        planned = plan_step(ids, sequences.lengths[ids].tolist(), cfg.parallel.sp, cost, cfg.parallel.sp,
                            cfg.parallel.dp_replicate)
        counts.append([len(plan.micro_batches) for plan in planned.plan.plans])
    return counts


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train_run(config(1, 1, None), 1, tmp_path_factory.mktemp("single"))


def test_two_sp_domains_match_single_process(single, tmp_path):
    cfg = config(2, 2, TOKEN_CAP)
    result = train_run(cfg, 4, tmp_path)
    assert_same_training(result, single)
    counts = domain_micro_batches(cfg)
    # the domains ran different numbers of micro-batches in the first step (4 and 3) and others: the all-reduce
    # between them waited for each one's last, and the gradients above still match
    assert counts[0][0] != counts[0][1] and sum(a != b for a, b in counts) >= 2, counts
    steps = [m for m in result["metrics"] if "loss" in m]
    assert [m["sp/micro_batches"] for m in steps] == [max(c) for c in counts]  # the step lasts its longest domain's
    assert all(m["sp/domain_imbalance"] >= 1 and m["sp/estimated_s"] > 0 for m in steps)
    assert sum(m["sp/groups_degree_2"] for m in steps) > 0 and sum(m["sp/groups_degree_1"] for m in steps) > 0
    assert series(result, "sp/max_degree") == [2.0]  # groups within a domain: never all 4 ranks
    assert series(single, "sp/domain_imbalance") == [1.0] * STEPS  # one process is one domain


@pytest.mark.slow  # ~28 s; the digest's coverage of the split is unit-tested in tests/unit/test_sp_domains.py
def test_a_rank_that_splits_a_step_otherwise_stops_every_rank(tmp_path):
    # rank 3 (the second domain) believes its devices hold 40 tokens, not 48: it splits and plans step 1 otherwise,
    # so the first domain's ranks stop too, though their own share's plan might have matched
    other = tmp_path / "other_cost.json"
    other.write_text(replace(CostModel.from_json(COST.read_text()), memory_cap_bytes=120_000 + 40 * 50_000).to_json())
    spawn(_train_with_another_cost_model_on, 4, 3, config(2, 2, TOKEN_CAP, val_every=0).model_dump_json(), str(other),
          str(tmp_path / "ckpt"), str(tmp_path), tmp=tmp_path)
    raised = [(tmp_path / f"rank{r}.raised").read_text() for r in range(4)]
    expected = "PlanMismatchError: step 1: the adaptive SP plan differs between ranks: ranks 0-2 have digest "
    assert all(r.startswith(expected) and "; rank 3 has digest " in r for r in raised), raised


@pytest.mark.slow  # ~60 s on 2 cores: three 4-rank runs
def test_two_sp_domains_resume_from_a_checkpoint_to_the_same_losses(tmp_path):
    cfg = config(2, 2, TOKEN_CAP, steps=6)
    cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"every": 3})})
    uninterrupted = train_curve(cfg, 4, tmp_path / "a")
    root = tmp_path / "b"
    spawn(_train_then_crash, 4, cfg.model_dump_json(), str(root / "ckpt"), 5, tmp=root)  # steps 4-5 are lost
    resumed = train_curve(cfg, 4, root)
    assert [m["step"] for m in resumed if "loss" in m] == [4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(uninterrupted)[3:], rel=1e-6)
