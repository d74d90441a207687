"""Pipeline parallelism combined with tensor, sequence (Ulysses, ring) and data parallelism inside each stage, and
with tied embeddings, trains the same model as one process on the same global batch (16 rows of 32 tokens a
step), with each schedule: the same gradients at the first step, gathered from every stage by name, and the same
losses after it. A tied checkpoint written under pp=2 x tp=2 continues under dp_shard=2, and one written under
dp_shard=2 under pp=2 x tp=2.

One spawn of 4 ranks runs every 4-rank layout in turn (starting 4 processes costs more than a run here); the
dp_shard=2 halves of the checkpoint round trip run on 2 ranks before and after it. Layouts of pp with two more
parallelisms need 8 ranks: -m slow.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.distributed.spawn import once_more_after_a_crash, spawn
from tests.distributed.test_data_parallel import _train_then_crash
from tests.distributed.test_tensor_parallel import STEPS, _train, assert_same_training, series, train_run
from trainers.config import TrainerConfig
from trainers.export import read_checkpoint_model
from trainers.model import build_model

CHECKPOINT_AT = 3


def config(tied: bool, micro_batch_size: int = 8, dtype: str = "float32", **parallel) -> TrainerConfig:
    # 4 layers: 2 stages of 2 (gpipe, 1f1b) or 4 stages of 1, two per rank (interleaved); 2 micro-batches a step,
    # the pipeline's. seq_len 32: 16 tokens a rank under sp=2 or tp=2 between blocks. 4 heads, 2 kv heads: whole
    # heads for tp=2 and Ulysses' sp=2.
    return TrainerConfig.model_validate({
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64,
                  "tie_embeddings": tied},
        "data": {"source": "synthetic", "synthetic_docs": 400, "synthetic_mean_len": 24},
        "train": {"steps": STEPS, "micro_batch_size": micro_batch_size, "grad_accum": 2, "seq_len": 32,
                  "val_every": STEPS, "val_batches": 2, "seed": 3, "log_every": 1, "dtype": dtype},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "parallel": parallel,
        "checkpoint": {"every": CHECKPOINT_AT},
    })


# name: (tied, rows per micro-batch on each data-parallel rank, the parallel section and any dtype); on 4 ranks
LAYOUTS = {
    "pp2xtp2": (False, 8, {"pp": 2, "tp": 2, "dp_shard": 1, "pp_schedule": "1f1b"}),
    "pp2xsp2-ulysses": (False, 8, {"pp": 2, "sp": 2, "dp_shard": 1, "pp_schedule": "interleaved_1f1b"}),
    "pp2xsp2-ring": (False, 8, {"pp": 2, "sp": 2, "dp_shard": 1, "sp_mode": "ring", "pp_schedule": "gpipe"}),
    "pp2xdp_shard2-tied": (True, 4, {"pp": 2, "dp_shard": 2, "pp_schedule": "1f1b"}),
    # the last stage's copy of the embedding is TP's column-parallel output projection
    "pp2xtp2-tied-interleaved": (True, 8, {"pp": 2, "tp": 2, "dp_shard": 1, "pp_schedule": "interleaved_1f1b"}),
    "pp2xdp_replicate2": (False, 4, {"pp": 2, "dp_replicate": 2, "dp_shard": 1, "pp_schedule": "gpipe"}),
}
# bfloat16 (FSDP's mixed precision in each stage): against FSDP alone, dp_shard=4, in bfloat16 too
BF16 = {
    "pp2xtp2-bf16": (False, 8, {"pp": 2, "tp": 2, "dp_shard": 1, "dtype": "bfloat16"}),
    "dp_shard4-bf16": (False, 2, {"dp_shard": 4, "dtype": "bfloat16"}),
}
# three parallelisms besides pp: 8 ranks (-m slow)
EIGHT_RANKS = {
    "pp2xdp_shard2xtp2-tied-interleaved": (True, 4, {"pp": 2, "dp_shard": 2, "tp": 2,
                                                     "pp_schedule": "interleaved_1f1b"}),
    "pp2xdp_replicate2xsp2-ring-tied": (True, 4, {"pp": 2, "dp_replicate": 2, "dp_shard": 1, "sp": 2,
                                                  "sp_mode": "ring"}),
    "pp2xsp2xtp2-ulysses": (False, 8, {"pp": 2, "dp_shard": 1, "sp": 2, "tp": 2, "pp_schedule": "gpipe"}),
}
PP_TP = config(True, **LAYOUTS["pp2xtp2-tied-interleaved"][2])
DP_SHARD = config(True, 4, dp_shard=2)


def _in_turn(jobs: list[tuple]) -> None:
    """Each (function, *args) of `jobs` in turn, on this spawn's ranks."""
    for fn, *args in jobs:
        fn(*args)


def spawn_in_turn(world: int, tmp: Path, jobs, resume_from: Path | None = None) -> Path:
    """Run jobs(root) on `world` ranks in a fresh directory `root`, which starts with a copy of the checkpoint
    `resume_from` under root/resume, if given; returns root. Once more in another after a native crash."""
    def attempt(root: Path) -> Path:
        if resume_from is not None:
            shutil.copytree(resume_from, root / "resume" / resume_from.name)
        spawn(_in_turn, world, jobs(root), tmp=root)
        return root
    return once_more_after_a_crash(attempt, tmp)


