"""`flotilla plan` works out a config's mesh, parameters, memory and step time on paper; the numbers here
are computed by hand for one small config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml

from orchestrator.cli import main
from orchestrator.config import Config, ConfigError, load_config, validate_config
from orchestrator.plan import MiB, count_params, estimate_memory, format_plan, make_plan, rank_groups
from trainers.model import build_model, init_weights, num_params
from trainers.parallel.mesh import AXES, ParallelDims, build_mesh

# dim 32, 4 heads of 8, 2 kv heads (kv dim 16), MLP hidden 8/3 * 32 = 85 -> rounded up to 64: 128
SMALL = {
    "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
    "data": {"source": "synthetic"},
    "train": {"micro_batch_size": 4, "grad_accum": 2, "seq_len": 32, "peak_flops": 1e9},
    "parallel": {"dp_shard": 2, "tp": 2},
    "cluster": {"num_workers": 4},
}


def small(**sections) -> Config:
    data = {name: {**SMALL.get(name, {}), **sections.get(name, {})} for name in {*SMALL, *sections}}
    return validate_config(data)


def test_param_count_by_hand():
    counts = count_params(small().model)
    # per block: wq, wo 32*32 each; wk, wv 32*16 each; w1, w2, w3 32*128 each = 2048 + 1024 + 12288
    block_matrices = 15_360
    assert counts.matrices == 2 * block_matrices + 2 * 64 * 32  # + tok_embeddings, output
    assert counts.vectors == 2 * 2 * 32 + 32  # two norms per block, final norm
    assert counts.total == 34_976
    assert counts.largest_unit == block_matrices + 2 * 32  # a block outweighs the root's 64*32*2 + 32


@pytest.mark.parametrize("model", [
    {},
    {"tie_embeddings": True},
    {"n_kv_heads": None, "ffn_dim": 96},
    {"dim": 48, "n_heads": 6, "n_kv_heads": 1, "n_layers": 3, "vocab_size": 100},
])
def test_param_count_matches_the_model(model):
    config = small(model=model, parallel={"tp": 1, "dp_shard": -1})  # the count does not depend on the layout
    assert count_params(config.model).total == num_params(build_model(config.model, device="meta"))


def test_memory_by_hand():
    mem = estimate_memory(small(), ParallelDims(4, dp_shard=2, tp=2))
    local = (34_816 / 2 + 160) / 2  # matrices split over tp, norm gains replicated; then FSDP over dp_shard
    assert mem.params == 4 * local == 35_136
    assert mem.grads == 4 * local
    assert mem.optimizer == 8 * local  # exp_avg and exp_avg_sq
    assert mem.gathered == 2 * 15_424 / 2 * 4  # two blocks' tp slices, float32
    # per token per block: 4d/t + 2d + 4d/t + 4f/t = 64 + 64 + 64 + 256 = 448 elements, float32, 2 blocks;
    # final norm (2d/t + d) * 4 bytes; logits and log-softmax 2 * 64 * 4 bytes; 4 rows x 32 tokens
    assert mem.activations == 4 * 32 * (448 * 4 * 2 + 64 * 4 + 2 * 64 * 4) == 557_056


def test_sharded_memory_halves_when_dp_shard_doubles():
    two = estimate_memory(small(), ParallelDims(4, dp_shard=2, tp=2))
    four = estimate_memory(small(parallel={"dp_shard": 4}, cluster={"num_workers": 8}), ParallelDims(8, dp_shard=4, tp=2))
    for part in ("params", "grads", "optimizer"):
        assert getattr(four, part) == getattr(two, part) / 2, part
    assert four.activations == two.activations  # per micro-batch: dp does not split a row
    assert four.gathered == two.gathered


def test_tp_splits_activations_except_the_gathered_inputs():
    one = estimate_memory(small(parallel={"tp": 1, "dp_shard": 4}), ParallelDims(4, dp_shard=4))
    two = estimate_memory(small(parallel={"tp": 2, "dp_shard": 2}), ParallelDims(4, dp_shard=2, tp=2))
    assert two.activations < one.activations
    assert two.activations > one.activations / 2  # the all-gathered block inputs (2d) and logits stay whole


def test_step_time_by_hand():
    plan = make_plan(small())
    # PaLM: 6N + 12*L*H*Dh*S with N = 2 * 15,360 + 32 * 64 (output) = 32,768 -> 196,608 + 24,576 = 221,184
    assert plan.tokens_per_step == 4 * 2 * 2 * 32  # rows x micro-batches x dp x seq_len = 512
    assert plan.flops_per_step == 221_184 * 512
    assert plan.step_time_s == pytest.approx(221_184 * 512 / (4 * 1e9))
    assert make_plan(small(train={"peak_flops": None})).step_time_s is None


def test_plan_says_which_kernels_run_and_why():
    plan = make_plan(small())  # a CPU run with tp = 2
    assert plan.kernels == {
        "attention (model.attention = auto)": ("sdpa + document mask", "model.attention = auto on cpu: SDPA (off CUDA, "
                                               "Triton runs only interpreted, far slower); packed rows on cpu: SDPA "
                                               "with a dense document mask (cpu has no varlen kernel)"),
        **{f"{name} (model.kernels = auto)": ("torch", "parallel.tp = 2: the tensor-parallel shards take the "
                                                        "PyTorch code") for name in ("RMSNorm", "RoPE", "SwiGLU")}}
    assert plan.optimizer == "torch AdamW: optim.implementation = auto on cpu"
    text = format_plan(plan)
    assert ("kernels on cpu:\n  attention (model.attention = auto)    sdpa + document mask: model.attention = auto "
            "on cpu") in text
    assert "optimizer: torch AdamW: optim.implementation = auto on cpu" in text


@pytest.fixture
def compiled_triton(monkeypatch):
    """Triton as on a machine with CUDA (compiled, not interpreted); `gpu(capability)` sets the GPU it sees,
    None for none (flotilla plan on a laptop)."""
    monkeypatch.setattr("kernels._triton.INTERPRET", False)
    monkeypatch.setattr("kernels._triton.HAS_TRITON", True)
    return lambda capability: monkeypatch.setattr("kernels._triton.cuda_capability", lambda device: capability)


def test_plan_for_gpus_it_cannot_see_says_so(compiled_triton):
    compiled_triton(None)
    plan = make_plan(small(cluster={"num_workers": 4, "use_gpu": True}, parallel={"tp": 1, "dp_shard": 4}))
    assert {impl for impl, _ in plan.kernels.values()} == {"flex_attention", "torch"}  # float32: no flash
    for _, why in plan.kernels.values():
        assert why.startswith("GPU unknown here (no CUDA on this machine)") and "FLOTILLA_KERNELS=triton" in why
    assert plan.optimizer.startswith("torch AdamW: GPU unknown here")


def test_plan_runs_triton_where_verified_or_asked(compiled_triton, monkeypatch):
    from kernels.verified import Verification

    compiled_triton((9, 0))
    monkeypatch.setattr("kernels.verified.VERIFIED", {
        ("rms_norm", (9, 0)): Verification("NVIDIA H100 80GB HBM3", "2026-12-01", "torch 2.11", 1.4)})
    gpu = small(cluster={"num_workers": 4, "use_gpu": True}, parallel={"tp": 1, "dp_shard": 4})
    plan = make_plan(gpu)
    impls = {label.split(" ")[0]: impl for label, (impl, _) in plan.kernels.items()}
    assert impls == {"attention": "flex_attention", "RMSNorm": "triton", "RoPE": "torch", "SwiGLU": "torch"}
    assert plan.kernels["RMSNorm (model.kernels = auto)"][1].startswith("verified on sm_90 (kernels/verified.py")
    assert plan.kernels["RoPE (model.kernels = auto)"][1] == ("rope not verified on sm_90 (kernels/verified.py); "
                                                              "FLOTILLA_KERNELS=triton to run it")
    # the activation estimate follows: the Triton RMSNorm keeps one row of its input less than PyTorch's
    monkeypatch.setattr("kernels.verified.VERIFIED", {})
    assert estimate_memory(gpu, ParallelDims(4, dp_shard=4)).activations > plan.memory.activations

    monkeypatch.setenv("FLOTILLA_KERNELS", "triton")
    forced = make_plan(gpu)
    assert {impl for impl, _ in forced.kernels.values()} == {"triton"}
    assert forced.optimizer == "FusedAdamW (Triton): FLOTILLA_KERNELS=triton, verified or not"


def test_rank_groups_by_hand():
    groups = rank_groups(ParallelDims(8, pp=2, dp_shard=2, tp=2))
    assert groups == {
        "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "dp_shard": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
    }


def test_rank_groups_match_the_device_mesh():
    from torch.testing._internal.distributed.fake_pg import FakeStore  # a process group that sends nothing

    dims = ParallelDims(8, dp_replicate=2, dp_shard=2, tp=2)
    groups = rank_groups(dims)
    for rank in range(dims.world_size):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
        try:
            mesh = build_mesh(dims, "cpu")
            for axis in AXES:
                if axis in groups:
                    assert mesh[axis].mesh.tolist() in groups[axis], (rank, axis)
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("parallel, model, train, must_mention", [
    ({"tp": 2}, {"ffn_dim": 99}, {}, ["parallel.tp = 2", "MLP hidden size 99"]),
    ({"tp": 2}, {}, {"seq_len": 33}, ["parallel.tp = 2", "train.seq_len = 33"]),
    ({"tp": 2, "pp": 2, "dp_shard": 1}, {}, {"grad_accum": 2}, None),  # tp inside each stage
    ({"tp": 2, "pp": 2, "dp_shard": 1}, {}, {"grad_accum": 2, "seq_len": 33}, ["parallel.tp = 2", "train.seq_len = 33"]),
    ({"tp": 1, "pp": 2, "dp_shard": 2}, {}, {"grad_accum": 2}, None),  # pp x FSDP
    ({"tp": 1, "pp": 4, "dp_shard": 1}, {"n_layers": 2}, {"grad_accum": 4}, ["model.n_layers = 2", "4 pipeline stages"]),
    ({"tp": 1, "pp": 4, "dp_shard": 1, "pp_schedule": "interleaved_1f1b"}, {"n_layers": 4}, {"grad_accum": 4},
     ["model.n_layers = 4", "8 pipeline stages"]),
    ({"tp": 1, "pp": 4, "dp_shard": 1}, {"n_layers": 4}, {"grad_accum": 2}, ["train.grad_accum = 2", "multiple of parallel.pp = 4"]),
    ({"tp": 1, "pp": 4, "dp_shard": 1}, {"n_layers": 4, "tie_embeddings": True}, {"grad_accum": 4}, None),
    ({"tp": 1, "pp": 4, "dp_shard": 1}, {"n_layers": 4}, {"grad_accum": 4}, None),
    ({"tp": 1, "sp": 2, "dp_shard": 2, "sp_mode": "adaptive"}, {}, {}, ["data.batching = documents"]),
    ({"tp": 1, "sp": 2, "dp_shard": 2, "sp_mode": "ring"}, {"dropout_attn": 0.1}, {}, ["model.dropout_attn = 0.1", "ring"]),
    ({"tp": 2, "sp": 2, "dp_shard": 1}, {}, {"seq_len": 34}, ["parallel.sp = 2", "sp x tp = 4", "train.seq_len = 34"]),
    ({"tp": 2, "sp": 2, "dp_shard": 1}, {"n_heads": 2, "n_kv_heads": 2}, {}, ["parallel.sp = 2", "the 1 query heads", "parallel.tp = 2"]),
    ({"tp": 1, "sp": 4, "dp_shard": 1}, {"dim": 48, "n_heads": 6, "n_kv_heads": 2}, {}, ["parallel.sp = 4", "model.n_heads = 6"]),
    ({"tp": 1, "sp": 4, "dp_shard": 1, "sp_mode": "ring"}, {"dim": 48, "n_heads": 6, "n_kv_heads": 2}, {}, None),
    ({"tp": 1, "sp": 4, "dp_shard": 1}, {}, {"seq_len": 30}, ["parallel.sp = 4", "train.seq_len = 30"]),
    ({"tp": 2, "compile": True}, {}, {}, ["parallel.compile = true with parallel.tp = 2", "wrong input gradients"]),
    ({"tp": 2, "activation_checkpointing": True}, {}, {}, None),
])
def test_config_refuses_what_tp_or_sp_cannot_split(parallel, model, train, must_mention):
    if must_mention is None:  # accepted: ring attention needs no head split
        small(parallel=parallel, model=model, train=train)
        return
    with pytest.raises(ConfigError) as err:
        small(parallel=parallel, model=model, train=train)
    for fragment in must_mention:
        assert fragment in str(err.value), f"{fragment!r} missing from: {err.value}"


def test_cli_prints_the_plan(tmp_path: Path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    assert main(["plan", str(path), "-o", "cluster.num_workers=8", "-o", "parallel.dp_replicate=2"]) == 0
    out = capsys.readouterr().out
    assert "dp_replicate=2  dp_shard=2  sp=1  tp=2" in out
    assert "tp           [0, 1] [2, 3] [4, 5] [6, 7]" in out
    assert "parameters: 34,976" in out
    assert load_config(path).parallel.tp == 2  # tp > 1 with engine fsdp now loads


def test_sequence_parallel_splits_parameters_and_activations():
    base = make_plan(small(parallel={"dp_shard": 2, "tp": 1, "sp": 1}, cluster={"num_workers": 2})).memory
    sp = make_plan(small(parallel={"dp_shard": 2, "tp": 1, "sp": 2}, cluster={"num_workers": 4})).memory
    assert sp.params == pytest.approx(base.params / 2) and sp.optimizer == pytest.approx(base.optimizer / 2)
    assert sp.activations == pytest.approx(base.activations / 2)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_memory_by_hand(stage):
    config = small(parallel={"engine": "deepspeed", "zero_stage": stage, "tp": 1, "dp_shard": 4})
    mem = make_plan(config).memory
    n, world = 34_816 + 160, 4  # every parameter, float32 here
    assert mem.params == 4 * n / (world if stage == 3 else 1) + 4 * n / world  # weights + fp32 partition copy
    assert mem.grads == 4 * n / (world if stage >= 2 else 1)
    assert mem.optimizer == 8 * n / world
    assert mem.gathered == (2 * 15_424 * 4 if stage == 3 else 0)
    assert "1/4 partition" in format_plan(make_plan(config))


def test_activation_checkpointing_keeps_block_inputs_and_one_block():
    plain = estimate_memory(small(), ParallelDims(4, dp_shard=2, tp=2))
    ac = estimate_memory(small(parallel={"activation_checkpointing": True}), ParallelDims(4, dp_shard=2, tp=2))
    # block inputs d/t = 16 elements per token per block (2 blocks), then the larger of one block's 448
    # elements and the final norm + logits (64 + 2 * 64 elements), float32, 4 rows x 32 tokens
    assert ac.activations == 4 * 32 * (16 * 4 * 2 + max(448 * 4, 64 * 4 + 2 * 64 * 4)) == 245_760
    assert ac.activations < plain.activations / 2
    assert (ac.params, ac.grads, ac.optimizer) == (plain.params, plain.grads, plain.optimizer)
    text = format_plan(make_plan(small(parallel={"activation_checkpointing": True})))
    assert "blocks recomputed (activation checkpointing)" in text


def saved_activation_bytes(model, tokens, positions, cu_seqlens, max_seqlen) -> int:
    """Bytes of the distinct storages autograd keeps for backward, less the parameters' own."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens, positions, cu_seqlens, max_seqlen)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in weights)


