"""DeepSpeed's AutoTP (parallel.tp under parallel.engine=deepspeed) with ZeRO 1, 2 and 3 trains the same model as
one process on the same global batch: tp=2 on two ranks and tp=2 x dp=2 on four give the first step's gradients
and every step's loss, gradient norm and validation loss of one process. Its checkpoints resume within their
layout (and are refused under another parallel.tp), and export to the very weights the trainer held."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed.spawn import once_more_after_a_crash, spawn
from tests.distributed.test_data_parallel import small_config
from trainers.checkpoint import CheckpointError
from trainers.config import TrainerConfig
from trainers.engines.deepspeed import join_tp_slices
from trainers.export import read_checkpoint_model
from trainers.loop import Trainee, train
from trainers.reporter import LocalReporter
from trainers.run import build

STEPS = 5
TP = 2
LAYOUTS = {  # name: (ZeRO stage, dp, sp), on tp x dp x sp ranks
    "tp2-zero1": (1, 1, 1),
    "tp2-zero2": (2, 1, 1),
    "tp2-zero3": (3, 1, 1),
    "tp2xdp2-zero1": (1, 2, 1),
    "tp2xdp2-zero2": (2, 2, 1),
    "tp2xsp2-zero1": (1, 1, 2),  # Ulysses over each tp rank's 2 query heads (its 1 kv head copied for both)
}
SLOW = {"tp2xdp2-zero1", "tp2xdp2-zero2", "tp2xsp2-zero1"}  # four processes: about a minute more on two cores


def world(name: str) -> int:
    _, dp, sp = LAYOUTS[name]
    return TP * dp * sp


def config(stage: int | None = None, dp: int = 1, sp: int = 1) -> TrainerConfig:
    """A layout's config; one process (the fsdp engine) without a ZeRO stage."""
    # 16 rows per optimizer step in every layout: 1 rank x 8 rows x 2 micro-batches, or dp ranks x 8/dp rows x 2
    # (tp and sp ranks read the same rows). n_heads 4 and n_kv_heads 2 split over tp=2 into 2 query heads and 1
    # kv head a rank (GQA kept). The gradient norm grows from 0.49 to 0.88 over the 5 steps: a clip at 0.55
    # compares DeepSpeed's clipping of tp-sliced gradients (steps 3-5) with torch's. Checkpoints at steps 2, 4, 5.
    parallel = {} if stage is None else {"engine": "deepspeed", "zero_stage": stage, "tp": TP, "dp_shard": dp, "sp": sp}
    return small_config(8 // dp, 2, train={"steps": STEPS, "grad_clip": 0.55}, checkpoint={"every": 2},
                        parallel=parallel)


def keep_first_grads(t: Trainee, grads: dict[str, torch.Tensor]) -> None:
    """Fill `grads` with every parameter's gradient (this rank's tp slice, whole over dp) as the first optimizer
    step sees it. DeepSpeed reduces them in engine.step() and frees them in its optimizer's step: they are read
    between the two (safe_get_full_grad gathers ZeRO's partitions, a collective over dp)."""
    if t.cfg.parallel.engine != "deepspeed":
        def pre_hook(optimizer, args, kwargs) -> None:
            if not grads:
                grads.update({name: p.grad.detach().clone() for name, p in t.model.named_parameters()})
        t.optimizer.register_step_pre_hook(pre_hook)
        return
    from deepspeed.utils import safe_get_full_grad

    zero = t.engine.ds_engine.optimizer
    step = zero.step

    def read_then_step(*args, **kwargs):
        if not grads:
            grads.update({name: safe_get_full_grad(p).detach().clone() for name, p in t.model.module.named_parameters()})
        return step(*args, **kwargs)

    zero.step = read_then_step


