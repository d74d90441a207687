"""model.init_from: a HuggingFace Llama saved by the test starts runs of every layout at its own loss, trains
unchanged under a vanishing learning rate, and exports back to the same logits; each of 4 ranks reads only its
shards of a 240 MB model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from orchestrator.config import validate_config
from tests.distributed.spawn import once_more_after_a_crash, spawn
from trainers.config import TrainerConfig
from trainers.data import IGNORE_INDEX, BatchPlan, build_splits
from trainers.reporter import LocalReporter
from trainers.run import run

VOCAB = 64


def save_llama(path: Path, tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """A tiny GQA Llama with weights that give O(1) logits (HF's 0.02 init would make a loose comparison pass),
    norm gains not all 1, saved with save_pretrained."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=tied, rope_theta=10000.0,
                         rms_norm_eps=1e-6, max_position_embeddings=64, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen) if p.ndim == 1
                    else torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    return model


# name -> (tied, parallel section, micro-batch size, grad accum); 8 rows a step in every layout
LAYOUTS = {
    "fsdp-dp2": (False, {"dp_shard": 2}, 2, 2),
    "fsdp-dp2-tied": (True, {"dp_shard": 2}, 2, 2),
    "tp2": (False, {"tp": 2, "dp_shard": 1}, 4, 2),
    "pp2": (False, {"pp": 2, "dp_shard": 1}, 4, 2),
    "pp2-tied": (True, {"pp": 2, "dp_shard": 1}, 4, 2),  # the last stage's copy loads model.embed_tokens.weight
    "zero3": (False, {"engine": "deepspeed", "zero_stage": 3}, 2, 2),
    "zero3-tied": (True, {"engine": "deepspeed", "zero_stage": 3}, 2, 2),
}


def layout_config(pretrained: Path, parallel: dict, micro: int, accum: int, root: Path) -> TrainerConfig:
    """Through the orchestrator's validation, which reads the model section from config.json."""
    config = validate_config({
        "model": {"init_from": str(pretrained)},
        "data": {"source": "synthetic", "synthetic_docs": 300, "synthetic_mean_len": 24},
        "train": {"steps": 2, "micro_batch_size": micro, "grad_accum": accum, "seq_len": 32, "val_every": 0,
                  "seed": 5, "log_every": 1},
        "optim": {"lr": 1e-12, "weight_decay": 0.0, "warmup_steps": 0},
        "parallel": parallel,
        "cluster": {"num_workers": 2},
        "checkpoint": {"dir": str(root)},
    })
    return TrainerConfig.model_validate(config.trainer_sections())


def _train_each(runs: list[tuple[str, str, str]]) -> None:
    for cfg_json, root, out in runs:
        reporter = LocalReporter(Path(root))
        run(TrainerConfig.model_validate_json(cfg_json), reporter)
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps(reporter.metrics))