@pytest.mark.parametrize("attention, kernels", [("sdpa", "torch"), ("triton", "torch"), ("sdpa", "triton"),
                                                ("triton", "triton")])
def test_activation_estimate_matches_what_autograd_saves(attention, kernels):
    """The plan's per-implementation counts against a real forward pass and loss (Triton through its
    interpreter): GQA with 8 query heads per kv head, where SDPA's repeated k and v and Triton's unrepeated
    ones differ most; an MLP 3x wide, so norm and MLP terms cannot stand in for each other; packed documents.
    The plan also counts the float32 logits, alive at the loss but not kept for backward: 1 of ~40 values
    per token here."""
    model_cfg = {"vocab_size": 64, "dim": 128, "n_layers": 3, "n_heads": 8, "n_kv_heads": 1, "ffn_dim": 384,
                 "max_seq_len": 64, "attention": attention, "kernels": kernels}
    config = small(model=model_cfg, train={"micro_batch_size": 2, "seq_len": 64}, parallel={"tp": 1, "dp_shard": 1},
                   cluster={"num_workers": 1})
    model = build_model(config.model, device="meta").to_empty(device="cpu")
    init_weights(model, config.model, seed=0)
    tokens = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 30, 64, 65, 128], dtype=torch.int32)
    positions = torch.cat([torch.arange(30), torch.arange(34), torch.arange(1), torch.arange(63)]).view(2, 64)
    measured = saved_activation_bytes(model, tokens, positions, cu, 63)
    assert estimate_memory(config, ParallelDims(1)).activations == pytest.approx(measured, rel=0.03)


