"""The optimizer under the trainer (trainers/optim.py, trainers/engines/fsdp.py): FusedAdamW trains as torch's
AdamW does, folds train.grad_clip's clipping into its step in place of the engine's, and keeps bfloat16 moments
through a checkpoint and resume; what cannot run is refused naming the keys. One process on the CPU, FusedAdamW
through Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from kernels import FusedAdamW, force_implementation
from trainers.config import TrainerConfig
from trainers.engines import FSDPEngine
from trainers.reporter import LocalReporter
from trainers.run import build, run


def cfg(implementation: str = "auto", steps: int = 4, grad_clip: float = 1.0, **optim) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32},
        "data": {"source": "synthetic", "synthetic_docs": 200, "synthetic_mean_len": 20},
        "train": {"steps": steps, "micro_batch_size": 2, "seq_len": 16, "val_every": 0, "log_every": 1,
                  "grad_clip": grad_clip},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "implementation": implementation, "weight_decay": 0.1, **optim},
        "checkpoint": {"every": 2}})


def curve(config: TrainerConfig, root, key: str = "loss") -> list[float]:
    reporter = LocalReporter(root)
    run(config, reporter)
    return [m[key] for m in reporter.metrics if key in m]


def test_trainer_on_fused_adamw_trains_as_on_torch_adamw(tmp_path):
    """optim.implementation = triton puts FusedAdamW under the trainer: the same losses and gradient norms as
    torch's AdamW over a few steps, and its checkpoint resumes under torch's."""
    assert isinstance(build(cfg("triton")).optimizer, FusedAdamW)
    assert type(build(cfg("auto")).optimizer) is torch.optim.AdamW  # auto: CUDA parameters only
    curves = {}
    for impl in ("torch", "triton"):
        reporter = LocalReporter(tmp_path / impl)
        run(cfg(impl), reporter)
        curves[impl] = reporter.metrics
    for key in ("loss", "grad_norm"):
        ours, theirs = ([m[key] for m in curves[i] if key in m] for i in ("triton", "torch"))
        assert len(ours) == 4 and ours == pytest.approx(theirs, rel=1e-5)
    # the fused run's checkpoint at step 4 continues under torch's AdamW (same state keys)
    resumed = LocalReporter(tmp_path / "triton")
    run(cfg("torch", steps=6), resumed)
    assert [m["step"] for m in resumed.metrics if "loss" in m] == [5, 6]


def test_folded_clipping_trains_as_the_engines_clipping(tmp_path, monkeypatch):
    """With FusedAdamW the fsdp engine leaves train.grad_clip to the optimizer's step and reports the norm it
    measured; losses and norms match torch AdamW after the engine's own clip_grads_with_norm_. The clip is
    active at every step and changes the run (against grad_clip = 0): Adam's update ignores the gradient's
    scale but for eps, so eps is raised to about a gradient element's size (1e-2) for clipping to show."""
    clip, eps = 0.05, 1e-2
    engine_clips = []
    clip_grads = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_",
                        lambda *args, **kwargs: engine_clips.append(1) or clip_grads(*args, **kwargs))

    folded = build(cfg("triton", grad_clip=clip, eps=eps)).engine
    assert folded.optimizer_clips and folded.optimizer.max_grad_norm == clip
    assert not build(cfg("torch", grad_clip=clip)).engine.optimizer_clips
    assert not build(cfg("triton", grad_clip=0.0)).engine.optimizer_clips  # nothing to fold: no max_grad_norm

    runs = {}
    for impl in ("torch", "triton"):
        engine_clips.clear()
        reporter = LocalReporter(tmp_path / impl)
        run(cfg(impl, grad_clip=clip, eps=eps), reporter)
        runs[impl] = ([m["loss"] for m in reporter.metrics if "loss" in m],
                      [m["grad_norm"] for m in reporter.metrics if "grad_norm" in m], len(engine_clips))
    (ours, our_norms, our_clips), (theirs, their_norms, their_clips) = runs["triton"], runs["torch"]
    assert (our_clips, their_clips) == (0, 4)  # the engine clipped only torch AdamW's gradients
    assert len(ours) == 4 and ours == pytest.approx(theirs, rel=1e-5)
    assert our_norms == pytest.approx(their_norms, rel=1e-5)
    assert min(their_norms) > 5 * clip
    unclipped = curve(cfg("torch", grad_clip=0.0, eps=eps), tmp_path / "unclipped")
    assert abs(unclipped[-1] - theirs[-1]) > 1e-3  # 2.5e-3 measured: 25x what the match above allows