@torch.no_grad()
def hf_first_step_loss(hf: LlamaForCausalLM, cfg: TrainerConfig) -> float:
    """The HF model's loss on the global batch of step 0, document by document (our runs mask attention at
    document boundaries inside a packed row; HF's eager attention runs each document alone to match)."""
    rows, _, _ = build_splits(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    global_rows = cfg.train.micro_batch_size * cfg.train.grad_accum * (2 // (cfg.parallel.tp * cfg.parallel.pp))
    batch = rows.batch(BatchPlan(len(rows), global_rows, 1, 0, 1, cfg.train.seed).rows(0, 0))
    tokens, targets, positions = batch.tokens.flatten(), batch.targets.flatten(), batch.positions.flatten()
    bounds = batch.cu_seqlens.tolist()
    total = torch.zeros((), dtype=torch.float64)
    for start, end in zip(bounds[:-1], bounds[1:]):
        logits = hf(input_ids=tokens[None, start:end], position_ids=positions[None, start:end]).logits[0]
        total += torch.nn.functional.cross_entropy(logits.float(), targets[start:end], ignore_index=IGNORE_INDEX,
                                                   reduction="sum").double()
    return float(total / (targets != IGNORE_INDEX).sum())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every layout trained 2 steps from its pretrained model, by one pair of processes."""
    base = tmp_path_factory.mktemp("init-from")
    hf = {tied: save_llama(base / f"hf-{'tied' if tied else 'untied'}", tied) for tied in (False, True)}
    configs = {name: layout_config(base / f"hf-{'tied' if tied else 'untied'}", parallel, micro, accum, base / name)
               for name, (tied, parallel, micro, accum) in LAYOUTS.items()}

    def attempt(root: Path) -> tuple[dict, Path]:
        runs = [(cfg.model_dump_json(), str(root / name), str(root / f"{name}.json")) for name, cfg in configs.items()]
        spawn(_train_each, 2, runs, tmp=root)
        return {name: json.loads((root / f"{name}.json").read_text()) for name in configs}, root

    metrics, root = once_more_after_a_crash(attempt, base / "runs")
    return hf, configs, metrics, root


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_first_loss_is_the_pretrained_models(trained, name):
    hf, configs, metrics, _ = trained
    cfg = configs[name]
    assert cfg.model.kv_heads == 2 and cfg.model.tie_embeddings == LAYOUTS[name][0]
    expected = hf_first_step_loss(hf[LAYOUTS[name][0]], cfg)
    first = next(m for m in metrics[name] if m["step"] == 1)
    assert 1.0 < expected < 20.0  # a real model's loss, not a degenerate one
    assert first["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["tp2", "pp2", "pp2-tied", "zero3", "fsdp-dp2-tied"])
def test_export_after_a_vanishing_learning_rate_gives_the_original_logits(trained, name, tmp_path):
    from trainers.export import export_hf

    hf, _, _, root = trained
    out = export_hf(root / name, tmp_path / "exported")
    exported, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = hf[LAYOUTS[name][0]](tokens).logits
        got = exported.eval()(tokens).logits
    assert want.std() > 0.3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _peak_growth(pretrained: str, out: str) -> None:
    """One rank of fsdp dp_shard = 4: its resident memory before the load, and its peak during it."""
    from trainers.parallel import apply_fsdp, build_mesh
    from trainers.parallel.mesh import checked_dims
    from trainers.config import ParallelConfig
    from trainers.model import build_model
    from trainers.pretrained import load_pretrained
    from orchestrator.init_from import read_model_config

    def status(field: str) -> int:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    cfg = read_model_config(Path(pretrained))
    dims = checked_dims(ParallelConfig(dp_shard=4), 4)
    model = apply_fsdp(build_model(cfg, device="meta"), build_mesh(dims, "cpu"), torch.float32)
    model.to_empty(device="cpu")
    untouched = status("VmRSS")
    with torch.no_grad():
        for p in model.parameters():  # the rank's own quarter, resident as it is in training
            p.to_local().zero_()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    before = status("VmRSS")
    load_pretrained(model, pretrained)
    peak = status("VmHWM")
    local = sum(p.to_local().numel() * 4 for p in model.parameters())
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(
        {"growth": peak - before, "growth_from_untouched": peak - untouched, "local": local}))


def test_each_rank_reads_only_its_shards(tmp_path):
    """4 ranks load a 240 MB model: each one's peak resident memory grows by its quarter, not the whole."""
    from trainers.hf import to_hf
    from trainers.config import ModelConfig
    from trainers.model import build_model, init_weights

    cfg = ModelConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, max_seq_len=128)
    model = build_model(cfg, device="meta").to_empty(device="cpu")
    init_weights(model, cfg, seed=0)
    to_hf(model, cfg).save_pretrained(tmp_path / "hf")
    size = os.path.getsize(tmp_path / "hf" / "model.safetensors")
    del model
    assert size > 200e6
    spawn(_peak_growth, 4, str(tmp_path / "hf"), str(tmp_path), tmp=tmp_path)
    for rank in range(4):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert measured["local"] == pytest.approx(size / 4, rel=0.01)  # it holds a quarter of the weights
        print(f"rank {rank}: peak grew {measured['growth'] / 1e6:.0f} MB while loading a {size / 1e6:.0f} MB model "
              f"({measured['growth_from_untouched'] / 1e6:.0f} MB counting its own shard's first touch)")
        # counting the first touch of its own shard's memory, as a run that loads instead of initialising does
        assert measured["growth_from_untouched"] < 0.6 * size, measured
        assert measured["growth"] < 0.25 * size, measured  # beyond that shard: a buffer, never a copy of the model