def test_fsdp_gathers_even_for_one_worker_and_for_pipeline_stages_without_data_parallelism():
    one = estimate_memory(small(parallel={"tp": 1, "dp_shard": 1}, cluster={"num_workers": 1}), ParallelDims(1))
    assert one.gathered == 2 * 15_424 * 4  # Ray Train's process group: FSDP wraps a lone worker too
    # and every stage, whose mixed precision runs it in train.dtype
    stages = small(parallel={"tp": 1, "dp_shard": 1, "pp": 2}, cluster={"num_workers": 2}, train={"grad_accum": 2})
    assert make_plan(stages).memory.gathered == one.gathered


def test_cpu_offload_leaves_gathered_units_and_activations_on_the_device():
    plain = make_plan(small(parallel={"tp": 1, "dp_shard": 4}, cluster={"num_workers": 4, "use_gpu": True}))
    offload = make_plan(small(parallel={"tp": 1, "dp_shard": 4, "cpu_offload": True},
                              cluster={"num_workers": 4, "use_gpu": True}))
    # train.grad_accum = 2: FSDP2 accumulates unsharded gradients where it computed them, on the device
    assert offload.memory.accumulated == plain.memory.accumulated > 0
    assert offload.memory.total == plain.memory.gathered + plain.memory.activations + plain.memory.accumulated
    assert offload.memory.params == plain.memory.params  # still reported, as host memory
    text = format_plan(offload)
    assert "in CPU memory (parallel.cpu_offload)" in text and "optimizer: torch AdamW" in text
    with pytest.raises(ConfigError, match="parallel.cpu_offload = true with parallel.engine = deepspeed"):
        small(parallel={"engine": "deepspeed", "zero_stage": 2, "tp": 1, "dp_shard": 4, "cpu_offload": True})