def weights(t: Trainee) -> dict[str, torch.Tensor]:
    """This rank's weights as the trainer holds them: its tp slices, ZeRO-3's partitions gathered over dp."""
    if t.cfg.parallel.engine != "deepspeed":
        return {name: p.detach().clone() for name, p in t.model.state_dict().items()}
    import deepspeed

    module = t.model.module
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {name: p.detach().clone() for name, p in module.state_dict().items()}


def whole(mine: dict[str, torch.Tensor], tp: int) -> dict[str, torch.Tensor]:
    """Collective: the whole tensors of every rank's `mine`. tp is the innermost axis of our mesh and of DeepSpeed's,
    so ranks 0..tp-1 hold the tp slices of dp (and sp) rank 0, which every dp and sp rank holds alike."""
    if not dist.is_initialized():
        return mine
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return join_tp_slices(parts[:tp])


def _train_each(runs: list[tuple[str, str, str]]) -> None:
    """Train each (config, run directory, result file); rank 0 writes the metrics, the first step's gradients and
    the final weights, whole. A run whose checkpoint cannot be resumed records the refusal instead."""
    for cfg_json, root, out in runs:
        cfg = TrainerConfig.model_validate_json(cfg_json)
        trainee, grads, reporter = build(cfg), {}, LocalReporter(Path(root))
        keep_first_grads(trainee, grads)
        try:
            train(trainee, reporter)
        except CheckpointError as err:
            Path(out).write_text(str(err))
            continue
        result = {"metrics": reporter.metrics, "grads": whole(grads, cfg.parallel.tp),
                  "weights": whole(weights(trainee), cfg.parallel.tp)}
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(result, out)


