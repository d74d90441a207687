"""`flotilla train` from a pretrained HuggingFace directory on 2 Ray workers: the run's first loss is the
pretrained model's, and under a vanishing learning rate `flotilla export` of the run gives back its logits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from orchestrator.config import load_config
from tests.distributed.test_init_from import VOCAB, hf_first_step_loss, save_llama
from tests.integration.test_train_ray import finish, flotilla, run_by_name
from trainers.config import TrainerConfig

CONFIG = {
    "data": {"source": "synthetic", "synthetic_docs": 300, "synthetic_mean_len": 24},
    "train": {"steps": 2, "micro_batch_size": 4, "grad_accum": 2, "seq_len": 32, "val_every": 0, "seed": 5,
              "log_every": 1},
    "optim": {"lr": 1e-12, "weight_decay": 0.0, "warmup_steps": 0},
    "cluster": {"num_workers": 2},
    "tracking": {"experiment": "it", "system_metrics": False, "log_models": "none"},
}

LAYOUTS = {  # name -> (tied, parallel section)
    "tp2-tied": (True, {"tp": 2, "dp_shard": 1}),
    "fsdp-dp2": (False, {"dp_shard": 2}),
    "pp2": (False, {"pp": 2, "dp_shard": 1}),
    "zero3": (False, {"engine": "deepspeed", "zero_stage": 3}),
}


# ~50 s a layout: slow; the default suite starts every layout from a pretrained model in-process
# (tests/distributed/test_init_from.py) and runs flotilla train through Ray elsewhere
@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_run_starts_from_the_pretrained_model_and_exports_it_back(tmp_path, monkeypatch, name):
    tied, parallel = LAYOUTS[name]
    hf = save_llama(tmp_path / "pretrained", tied)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**CONFIG, "model": {"init_from": "pretrained"},
                                                       "parallel": parallel}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = finish(flotilla(["train", "run.yaml", "-o", "tracking.run_name=pretrained"], tmp_path, uri))
    assert "step 2/2" in out

    client, run = run_by_name(uri, "pretrained")
    assert run.data.params["model.n_kv_heads"] == "2" and run.data.params["model.tie_embeddings"] == str(tied)
    first = next(m.value for m in client.get_metric_history(run.info.run_id, "loss") if m.step == 1)
    monkeypatch.chdir(tmp_path)  # model.init_from is relative to where the run started
    cfg = TrainerConfig.model_validate(load_config("run.yaml").trainer_sections())
    assert first == pytest.approx(hf_first_step_loss(hf, cfg), rel=1e-5)

    exported = subprocess.run([sys.executable, "-m", "orchestrator.cli", "export", "runs/pretrained", "--hf", "hf-out"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-out", output_loading_info=True)
    assert not any(info.values()), info
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens).logits, hf(tokens).logits, atol=1e-5, rtol=0)