def test_a_model_without_n_kv_heads_plans_as_one_kv_head_per_head():
    """model.n_kv_heads left out means as many as model.n_heads (no GQA): the plan must read the resolved count,
    not the unset key (it raised a TypeError at start-up of every run and sweep without that key)."""
    unset = small(model={"n_kv_heads": None})
    assert make_plan(unset).memory == make_plan(small(model={"n_kv_heads": 4})).memory


def test_gradient_accumulation_holds_unsharded_gradients_by_hand():
    """FSDP2 keeps each unit's gradients unsharded while sync is off (every micro-batch but the last): this
    rank's tp slice of the whole model in float32, in place of the sharded gradients until the last reduce."""
    mem = estimate_memory(small(), ParallelDims(4, dp_shard=2, tp=2))  # train.grad_accum = 2
    assert mem.accumulated == 4 * (34_816 / 2 + 160) == 70_272
    assert mem.total == mem.params + mem.accumulated + mem.optimizer + mem.gathered + mem.activations
    one = estimate_memory(small(train={"grad_accum": 1}), ParallelDims(4, dp_shard=2, tp=2))
    assert one.accumulated == 0 and one.total == mem.total - mem.accumulated + mem.grads
    assert "accumulated" not in format_plan(make_plan(small(train={"grad_accum": 1})))
    # pipeline stages reduce every micro-batch (the schedule never turns FSDP's sync off); DeepSpeed's ZeRO-2/3
    # reduce into their partitions every micro-batch and ZeRO-1 holds whole gradients anyway
    stages = small(parallel={"tp": 1, "dp_shard": 2, "pp": 2}, train={"grad_accum": 2})
    assert make_plan(stages).memory.accumulated == 0
    for stage in (1, 2, 3):
        zero = small(parallel={"engine": "deepspeed", "zero_stage": stage, "tp": 1, "dp_shard": 4})
        assert make_plan(zero).memory.accumulated == 0


