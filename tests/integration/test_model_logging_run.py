"""`flotilla train` with tracking.log_models = every: each checkpoint's model and the final one are MLflow 3
LoggedModels of the run, at their steps, and the final one loads with MLflow's loader and gives the logits of
`export_hf` of the run's last checkpoint."""

from __future__ import annotations

import mlflow
import torch
import yaml
from transformers import AutoModelForCausalLM

from orchestrator.mlflow_client import EXPERIMENT_KIND_TAG, TRAINING_KIND
from orchestrator.model_logging import STEP_TAG
from tests.integration.test_train_ray import finish, flotilla, run_by_name
from trainers.export import export_hf

CONFIG = {
    "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
    "data": {"source": "synthetic", "synthetic_docs": 300, "synthetic_mean_len": 24},
    "train": {"steps": 4, "micro_batch_size": 4, "seq_len": 32, "val_every": 2, "val_batches": 1, "seed": 1,
              "log_every": 1},
    "optim": {"lr": 1e-2, "warmup_steps": 1},
    "cluster": {"num_workers": 1},
    "checkpoint": {"every": 2, "keep": 4},
    "tracking": {"experiment": "it", "system_metrics": False, "log_models": "every"},
}


def test_every_checkpoint_and_the_final_model_are_logged_models_of_the_run(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(CONFIG))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = finish(flotilla(["train", "run.yaml", "-o", "tracking.run_name=logged"], tmp_path, uri))
    assert "step 4/4" in out and "MLflow model logged (step 4): models:/" in out

    client, run = run_by_name(uri, "logged")
    run_id = run.info.run_id
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "synthetic" and dataset.dataset.digest

    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id],
                                            filter_string=f"source_run_id = '{run_id}'", output_format="list")
        assert sorted((m.name, m.tags[STEP_TAG], str(m.status)) for m in found) == [
            ("logged", "4", "READY"), ("logged-step-2", "2", "READY")]
        steps = {o.model_id: o.step for o in client.get_run(run_id).outputs.model_outputs}
        final = next(m for m in found if m.name == "logged")
        assert steps == {m.model_id: int(m.tags[STEP_TAG]) for m in found}
        assert {m.key for m in final.metrics} >= {"loss", "val_loss"}  # the run's metrics at step 4
        pipeline = mlflow.transformers.load_model(f"models:/{final.model_id}")
    finally:
        mlflow.set_tracking_uri(None)

    exported = AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "runs" / "logged", tmp_path / "hf")).eval()
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(pipeline.model.eval()(tokens).logits, exported(tokens).logits, atol=1e-5, rtol=0)
