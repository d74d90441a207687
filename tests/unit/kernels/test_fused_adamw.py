"""FusedAdamW against torch.optim.AdamW (and a float64 AdamW for what "exact" means): several steps, param
groups with their own lr and weight decay under a changing lr, clipping folded in vs clip_grad_norm_,
state_dict round trips (also to and from torch's AdamW), bf16 moments, the fallback, FSDP2 and DeepSpeed's ZeRO-2
on 2 ranks. Under the trainer: tests/unit/test_optim.py."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from kernels import FusedAdamW, force_implementation, implementation
from tests.distributed.spawn import spawn
from tests.unit.kernels.checks import KERNEL_DEVICE

SHAPES = [(300,), (17, 5), (1000,), (1,), (3, 100)]  # 1000 and 3x100: several kernel chunks and a ragged tail


def _params(dtype=torch.float32):
    return [torch.randn(s, dtype=torch.float64).to(dtype) for s in SHAPES]


def _groups(params, wd):
    # two groups with their own lr and weight decay, as trainers.optim builds them
    return [{"params": params[:3], "weight_decay": wd, "lr": 1e-2}, {"params": params[3:], "weight_decay": 0.0,
                                                                     "lr": 3e-3}]


def _run(make_opt, params, grads, clip=None):
    """Step an optimizer over `grads` (a list per step) with an lr schedule; returns the params after each step."""
    leaves = [p.clone().requires_grad_() for p in params]
    opt = make_opt(leaves)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    history = []
    for step_grads in grads:
        for p, g in zip(leaves, step_grads):
            p.grad = g.to(p.dtype, copy=True)  # clip_grad_norm_ scales in place
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(leaves, clip)
        opt.step()
        sched.step()
        history.append([p.detach().clone() for p in leaves])
    return history, opt


def _grads(steps, scale=1.0):
    return [[torch.randn(s, dtype=torch.float64) * scale for s in SHAPES] for _ in range(steps)]


def _assert_tracks(name, got_history, torch_history, exact_history):
    """At every step, FusedAdamW's error against the float64 AdamW is at most twice torch AdamW's (same
    dtype) plus a float32 rounding of the parameter."""
    for step, (got, ours_torch, exact) in enumerate(zip(got_history, torch_history, exact_history)):
        for i, (g, t, e) in enumerate(zip(got, ours_torch, exact)):
            err = (g.double() - e).abs().max().item()
            torch_err = (t.double() - e).abs().max().item()
            floor = torch.finfo(g.dtype).eps * e.abs().max().item()
            assert err <= 2 * torch_err + floor, (f"{name}: step {step + 1}, tensor {i}: error {err:.3g} vs "
                                                  f"float64 AdamW, torch AdamW's {torch_err:.3g}")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_adamw(weight_decay, dtype):
    assert implementation("fused_adamw", KERNEL_DEVICE) == "triton"
    params, grads = _params(dtype), _grads(6)
    ours, opt = _run(lambda p: FusedAdamW(_groups(p, weight_decay), eps=1e-8), params, grads)
    theirs, torch_opt = _run(lambda p: torch.optim.AdamW(_groups(p, weight_decay), eps=1e-8), params, grads)
    exact, _ = _run(lambda p: torch.optim.AdamW(_groups(p, weight_decay), eps=1e-8),
                    [p.double() for p in params], grads)
    _assert_tracks("params", ours, theirs, exact)
    moved = max((a.double() - p.double()).abs().max().item() for a, p in zip(ours[-1], params))
    assert moved > 1e-3  # the comparison is between parameters that moved
    if dtype == torch.float32:  # moments too, through the shared state layout
        for p, q in zip(opt.state.values(), torch_opt.state.values()):
            assert p["step"].item() == q["step"].item() == 6
            torch.testing.assert_close(p["exp_avg"], q["exp_avg"], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(p["exp_avg_sq"], q["exp_avg_sq"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("scale,clipped", [(1.0, True), (1e-3, False)])
def test_clipping_matches_clip_grad_norm(scale, clipped):
    params, grads = _params(), _grads(4, scale)
    max_norm = 1.0
    ours, opt = _run(lambda p: FusedAdamW(_groups(p, 0.1), max_grad_norm=max_norm), params, grads)
    theirs, _ = _run(lambda p: torch.optim.AdamW(_groups(p, 0.1)), params, grads, clip=max_norm)
    exact, _ = _run(lambda p: torch.optim.AdamW(_groups(p, 0.1)), [p.double() for p in params], grads, clip=max_norm)
    _assert_tracks("clipped params", ours, theirs, exact)
    last_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads[-1]])).item()
    assert opt.grad_norm.item() == pytest.approx(last_norm, rel=1e-5)
    assert (last_norm > max_norm) == clipped
    # without clipping, a large gradient gives a different trajectory: the clip really acted
    unclipped, _ = _run(lambda p: FusedAdamW(_groups(p, 0.1)), params, grads)
    differs = any(not torch.equal(a, b) for a, b in zip(unclipped[-1], ours[-1]))
    assert differs == clipped


def test_gradients_are_left_unscaled_by_clipping():
    p = torch.randn(50, requires_grad=True)
    p.grad = torch.randn(50) * 10
    before = p.grad.clone()
    FusedAdamW([p], max_grad_norm=0.5).step()
    assert torch.equal(p.grad, before)


@pytest.mark.parametrize("moments_dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(moments_dtype):
    """Save after 3 steps, load into a fresh optimizer, continue both: bit-identical (stochastic rounding too)."""
    params, grads = _params(), _grads(6)
    first, opt = _run(lambda p: FusedAdamW(_groups(p, 0.1), max_grad_norm=1.0, moments_dtype=moments_dtype), params,
                      grads[:3])
    resumed_leaves = [p.clone().requires_grad_() for p in first[-1]]
    resumed = FusedAdamW(_groups(resumed_leaves, 0.0), max_grad_norm=1.0, moments_dtype=moments_dtype)
    torch.rand(5)  # a different global RNG position on resume changes nothing
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.param_groups[0]["weight_decay"] == 0.1
    # continue both from step 3 with the same gradients
    original_leaves = [p for group in opt.param_groups for p in group["params"]]
    for step_grads in grads[3:]:
        for a, b, g in zip(original_leaves, resumed_leaves, step_grads):
            a.grad, b.grad = g.float(), g.float()
        opt.step()
        resumed.step()
    for a, b in zip(original_leaves, resumed_leaves):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), resumed.state.values()):
        assert a["exp_avg_sq"].dtype == moments_dtype and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_state_dict_is_interchangeable_with_torch_adamw():
    params, grads = _params(), _grads(4)
    _, torch_opt = _run(lambda p: torch.optim.AdamW(_groups(p, 0.1)), params, grads[:2])
    _, ours = _run(lambda p: FusedAdamW(_groups(p, 0.1)), params, grads[:2])
    for a, b in zip(ours.state_dict()["state"].values(), torch_opt.state_dict()["state"].values()):
        assert a.keys() == b.keys()
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    leaves = [p.clone().requires_grad_() for p in params]
    loaded = FusedAdamW(_groups(leaves, 0.1))
    loaded.load_state_dict(torch_opt.state_dict())
    assert all(s["exp_avg"].dtype == torch.float32 for s in loaded.state.values())


def test_bf16_moments_stay_close_to_float32():
    """The docstring's claim: after 30 steps, the parameters' total update with bf16 moments is within 3%
    (relative L2) of float32-moment AdamW's."""
    params, grads = _params(), _grads(30)
    f32, _ = _run(lambda p: FusedAdamW(_groups(p, 0.1)), params, grads)
    bf16, opt = _run(lambda p: FusedAdamW(_groups(p, 0.1), moments_dtype=torch.bfloat16), params, grads)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt.state.values())
    for a, b, p in zip(bf16[-1], f32[-1], params):
        update_a, update_b = a - p, b - p
        assert (update_a - update_b).norm() <= 0.03 * update_b.norm()