def train_layouts(names: list[str], tmp: Path) -> dict[str, dict]:
    """The results of the layouts `names`, all of one world size, trained by one set of processes: starting
    processes that import torch and DeepSpeed costs more than these runs."""
    (ranks,) = {world(name) for name in names}

    def attempt(root: Path) -> dict[str, dict]:
        runs = [(config(*LAYOUTS[name]).model_dump_json(), str(root / f"run-{name}"), str(root / f"result-{name}.pt"))
                for name in names]
        spawn(_train_each, ranks, runs, tmp=root)
        return {name: torch.load(out, weights_only=True) for name, (_, _, out) in zip(names, runs)}
    return once_more_after_a_crash(attempt, tmp)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("single")
    _train_each([(config().model_dump_json(), str(root / "run"), str(root / "result.pt"))])
    return torch.load(root / "result.pt", weights_only=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """The two-rank layouts, and the run directories of all (DIR/run-LAYOUT, or its after-crash/ retry)."""
    root = tmp_path_factory.mktemp("tp2")
    results = train_layouts([name for name in LAYOUTS if world(name) == 2], root)
    return root, results


@pytest.fixture(scope="module")
def trained_four(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("four")
    return root, train_layouts(sorted(SLOW), root)


def run_dir(root: Path, name: str) -> Path:
    runs = [p for p in (root / f"run-{name}", root / "after-crash" / f"run-{name}") if p.exists()]
    return runs[-1]


def series(result: dict, key: str) -> list[float]:
    return [m[key] for m in result["metrics"] if key in m]


def result_of(request, name: str) -> tuple[Path, dict]:
    root, results = request.getfixturevalue("trained_four" if name in SLOW else "trained")
    return run_dir(root, name), results[name]


@pytest.mark.parametrize("layout", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                                    for name in LAYOUTS])
def test_autotp_matches_single_process(single, request, layout):
    run, result = result_of(request, layout)
    assert result["grads"].keys() == single["grads"].keys()
    for name, grad in single["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert len(series(single, "loss")) == STEPS
    assert series(result, "loss") == pytest.approx(series(single, "loss"), rel=1e-5)
    assert series(result, "grad_norm") == pytest.approx(series(single, "grad_norm"), rel=1e-5)
    assert series(result, "val_loss") == pytest.approx(series(single, "val_loss"), rel=1e-5)
    assert series(single, "loss")[-1] < series(single, "loss")[0]  # it learns: not two flat lines compared
    # The export joins the tp ranks' ZeRO checkpoints into exactly the weights the trainer held (what it writes of
    # them, whatever the layout: tests/distributed/test_export_layouts.py)
    exported, model_cfg, _ = read_checkpoint_model(run / f"checkpoint_{STEPS}")
    assert model_cfg == config(*LAYOUTS[layout]).model and exported.keys() == result["weights"].keys()
    for name, weight in result["weights"].items():
        assert weight.dtype == torch.float32 and torch.equal(exported[name], weight), name


def test_autotp_resumes_within_its_layout_only(trained, tmp_path):
    """Each two-rank run again from its step-4 checkpoint gives its step 5 exactly; a tp=1 ZeRO-2 run of the same
    world pointed at a tp=2 checkpoint refuses it (DeepSpeed would load tp slices into whole weights)."""
    root, results = trained
    names = [name for name in LAYOUTS if world(name) == 2]
    copies = {}
    for name in names:
        copies[name] = tmp_path / f"run-{name}"
        shutil.copytree(run_dir(root, name), copies[name])
        shutil.rmtree(copies[name] / "checkpoint_5")
    shutil.copytree(copies["tp2-zero2"], tmp_path / "run-tp1")
    tp1 = small_config(4, 2, train={"steps": STEPS}, parallel={"engine": "deepspeed", "zero_stage": 2, "dp_shard": 2})
    # the refusal first: DeepSpeed keeps its tp groups and AutoTP mode per process, set up by the first tp=2 engine
    runs = [(tp1.model_dump_json(), str(tmp_path / "run-tp1"), str(tmp_path / "refusal.txt"))]
    runs += [(config(*LAYOUTS[name]).model_dump_json(), str(copies[name]), str(tmp_path / f"resumed-{name}.pt"))
             for name in names]
    spawn(_train_each, 2, runs, tmp=tmp_path)
    refusal = (tmp_path / "refusal.txt").read_text()
    assert "was written with parallel.tp = 2" in refusal and "this run has parallel.tp = 1" in refusal
    for name in names:
        resumed = torch.load(tmp_path / f"resumed-{name}.pt", weights_only=True)
        assert [m["step"] for m in resumed["metrics"] if "loss" in m] == [STEPS], name
        for key in ("loss", "grad_norm", "val_loss"):
            assert series(resumed, key) == pytest.approx(series(results[name], key)[-1:], rel=1e-6), (name, key)
        for weight, tensor in results[name]["weights"].items():
            torch.testing.assert_close(resumed["weights"][weight], tensor, rtol=1e-6, atol=0,
                                       msg=lambda m: f"{name} {weight}: {m}")


@pytest.mark.parametrize("parallel, refused", [
    ({"zero_stage": 1, "tp": 2}, None),
    ({"zero_stage": 2, "tp": 2}, None),
    ({"zero_stage": 3, "tp": 2}, None),
    ({"zero_stage": 2, "tp": 2, "pp": 2}, ["parallel.pp = 2: not supported with parallel.engine=deepspeed",
                                           "own training loop (train_batch)", "use parallel.engine=fsdp"]),
    ({"zero_stage": 2, "tp": 3}, ["parallel.tp = 3: must divide model.n_heads = 4"]),
])
def test_config_takes_autotp_and_refuses_pipelines(parallel, refused):
    data = {"model": {"n_heads": 4, "n_kv_heads": 2, "dim": 32, "ffn_dim": 64}, "train": {"seq_len": 32, "grad_accum": 2},
            "parallel": {"engine": "deepspeed", **parallel}}
    if refused is None:
        assert TrainerConfig.model_validate(data).parallel.tp == parallel["tp"]
        return
    with pytest.raises(ValueError) as err:
        TrainerConfig.model_validate(data)
    for fragment in refused:
        assert fragment in str(err.value)