def test_engine_refuses_an_optimizer_that_clips_elsewhere():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"clips at max_grad_norm=0.5 inside its step; build it with max_grad_norm"):
        FSDPEngine(model, FusedAdamW(model.parameters(), max_grad_norm=0.5), grad_clip=1.0)
    with pytest.raises(ValueError, match="pp group"):
        FSDPEngine(model, FusedAdamW(model.parameters(), max_grad_norm=1.0), grad_clip=1.0, pp_group=object())


def test_bf16_moments_train_checkpoint_and_resume(tmp_path):
    """optim.moments_dtype = bfloat16 selects FusedAdamW (auto) with bf16 exp_avg and exp_avg_sq; it learns as
    float32 moments do; a run resumed from its step-6 checkpoint continues exactly as the uninterrupted one
    (stochastic rounding is seeded by the step, kept in the state) and its moments are bf16 again after the
    load. FusedAdamW's PyTorch code steps here: the interpreter's 10 steps would take a minute, and
    tests/unit/kernels/test_fused_adamw.py resumes its Triton kernel's bf16 moments bit for bit."""
    bf16 = dict(moments_dtype="bfloat16", schedule="constant")  # the same lr at step 3 of 6 as of 10
    with force_implementation("torch"):
        trainee = build(cfg(**bf16))
        assert isinstance(trainee.optimizer, FusedAdamW) and trainee.optimizer.moments_dtype == torch.bfloat16
        uninterrupted = curve(cfg(steps=10, **bf16), tmp_path / "whole")
        assert uninterrupted[-1] < uninterrupted[0] - 0.1  # 4.16 -> 3.71
        float32 = curve(cfg(steps=10, schedule="constant"), tmp_path / "float32")
        assert uninterrupted == pytest.approx(float32, rel=1e-3)  # 5e-5 apart, measured

        assert curve(cfg(steps=6, **bf16), tmp_path / "resumed") == uninterrupted[:6]
        reporter = LocalReporter(tmp_path / "resumed")
        run(cfg(steps=10, **bf16), reporter)
        assert [m["step"] for m in reporter.metrics if "loss" in m] == [7, 8, 9, 10]
        assert [m["loss"] for m in reporter.metrics if "loss" in m] == uninterrupted[6:]

        restored = build(cfg(**bf16))
        assert restored.engine.load(tmp_path / "resumed" / "checkpoint_6").step == 6
    states = list(restored.optimizer.state.values())
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    assert all(s["step"].item() == 6 for s in states)


@pytest.mark.parametrize("sections, must_mention", [
    ({"optim": {"moments_dtype": "bfloat16"}, "parallel": {"engine": "deepspeed", "zero_stage": 2}},
     ["optim.moments_dtype = bfloat16 with parallel.engine = deepspeed", "set optim.moments_dtype = float32"]),
    ({"optim": {"moments_dtype": "bfloat16", "implementation": "torch"}},
     ["optim.moments_dtype = bfloat16 with optim.implementation = torch", "auto or triton"]),
    ({"optim": {"moments_dtype": "float16"}}, ["moments_dtype", "'float32' or 'bfloat16'"]),
])
def test_moments_dtype_that_cannot_run_is_refused(sections, must_mention):
    with pytest.raises(ValidationError) as err:
        TrainerConfig.model_validate(sections)
    for words in must_mention:
        assert words in str(err.value)