def test_bf16_second_moment_decays_like_float32():
    """With beta2 = 0.999 a step changes exp_avg_sq by 0.1%, below half a bf16 unit: round-to-nearest would
    freeze it (ratio 1.0 below). Stochastic rounding lets it decay as float32's does (0.999^100 = 0.905)."""
    p = torch.randn(512, requires_grad=True)
    opt = FusedAdamW([p], moments_dtype=torch.bfloat16)
    p.grad = torch.randn(512)
    opt.step()
    v0 = opt.state[p]["exp_avg_sq"].float().clone()
    for _ in range(100):
        p.grad = torch.randn(512) * 1e-4  # adds ~1e-11 to v: negligible, v just decays
        opt.step()
    ratio = (opt.state[p]["exp_avg_sq"].float().sum() / v0.sum()).item()
    assert ratio == pytest.approx(0.999**100, rel=0.01)


@pytest.mark.parametrize("moments_dtype", [torch.float32, torch.bfloat16])
def test_torch_fallback_matches(moments_dtype):
    params, grads = _params(), _grads(5)
    with force_implementation("torch"):
        assert implementation("fused_adamw", KERNEL_DEVICE) == "torch"
        fallback, _ = _run(lambda p: FusedAdamW(_groups(p, 0.1), max_grad_norm=2.0, moments_dtype=moments_dtype),
                           params, grads)
    triton_path, _ = _run(lambda p: FusedAdamW(_groups(p, 0.1), max_grad_norm=2.0, moments_dtype=moments_dtype),
                          params, grads)
    theirs, _ = _run(lambda p: torch.optim.AdamW(_groups(p, 0.1)), params, grads, clip=2.0)
    for ours, label in ((fallback, "fallback"), (triton_path, "triton")):
        for a, b, p in zip(ours[-1], theirs[-1], params):
            # float32 moments: both match torch to rounding; bf16: within the documented 3% of the update
            tol = 1e-5 if moments_dtype == torch.float32 else 0.03
            assert (a - b).norm() <= tol * (b - p).norm(), label


