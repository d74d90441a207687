"""Checkpoints written on 2 ranks export to HuggingFace like one process's: under tensor parallelism (DTensor
slices), pipeline stages (each stage's own parameters), DeepSpeed ZeRO-3, and ZeRO-1 under bf16 (whose float32
masters, in the optimizer partitions, round to the module's bf16 weights), the export holds exactly the weights the
trainer held at its last step, and transformers loads it with none missing or unexpected and computes our model's
logits. One process, the tokenizers, sampling and the refusals: tests/unit/test_export.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tests.distributed.spawn import once_more_after_a_crash, spawn
from tests.unit.test_export import assert_export_matches, trainer_config
from trainers.config import TrainerConfig
from trainers.export import read_checkpoint_model
from trainers.loop import Trainee, train
from trainers.reporter import LocalReporter
from trainers.run import build

LAYOUTS = {  # name: (parallel, model, dtype): tied and untied embeddings; GQA throughout (4 query heads, 2 kv heads)
    "tp2": ({"tp": 2, "dp_shard": 1}, {"tie_embeddings": True}, "float32"),  # each rank 2 query heads, 1 kv head
    "pp2": ({"pp": 2, "dp_shard": 1}, {"tie_embeddings": True}, "float32"),  # one block a stage, a tied copy on each
    "zero3": ({"engine": "deepspeed", "zero_stage": 3}, {"tie_embeddings": True}, "float32"),
    # bf16: DeepSpeed's module holds bf16 weights, its optimizer partitions the float32 masters the export reads
    "zero1-bf16": ({"engine": "deepspeed", "zero_stage": 1}, {"tie_embeddings": False}, "bfloat16"),
}


def config(parallel: dict, model: dict, dtype: str) -> TrainerConfig:
    # 2 steps of 2 micro-batches (the pipeline's two, one a stage in flight each); one checkpoint, at the end
    cfg = trainer_config(**model).model_dump()
    cfg["parallel"] = parallel
    cfg["train"] |= {"grad_accum": 2, "dtype": dtype}
    cfg["checkpoint"]["every"] = 0
    return TrainerConfig.model_validate(cfg)


def full_state(t: Trainee) -> dict[str, torch.Tensor]:
    """Collective: the whole model as the trainer holds it, under our names, from every rank's shards."""
    if t.cfg.parallel.engine == "deepspeed":
        import deepspeed

        module = t.model.module  # ZeRO-3 keeps a partition of each parameter: gathered for the copy
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            mine = {name: p.detach().clone() for name, p in module.state_dict().items()}
    else:  # DTensors gathered; a pipeline stage's own parameters
        mine = {name: p.detach().clone() for name, p in
                get_model_state_dict(t.model, options=StateDictOptions(full_state_dict=True)).items()}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {name: tensor for part in parts for name, tensor in part.items()}


def _train_each(runs: list[tuple[str, str, str]]) -> None:
    for cfg_json, root, reference in runs:
        trainee = build(TrainerConfig.model_validate_json(cfg_json))
        train(trainee, LocalReporter(Path(root)))
        state = full_state(trainee)
        if dist.get_rank() == 0:
            torch.save(state, reference)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Each layout's run directory (DIR/run-LAYOUT) and its final weights (DIR/reference-LAYOUT.pt), all trained by
    one pair of processes: starting two that import torch and DeepSpeed costs more than these runs."""
    def attempt(root: Path) -> Path:
        runs = [(config(*layout).model_dump_json(), str(root / f"run-{name}"), str(root / f"reference-{name}.pt"))
                for name, layout in LAYOUTS.items()]
        spawn(_train_each, 2, runs, tmp=root)
        return root
    return once_more_after_a_crash(attempt, tmp_path_factory.mktemp("layouts"))


@pytest.mark.slow  # ~30 s; tests/distributed/test_init_from.py exports tp2, pp2 and ZeRO-3 checkpoints in the default suite
@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_holds_the_trainers_weights_and_logits(trained, tmp_path, layout):
    run = trained / f"run-{layout}"
    assert [p.name for p in run.glob("checkpoint_*")] == ["checkpoint_2"]
    reference = torch.load(trained / f"reference-{layout}.pt", weights_only=True)
    cfg = config(*LAYOUTS[layout])
    if cfg.train.dtype == "bfloat16" and cfg.parallel.engine == "deepspeed":
        masters = read_checkpoint_model(run / "checkpoint_2")[0]
        for name, weight in reference.items():
            assert weight.dtype == torch.bfloat16 and torch.equal(masters[name].bfloat16(), weight), name
        assert any(not torch.equal(masters[name], weight.float()) for name, weight in reference.items())
        reference = masters
    assert_export_matches(run, tmp_path / "hf", reference, cfg.model)
