"""Adaptive SP trains the same model as one process on the same documents: 4 gloo ranks, one SP domain of 4,
whose steps split into groups of mixed degrees (a document only a degree-4 group can hold, many short ones in
degree-1 and -2 groups; and micro-batches that are themselves mixed, a degree-2 group beside two of degree 1);
the same first-step gradients, losses, gradient norms and validation loss, and a run stopped after a checkpoint
resumes to the same losses. Ranks that plan differently stop with a message instead of hanging; ranks spread
unevenly over nodes get no group that straddles one."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.distributed.spawn import spawn
from tests.distributed.test_data_parallel import _train_then_crash, losses, train_curve
from tests.distributed.test_tensor_parallel import STEPS, assert_same_training, series, train_run
from trainers.config import TrainerConfig
from trainers.loop import train
from trainers.parallel.adaptive.cost import CostModel
from trainers.reporter import LocalReporter
from trainers.run import build, run

TOKEN_CAP = 48
"""Tokens a device holds per micro-batch: degree 1 holds 48, degree 2 96, degree 4 192."""


COST = Path(__file__).with_name("adaptive_sp_cost.json")
"""A small model's cost model (flexsp-7b's 7B model states would not fit one device)."""


def config(sp: int, token_cap: int | None, **train) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256},
        "data": {"source": "synthetic", "synthetic_docs": 300, "synthetic_mean_len": 40, "batching": "documents"},
        "train": {"steps": STEPS, "tokens_per_step": 400, "max_doc_len": 160, "seq_len": 32, "val_every": STEPS,
                  "val_batches": 2, "seed": 3, "log_every": 1, **train},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "parallel": {"sp": sp, "dp_shard": 1, "sp_mode": "adaptive", "adaptive": {"cost_model": str(COST), "max_tokens_per_device": token_cap}},
    })


def mixed_config(sp: int, token_cap: int | None, **train) -> TrainerConfig:
    """Steps of ~150 tokens in one micro-batch of 4 x 48, documents cut at 96: a step with one document of
    49-96 tokens runs it on a degree-2 group and the short ones on two degree-1 groups (3 of the 5 steps, the
    first among them, with this seed and cost model)."""
    return config(sp, token_cap, tokens_per_step=150, max_doc_len=96, **train)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train_run(config(1, None), 1, tmp_path_factory.mktemp("single"))


def test_adaptive_sp_matches_single_process(single, tmp_path):
    result = train_run(config(4, TOKEN_CAP), 4, tmp_path)
    assert_same_training(result, single)
    steps = [m for m in result["metrics"] if "loss" in m]
    # the plans really mixed degrees: degree-4 groups (the long documents) and degree-1 groups, several
    # micro-batches a step (~400 tokens over 4 x 48)
    assert len({d for m in steps for d in (1, 2, 4) if m[f"sp/groups_degree_{d}"]}) >= 2
    assert all(m["sp/micro_batches"] >= 2 for m in steps) and max(m["sp/micro_batches"] for m in steps) >= 3
    assert all(m["sp/estimated_s"] > 0 and m["sp/planning_ms"] >= 0 for m in steps)
    # some micro-batch left a group idle (fewer sequences than groups): its ranks ran on padding, and the
    # losses and gradients above still match
    assert sum(m["sp/idle_groups"] for m in steps) > 0
    assert series(single, "sp/micro_batches") != series(result, "sp/micro_batches")  # one device plans otherwise
    # one node (no NODE_RANK), 4 query heads: groups up to the whole domain, reported with the first step
    assert series(result, "sp/max_degree") == [4.0]
    assert [series(result, f"sp/node_of_rank/{r}") for r in range(4)] == [[0.0]] * 4


def test_micro_batches_of_mixed_degrees_match_single_process(tmp_path):
    single = train_run(mixed_config(1, None), 1, tmp_path / "single")
    result = train_run(mixed_config(4, TOKEN_CAP), 4, tmp_path / "sp")
    steps = [m for m in result["metrics"] if "loss" in m]
    mixed = [m["sp/mixed_micro_batches"] for m in steps]
    # the first step (whose gradients are compared) and most of the others ran a micro-batch whose groups
    # have two degrees
    assert mixed[0] >= 1 and sum(n > 0 for n in mixed) >= 3, mixed
    assert_same_training(result, single)
    # the ranks' plan comparison, one all-gather of 8 bytes a rank, is small next to a step (measured on 2
    # shared cores: 8-10 ms, the wait for the slowest rank included, of 1.2-1.7 s steps)
    check_ms = statistics.median(series(result, "sp/plan_check_ms"))
    step_ms = 1e3 * statistics.median(series(result, "step_time_s"))
    assert check_ms < 0.05 * step_ms, (check_ms, step_ms)


def _train_with_another_cost_model_on(rank: int, cfg_json: str, other_cost: str, root: str, out_dir: str) -> None:
    """Train, rank `rank` with the cost model `other_cost` (another node's file); write what each rank raised."""
    cfg = TrainerConfig.model_validate_json(cfg_json)
    if dist.get_rank() == rank:
        adaptive = cfg.parallel.adaptive.model_copy(update={"cost_model": other_cost})
        cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"adaptive": adaptive})})
    try:
        run(cfg, LocalReporter(Path(root)))
        raised = ""
    except Exception as err:
        raised = f"{type(err).__name__}: {err}"
    Path(out_dir, f"rank{dist.get_rank()}.raised").write_text(raised)