def test_parameters_without_gradients_are_untouched():
    a, b = torch.randn(10, requires_grad=True), torch.randn(10, requires_grad=True)
    before = b.detach().clone()
    opt = FusedAdamW([a, b])
    a.grad = torch.randn(10)
    opt.step()
    assert torch.equal(b, before) and b not in opt.state and opt.state[a]["step"].item() == 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(moments_dtype=torch.float16), "moments_dtype"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(betas=(0.9, 1.0)), "betas"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedAdamW([torch.randn(3, requires_grad=True)], **kwargs)


# --- FSDP2 on two gloo ranks --------------------------------------------------------------------------------

def _model():
    torch.manual_seed(0)
    # 7 output rows shard 4/3 over 2 ranks and the (1, 3) layer 1/0: an empty shard on rank 1
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1))


def _fsdp_steps(out_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    model = _model()
    reference = copy.deepcopy(model)
    fully_shard(model, mesh=mesh)
    # a replicated DTensor parameter as well: its norm must not be counted twice
    extra = torch.nn.Parameter(distribute_tensor(torch.randn(4, generator=torch.Generator().manual_seed(1)), mesh,
                                                 [Replicate()]))
    extra_ref = torch.nn.Parameter(extra.full_tensor().clone())
    opt = FusedAdamW(list(model.parameters()) + [extra], lr=0.05, weight_decay=0.1, max_grad_norm=0.3)
    ref_opt = torch.optim.AdamW(list(reference.parameters()) + [extra_ref], lr=0.05, weight_decay=0.1)
    norms = []
    for step in range(3):
        x = torch.randn(16, 5, generator=torch.Generator().manual_seed(step))
        half = x[8 * rank:8 * (rank + 1)]  # each rank its half of the batch; FSDP averages the gradients
        (model(half).pow(2).mean() + extra.to_local().pow(2).sum()).backward()
        (reference(x).pow(2).mean() + (extra_ref * extra_ref).sum()).backward()
        opt.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()) + [extra_ref], 0.3)
        ref_opt.step()
        norms.append((opt.grad_norm.item(), ref_norm.item()))
        opt.zero_grad()
        ref_opt.zero_grad()
    full = [p.full_tensor() for p in model.parameters()] + [extra.full_tensor()]
    errors = [(a - b).abs().max().item() for a, b in zip(full, list(reference.parameters()) + [extra_ref])]
    if rank == 0:
        torch.save({"norms": norms, "errors": errors}, out_path)


def test_fsdp2_dtensor_parameters_on_two_ranks(tmp_path):
    """FSDP2-sharded parameters (uneven, one shard empty) plus a replicated DTensor: the global norm is the
    single-process norm, and the updated parameters match single-process AdamW after clipping."""
    spawn(_fsdp_steps, 2, str(tmp_path / "out.pt"), tmp=tmp_path)
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    for ours, theirs in result["norms"]:
        assert ours == pytest.approx(theirs, rel=1e-5)
    assert result["norms"][0][1] > 0.3  # the clip is active
    assert max(result["errors"]) < 1e-6


# --- DeepSpeed's client optimizer on two gloo ranks --------------------------------------------------------

def _deepspeed_steps(out_path, ckpt_dir):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as trainers/engines/deepspeed.py does
    config = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}, "gradient_clipping": 0.3,
              "zero_allow_untested_optimizer": True, "steps_per_print": 2**62}
    rank = dist.get_rank()

    def engine(optimizer_cls):
        model = _model()
        optimizer = optimizer_cls(model.parameters(), lr=0.05, weight_decay=0.1)
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]

    def train(ds, steps):
        for step in steps:
            x = torch.randn(16, 5, generator=torch.Generator().manual_seed(step))[8 * rank:8 * (rank + 1)]
            ds.backward(ds(x).pow(2).mean())
            ds.step()

    ours, theirs = engine(FusedAdamW), engine(torch.optim.AdamW)
    train(ours, range(2))
    train(theirs, range(4))
    ours.save_checkpoint(ckpt_dir, tag="t")
    resumed = engine(FusedAdamW)
    resumed.load_checkpoint(ckpt_dir, tag="t")
    train(ours, range(2, 4))
    train(resumed, range(2, 4))
    result = {
        "vs_torch": max((a - b).abs().max().item() for a, b in zip(ours.module.parameters(),
                                                                   theirs.module.parameters())),
        "resumed": max((a - b).abs().max().item() for a, b in zip(ours.module.parameters(),
                                                                  resumed.module.parameters())),
        "moved": max((a - b).abs().max().item() for a, b in zip(ours.module.parameters(), _model().parameters())),
    }
    if rank == 0:
        torch.save(result, out_path)


def test_deepspeed_zero2_client_optimizer(tmp_path):
    """ZeRO-2 steps FusedAdamW on its flat fp32 partitions, with DeepSpeed's own clipping: the same parameters
    as with torch's AdamW, and a checkpoint saved mid-run resumes to the same parameters."""
    pytest.importorskip("deepspeed")
    spawn(_deepspeed_steps, 2, str(tmp_path / "out.pt"), str(tmp_path / "ckpt"), tmp=tmp_path)
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    assert result["moved"] > 1e-2
    assert result["vs_torch"] < 1e-6
    assert result["resumed"] == 0.0

