"""Adaptive SP holds the model states its cost model plans: 2 gloo ranks run steps of several micro-batches, and
after every micro-batch's backward pass and every optimizer step each rank's tensors are walked and weighed
against the cost model's ZeRO-3 term, model_state_bytes(2) = 16 B x parameters / 2. A last step run the old
way, gradient sync off for all but its last micro-batch, must fail the same check: each rank then holds the
whole model's unsharded float32 gradients on top (FSDP2 keeps them between micro-batches)."""

from __future__ import annotations

import gc
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed.spawn import once_more_after_a_crash, spawn
from tests.distributed.test_adaptive_sp import COST, config
from trainers.config import TrainerConfig
from trainers.loop import adaptive_train_step
from trainers.parallel.adaptive.cost import load_cost_model
from trainers.run import build

WORLD = 2
TOLERANCE = 0.10
STEPS = [("per micro-batch", 0), ("per micro-batch", 1), ("deferred", 2)]
"""Step 0 creates AdamW's moments (lazily, in its first update); step 1 is the first to hold every model state;
step 2 accumulates as trainers.loop did before adaptive SP reduced after every micro-batch."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _storages(tensors) -> dict[int, int]:
    """Bytes of each distinct CPU storage under `tensors` (a DTensor by its local shard; views counted once;
    meta tensors, left from building the model, hold nothing)."""
    out = {}
    for t in map(_local, tensors):
        if t.device.type == "cpu":
            storage = t.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def _held() -> dict[int, int]:
    """Every storage this process reaches from Python: each live tensor and its gradient. A gradient that
    autograd wrote and no one read has no Python object of its own, so gradients are read through their
    parameters, FSDP's unsharded ones included (nn.Parameters it keeps between micro-batches)."""
    tensors = []
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):  # isinstance asks deprecated proxies (reduce_op) for __class__
            tensors.append(obj)
            if obj.is_leaf and obj.grad is not None:
                tensors.append(obj.grad)
    return {ptr: size for ptr, size in _storages(tensors).items() if size}


def _weigh(trainee, outside: dict[int, int]) -> dict[str, int]:
    """This rank's model states now, by kind; `other` is whatever else it holds beyond `outside` (what it held
    besides the parameters before training: buffers, the mesh's tensors)."""
    params = _storages(trainee.model.parameters())
    grads = _storages(p.grad for p in trainee.model.parameters() if p.grad is not None)
    state = _storages(v for s in trainee.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    known = params | grads | state | outside
    other = sum(size for ptr, size in _held().items() if ptr not in known)
    return {"params": sum(params.values()), "grads": sum(grads.values()), "optimizer": sum(state.values()),
            "other": other}


def _measure(cfg_json: str, out: str) -> None:
    """Run STEPS through trainers.loop.adaptive_train_step, weighing this rank after each micro-batch's backward
    pass and each optimizer step; rank 0 writes every rank's records and the model's parameter count."""
    trainee = build(TrainerConfig.model_validate_json(cfg_json))
    params = _storages(trainee.model.parameters())
    outside = {ptr: size for ptr, size in _held().items() if ptr not in params}
    records, now = [], {"mode": "", "step": 0, "micro": 0, "micro_batches": 0}

    plan_step, backward, step = trainee.adaptive.step, trainee.engine.backward, trainee.engine.step

    def planned(i: int):
        work = plan_step(i)
        now.update(micro=0, micro_batches=len(work.micro_batches))
        return work

    def weighed_backward(loss: torch.Tensor) -> None:
        if now["mode"] == "deferred":  # the old loop: reduce only in the last micro-batch's backward
            trainee.model.set_requires_gradient_sync(now["micro"] == now["micro_batches"] - 1)
        backward(loss)
        records.append({**now, "after": "backward", **_weigh(trainee, outside)})
        now["micro"] += 1

    def weighed_step() -> float:
        norm = step()
        records.append({**now, "after": "optimizer step", **_weigh(trainee, outside)})
        return norm

    trainee.adaptive.step, trainee.engine.backward, trainee.engine.step = planned, weighed_backward, weighed_step
    for mode, i in STEPS:
        now["mode"], now["step"] = mode, i
        adaptive_train_step(trainee, i)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    if dist.get_rank() == 0:
        count = sum(p.numel() for p in trainee.model.parameters())  # DTensors count their whole tensor
        Path(out).write_text(json.dumps({"param_count": count, "ranks": everyone}))


def _run(tmp: Path) -> dict:
    def attempt(root: Path) -> dict:
        out = root / "memory.json"
        spawn(_measure, WORLD, config(WORLD, token_cap=48).model_dump_json(), str(out), tmp=root)
        return json.loads(out.read_text())
    return once_more_after_a_crash(attempt, tmp)


def held(record: dict) -> int:
    return record["params"] + record["grads"] + record["optimizer"] + record["other"]


def test_adaptive_sp_holds_the_model_states_its_cost_model_plans(tmp_path):
    result = _run(tmp_path)
    count = result["param_count"]
    planned = replace(load_cost_model(str(COST)), param_count=count).model_state_bytes(WORLD)
    assert planned == 16 * count / WORLD
    for rank, records in enumerate(result["ranks"]):
        full = [r for r in records if r["step"] == 1]
        assert sum(r["after"] == "backward" for r in full) >= 2, "a step of one micro-batch accumulates nothing"
        for r in full:
            where = f"rank {rank}, step 1, micro-batch {r['micro']} of {r['micro_batches']}, after {r['after']}: {r}"
            if r["after"] == "backward":
                # float32 weights, gradients (their shards, accumulating) and AdamW's two moments, each 1/2
                assert held(r) == pytest.approx(planned, rel=TOLERANCE), where
                assert r["grads"] == pytest.approx(4 * count / WORLD, rel=TOLERANCE), where
            else:  # the update freed the gradients
                assert r["grads"] == 0 and held(r) <= planned, where
        # the old way holds every unit's float32 gradients unsharded from the first micro-batch to the last
        # one's backward (other: 4 B x parameters, and the step's input tokens), in place of the plan's
        # sharded 4 / 2: the check above fails on it
        first = next(r for r in records if r["mode"] == "deferred")
        assert first["after"] == "backward" and first["grads"] == 0 and first["other"] >= 4 * count, first
        assert held(first) > (1 + TOLERANCE) * planned, first