@pytest.mark.timeout(240)  # a rank waiting in a collective its peers never join would hang: fail instead
@pytest.mark.parametrize("tokens, rank2", [
    # another device's profile: its memory holds 40 tokens per device, not 48, so it plans step 1 otherwise
    (40, "rank 2 has digest "),
    # ... or 12 tokens: no group of 4 holds step 1's document of 51 tokens, so its planner raises
    (12, "rank 2 could not plan it (its own error says why)"),
], ids=["planned-otherwise", "planner-raised"])
def test_ranks_that_plan_differently_stop_naming_the_step_and_the_ranks(tmp_path, tokens, rank2):
    # memory = model states (30,000 params x 16 B / 4 devices) + tokens x 50,000 B of activations
    other = tmp_path / "other_cost.json"
    other.write_text(replace(CostModel.from_json(COST.read_text()), memory_cap_bytes=120_000 + tokens * 50_000).to_json())
    cfg = mixed_config(4, TOKEN_CAP, val_every=0)
    spawn(_train_with_another_cost_model_on, 4, 2, cfg.model_dump_json(), str(other), str(tmp_path / "ckpt"),
          str(tmp_path), tmp=tmp_path)
    raised = [(tmp_path / f"rank{r}.raised").read_text() for r in range(4)]
    # every rank stops at step 1, before any micro-batch, with the same message; the planner's own error on
    # the rank whose planner raised
    expected = "PlanMismatchError: step 1: the adaptive SP plan differs between ranks: ranks 0,1,3 have digest "
    assert all(raised[r].startswith(expected) for r in (0, 1, 3)), raised
    assert len({raised[r] for r in (0, 1, 3)}) == 1
    assert f"; {rank2}" in raised[0] and "parallel.adaptive.cost_model" in raised[0]
    if tokens == 12:
        assert raised[2].startswith("InfeasibleError: sequence 3 has 51 tokens: more than the largest group"), raised[2]
    else:
        assert raised[2] == raised[0]


def _train_on_nodes(nodes: list[int], cfg_json: str, root: str, out: str) -> None:
    """Train with rank r on node nodes[r] (NODE_RANK, as Ray Train and torchrun set it); rank 0 writes the metrics
    and the SP process groups that were created."""
    os.environ["NODE_RANK"] = str(nodes[dist.get_rank()])
    trainee = build(TrainerConfig.model_validate_json(cfg_json))
    reporter = LocalReporter(Path(root))
    train(trainee, reporter)
    if dist.get_rank() == 0:
        groups = sorted(trainee.adaptive.router.groups)
        Path(out).write_text(json.dumps({"metrics": reporter.metrics, "groups": groups}))


@pytest.mark.parametrize("nodes, max_degree, groups", [
    # two whole nodes: a group of 4 is both of them, run over the network as the cost model plans it
    ([0, 0, 1, 1], 4, [[0, 1], [0, 1, 2, 3], [2, 3]]),
    # ranks 2-3 would straddle nodes: every degree above 1 is left out (the planner fills a micro-batch with
    # smaller groups, so it needs every degree up to its largest), and no process group is created
    ([0, 0, 0, 1], 1, []),
], ids=["2+2", "3+1"])
def test_sp_groups_follow_where_the_ranks_are(tmp_path, nodes, max_degree, groups):
    cfg = config(4, None, steps=2, val_every=0)  # no token cap: one device holds any document
    out = tmp_path / "result.json"
    spawn(_train_on_nodes, 4, nodes, cfg.model_dump_json(), str(tmp_path / "ckpt"), str(out), tmp=tmp_path)
    result = json.loads(out.read_text())
    assert result["groups"] == groups
    assert series(result, "sp/max_degree") == [max_degree]
    assert [series(result, f"sp/node_of_rank/{r}") for r in range(4)] == [[n] for n in nodes]
    steps = [m for m in result["metrics"] if "loss" in m]
    assert len(steps) == 2
    assert all(m[f"sp/groups_degree_{d}"] == 0 for m in steps for d in (2, 4) if d > max_degree)


def test_a_placement_whose_groups_cannot_hold_the_longest_document_is_refused_at_start_up(tmp_path):
    # 3 + 1 ranks per node caps groups at degree 1 (48 tokens with the cap), below train.max_doc_len = 160, which the
    # config check (heads only: degree 4, 192 tokens) let through
    cfg = config(4, TOKEN_CAP, steps=2, val_every=0)
    with pytest.raises(Exception, match=r"train.max_doc_len = 160: more than the largest SP group this placement "
                                        r"allows \(degree 1 on node 0: ranks 0-2, node 1: ranks 3\) can hold, 48 tokens"):
        spawn(_train_on_nodes, 4, [0, 0, 0, 1], cfg.model_dump_json(), str(tmp_path / "ckpt"), str(tmp_path / "out"),
              tmp=tmp_path)


@pytest.mark.slow  # ~65 s on 2 cores; resume through the executor (the plan of the next step survives a crash)
def test_adaptive_sp_resumes_from_a_checkpoint_to_the_same_losses(tmp_path):
    cfg = config(4, TOKEN_CAP, steps=6)
    cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"every": 3})})
    uninterrupted = train_curve(cfg, 4, tmp_path / "a")
    root = tmp_path / "b"
    spawn(_train_then_crash, 4, cfg.model_dump_json(), str(root / "ckpt"), 5, tmp=root)  # steps 4-5 are lost
    resumed = train_curve(cfg, 4, root)
    assert [m["step"] for m in resumed if "loss" in m] == [4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(uninterrupted)[3:], rel=1e-6)