def test_plan_of_a_7b_model_shows_its_accumulated_gradients(tmp_path: Path, capsys):
    path = tmp_path / "llama.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"vocab_size": 32000, "dim": 4096, "n_layers": 32, "n_heads": 32, "max_seq_len": 4096},
        "train": {"seq_len": 4096, "micro_batch_size": 1, "dtype": "bfloat16"},
        "cluster": {"num_workers": 8, "use_gpu": True}}))
    assert main(["plan", str(path), "-o", "train.grad_accum=4"]) == 0
    rows = {}  # "  name   1,234.5 MiB  note" -> {name: 1234.5}
    for line in capsys.readouterr().out.splitlines():
        name, value, unit, *_ = line.split() + ["", "", ""]
        if unit == "MiB":
            rows[name] = float(value.replace(",", ""))
    params = count_params(load_config(path).model).total
    assert rows["accumulated"] == pytest.approx(4 * params / MiB, abs=0.1)  # 25.0 GiB: every parameter, float32
    assert rows["total"] == pytest.approx(rows["parameters"] + rows["accumulated"] + rows["optimizer"]
                                          + rows["gathered"] + rows["activations"], abs=0.5)


def test_adaptive_plan_shows_the_degree_cap_and_the_model_states_it_plans(tmp_path: Path):
    """64 devices and 32 heads: no group of 64, whatever the lengths; the model states are ZeRO-3's."""
    from orchestrator.adaptive_plan import adaptive_report, format_adaptive
    from trainers.parallel.adaptive.cost import load_cost_model

    config = validate_config({
        "model": {"vocab_size": 32000, "dim": 4096, "n_layers": 32, "n_heads": 32, "max_seq_len": 200_000},
        "data": {"batching": "documents"}, "train": {"max_doc_len": 150_000, "tokens_per_step": 1_048_576},
        "parallel": {"sp": 64, "sp_mode": "adaptive"}, "cluster": {"num_workers": 64}})
    lengths = [150_000, 120_000] + [2_000 + 97 * i for i in range(100)]
    report = adaptive_report(config, lengths)
    degrees = {g["degree"] for m in report["micro_batches"] for g in m["groups"]}
    assert max(degrees) == 32 and report["max_degree"]["degree"] == 32
    assert "model.n_heads = 32" in report["max_degree"]["why"]
    assert report["static"]["degree"] <= 32 and report["best_homogeneous"]["degree"] <= 32
    cost = load_cost_model("flexsp-7b")
    assert report["memory"]["model_state_bytes"] == 16 * cost.param_count / 64  # 1.57 GiB, not + 25.1 unsharded
    text = format_adaptive(report, lengths)
    assert "groups of degree at most 32: the largest power of two dividing model.n_heads = 32" in text
    assert "1.57 GiB of model states" in text


SHIPPED = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["llama3-8b", "llama3-70b"])
def test_the_shipped_large_model_configs_plan_without_overrides(name, tmp_path, capsys):
    assert main(["plan", str(SHIPPED / f"{name}.yaml")]) == 0
    out = capsys.readouterr().out
    assert "mesh (64 device(s))" in out and "total" in out and "at least" in out  # memory and a step estimate


def test_the_llama3_8b_config_plans_a_step_of_real_lengths_under_its_head_cap(tmp_path, capsys):
    rng = np.random.default_rng(7)  # a long-tailed step of about 1M tokens, documents up to 128k
    lengths = np.minimum(rng.lognormal(np.log(2048), 1.2, 600).astype(int) + 1, 131072)
    (tmp_path / "lengths.txt").write_text("\n".join(map(str, lengths)))
    assert main(["plan", str(SHIPPED / "llama3-8b.yaml"), "--lengths", str(tmp_path / "lengths.txt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    degrees = {g["degree"] for mb in report["micro_batches"] for g in mb["groups"]}
    assert report["max_degree"]["degree"] == 32 and max(degrees) <= 32 and len(degrees) > 1
    assert report["static"]["estimated_s"] >= report["estimated_s"]