def training_jobs(layouts: dict, root: Path) -> list[tuple]:
    """The jobs that train each layout, its metrics and first gradients in root/NAME.pt."""
    return [(_train, config(tied, micro, **parallel).model_dump_json(), str(root / name), str(root / f"{name}.pt"))
            for name, (tied, micro, parallel) in layouts.items()]


@pytest.fixture(scope="module")
def singles(tmp_path_factory) -> dict:
    """One process on the same global batch, untied (False) and tied (True)."""
    tmp = tmp_path_factory.mktemp("single")
    return {tied: train_run(config(tied), 1, tmp / f"tied-{tied}") for tied in (False, True)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, singles) -> dict:
    tmp = tmp_path_factory.mktemp("combined")
    saved = f"checkpoint_{CHECKPOINT_AT}"
    dp = spawn_in_turn(2, tmp / "dp-save", lambda root: [
        (_train_then_crash, DP_SHARD.model_dump_json(), str(root / "run"), CHECKPOINT_AT)])
    pp = spawn_in_turn(4, tmp / "pp", lambda root: [
        *training_jobs(LAYOUTS | BF16, root),
        (_train_then_crash, PP_TP.model_dump_json(), str(root / "run"), CHECKPOINT_AT),
        (_train, PP_TP.model_dump_json(), str(root / "resume"), str(root / "pp-resumed.pt")),
    ], resume_from=dp / "run" / saved)
    back = spawn_in_turn(2, tmp / "dp-load", lambda root: [
        (_train, DP_SHARD.model_dump_json(), str(root / "resume"), str(root / "dp-resumed.pt"))],
        resume_from=pp / "run" / saved)
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    return {"singles": singles, "pp_checkpoint": pp / "run" / saved, "dp-resumed": load(back / "dp-resumed.pt"),
            **{name: load(pp / f"{name}.pt") for name in [*LAYOUTS, *BF16, "pp-resumed"]}}


@pytest.mark.parametrize("name", LAYOUTS)
def test_pipeline_with_tp_sp_or_tied_embeddings_matches_single_process(runs, name):
    tied = LAYOUTS[name][0]
    result, single = runs[name], runs["singles"][tied]
    assert_same_training(result, single)
    assert series(result, "loss") == pytest.approx(series(single, "loss"), rel=1e-5)


def test_pipeline_in_bfloat16_trains_as_fsdp_does(runs):
    """Every stage runs in bfloat16 under FSDP's mixed precision, with no data-parallel ranks too, and the
    activations between stages are bfloat16 (a float32 receive buffer would take their bytes as float32: NaN
    losses). bfloat16's rounding in other orders leaves the losses 1.8e-3 apart at step 5."""
    pipeline, fsdp = (series(runs[name], "loss") for name in BF16)
    assert len(pipeline) == STEPS and pipeline == pytest.approx(fsdp, rel=5e-3)
    assert pipeline != pytest.approx(series(runs["singles"][False], "loss"), rel=1e-4)  # not float32 after all


@pytest.mark.slow  # 8 processes on 2 cores: 113 s at load ~15
def test_pipeline_with_two_more_parallelisms_matches_single_process(singles, tmp_path):
    root = spawn_in_turn(8, tmp_path, lambda root: training_jobs(EIGHT_RANKS, root))
    for name, (tied, _, _) in EIGHT_RANKS.items():
        result = torch.load(root / f"{name}.pt", weights_only=True)
        assert_same_training(result, singles[tied])
        assert series(result, "loss") == pytest.approx(series(singles[tied], "loss"), rel=1e-5), name


@pytest.mark.parametrize("resumed", ["dp-resumed", "pp-resumed"])
def test_tied_checkpoint_continues_between_pipeline_and_data_parallel_layouts(runs, resumed):
    """dp-resumed: written under pp=2 x tp=2 (interleaved) at step 3, continued under dp_shard=2; pp-resumed: the
    other way round. Both continue with the single process's losses, the tie intact."""
    result, single = runs[resumed], runs["singles"][True]
    assert [m["step"] for m in result["metrics"] if "loss" in m] == list(range(CHECKPOINT_AT + 1, STEPS + 1))
    assert series(result, "loss") == pytest.approx(series(single, "loss")[CHECKPOINT_AT:], rel=1e-5)
    assert series(result, "val_loss") == pytest.approx(series(single, "val_loss")[-1:], rel=1e-5)  # at the last step


def test_pipeline_checkpoint_holds_the_tied_weight_as_the_whole_model_does(runs):
    """Both stages hold a copy of the tied weight, named tok_embeddings.weight on both: the checkpoint has the tied
    whole model's names and no more (its output.weight the same tensor, as nn.Module.state_dict lists it), and one
    optimizer state for the weight, which export and every other layout read by name."""
    saved = dcp.FileSystemReader(str(runs["pp_checkpoint"])).read_metadata().state_dict_metadata
    whole = build_model(PP_TP.model, device="meta")
    assert {k.removeprefix("model.") for k in saved if k.startswith("model.")} == set(whole.state_dict())
    stepped = {k.removeprefix("optim.state.").rsplit(".", 1)[0] for k in saved if k.startswith("optim.state.")}
    assert stepped == {name for name, _ in whole.named_parameters()}
    assert "output.weight" not in stepped
    state, cfg, _ = read_checkpoint_model(runs["pp_checkpoint"])  # what flotilla export writes out
    assert cfg.tie_embeddings and state["output.weight"] is state["tok_embeddings.weight"]
