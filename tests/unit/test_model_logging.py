"""Models, the experiment's kind and the training data in MLflow 3, against a real SQLite store.

The export itself (trainers.export) is tested on its own; here `export_hf` is replaced by a copy of a tiny HF
directory built in the test, so what is checked is what MLflow holds: a LoggedModel under its run and step that
MLflow's own loader loads, with the logits of the directory it came from."""

from __future__ import annotations

import shutil
import socket

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import trainers.export
from orchestrator.config import Config
from orchestrator.mlflow_client import EXPERIMENT_KIND_TAG, TRAINING_KIND, TrackingClient
from orchestrator.model_logging import STEP_TAG, ModelLogger, log_hf_model, model_name
from orchestrator.run_tracking import dataset_input
from orchestrator.tracking import Tracker
from trainers.corpus import build_text_dataset
from trainers.tokenizer import ByteTokenizer

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps artifacts in ./mlruns
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture
def hf_dir(tmp_path):
    """A tiny LlamaForCausalLM and a word-level tokenizer saved as an export is: config.json,
    model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path / "hf"
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(32)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1").save_pretrained(path)
    return path


@pytest.fixture
def exports(hf_dir, monkeypatch):
    """trainers.export.export_hf as a copy of `hf_dir`; the checkpoints it was asked for, in order."""
    asked = []

    def fake_export(source, out):
        asked.append(str(source))
        shutil.copytree(hf_dir, out)
        return out

    monkeypatch.setattr(trainers.export, "export_hf", fake_export)
    return asked


def tracker(tmp_path, name="run", **kw) -> Tracker:
    return Tracker("exp", name, {"train.steps": "8"}, {}, {}, tmp_path / "outbox.jsonl", system_metrics_interval=None,
                   flush_interval=0.05, **kw)


def models_of(run_id: str):
    experiment = MlflowClient().get_run(run_id).info.experiment_id
    return mlflow.search_logged_models(experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'",
                                       order_by=[{"field_name": "creation_timestamp", "ascending": True}],
                                       output_format="list")


def test_logged_model_is_under_its_run_at_its_step_and_loads_with_the_same_logits(store, tmp_path, hf_dir, exports):
    t = tracker(tmp_path)
    run_id = t.start()
    t.log_metrics({"loss": 2.5}, 4)
    t.log_metrics({"loss": 1.5, "val_loss": 1.75}, 8)
    t.flush()
    model_id = log_hf_model(run_id, "/runs/demo/checkpoint_x", 8, "demo")
    t.close()

    (found,) = models_of(run_id)
    assert (found.model_id, found.name, str(found.status)) == (model_id, "demo", "READY")
    assert found.tags[STEP_TAG] == "8" and found.params["train.steps"] == "8"
    assert {(m.key, m.step, m.value) for m in found.metrics} == {("loss", 8, 1.5), ("val_loss", 8, 1.75)}
    outputs = MlflowClient().get_run(run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(model_id, 8)]
    assert exports == ["/runs/demo/checkpoint_x"]

    pipeline = mlflow.transformers.load_model(f"models:/{model_id}")
    assert pipeline.task == "text-generation" and pipeline.tokenizer("w5 w9").input_ids == [5, 9]
    reference = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(pipeline.model.eval()(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode, logged", [("none", []), ("final", [("run", 8)]),
                                          ("every", [("run-step-4", 4), ("run", 8)])])
def test_log_models_modes(store, tmp_path, exports, mode, logged):
    t = tracker(tmp_path)
    run_id = t.start()
    models = ModelLogger(mode, t, "run", final_step=8)
    for step in (4, 4, 8):  # a restarted worker group persists step 4 again
        models.checkpoint(f"/ckpt/{step}", step)
    models.final("/ckpt/8", 8)
    t.close()
    assert [(m.name, int(m.tags[STEP_TAG])) for m in models_of(run_id)] == logged
    assert len(exports) == len(logged)


def test_the_relay_hands_each_persisted_checkpoint_over_with_its_step(store, tmp_path):
    from orchestrator.relay import CHECKPOINT_PATH, ReportRelay, RunOutcome
    from trainers.reporter import HISTORY

    t, seen = tracker(tmp_path), []
    run_id = t.start()
    relay = ReportRelay(t, RunOutcome("run", run_id, {}), None, max_failures=0,
                        on_checkpoint=lambda path, step: seen.append((path, step, t.flush())))
    relay({"step": 2, HISTORY: [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}], CHECKPOINT_PATH: "/ckpt/2"})
    relay({"step": 3, HISTORY: [{"step": 3, "loss": 1.0}]})
    t.close()
    assert seen == [("/ckpt/2", 2, True)]
    assert set(MlflowClient().get_run(run_id).data.metrics) == {"loss"}


def test_model_names_are_ones_mlflow_takes():
    assert model_name("tiny.v2/a:b") == "tiny-v2-a-b" and model_name("demo", 40) == "demo-step-40"


def test_failed_model_logging_warns_once_and_never_raises(store, tmp_path, monkeypatch, caplog):
    t = tracker(tmp_path)
    t.start()

    def broken_export(source, out):
        raise FileNotFoundError(f"{source}: no such directory")

    monkeypatch.setattr(trainers.export, "export_hf", broken_export)
    models = ModelLogger("every", t, "run", final_step=8)
    models.checkpoint("/gone/4", 4)
    assert models.final("/gone/8", 8) is None
    t.close()
    assert caplog.text.count("could not log the model") == 1 and "/gone/4: no such directory" in caplog.text


def test_model_logging_goes_on_without_mlflow(tmp_path, exports, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    try:
        t = tracker(tmp_path)
        t.run_id = "gone"  # the server answered when the run began, and went away
        assert ModelLogger("final", t, "run", final_step=8).final("/ckpt/8", 8) is None
    finally:
        mlflow.set_tracking_uri(None)
    assert "could not log the model of step 8" in caplog.text


def test_experiment_is_marked_for_model_training_unless_its_kind_was_set(store):
    client = TrackingClient("goes on")
    kind = lambda name: client.client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)  # noqa: E731
    client.experiment_id("new")
    assert kind("new") == TRAINING_KIND
    for name, before, after in (("untagged", None, TRAINING_KIND),
                                ("guessed", "genai_development_inferred", TRAINING_KIND),
                                ("by-hand", "genai_development", "genai_development"),
                                ("finetune", "finetuning", "finetuning")):
        experiment = client.client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: before} if before else None)
        assert client.experiment_id(name) == experiment
        assert kind(name) == after


def dataset_config(tmp_path, **data) -> Config:
    return Config.model_validate({"data": data, "checkpoint": {"dir": str(tmp_path)}})


def build_dataset(tmp_path, out):
    texts = tmp_path / "texts"
    texts.mkdir(exist_ok=True)
    for i in range(6):
        (texts / f"f{i}.py").write_text(f"x = {i}\n" * (i + 1))
    return build_text_dataset(sorted(texts.iterdir()), out, ByteTokenizer(), 0.3, seed=0)


def test_dataset_is_the_runs_input_once_with_its_digest(store, tmp_path):
    info = build_dataset(tmp_path, tmp_path / "ds")
    dataset = dataset_input(dataset_config(tmp_path, source="parquet", path=str(info.path)))
    first = tracker(tmp_path, dataset=dataset)
    run_id = first.start()
    first.close("KILLED")
    resumed = tracker(tmp_path, dataset=dataset)
    assert resumed.start() == run_id
    resumed.close()

    (logged,) = MlflowClient().get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.digest == dataset.dataset.digest and logged.dataset.name == "ds"
    assert logged.dataset.source_type == "local" and str(info.path) in logged.dataset.source
    assert '"train_tokens": %d' % info.train_tokens in logged.dataset.profile
    assert {(t.key, t.value) for t in logged.tags} == {("mlflow.data.context", "training")}


def test_dataset_digest_follows_the_data_not_the_build(tmp_path):
    a, b = (build_dataset(tmp_path, tmp_path / name) for name in ("a", "b"))
    digest = lambda **data: dataset_input(dataset_config(tmp_path, **data)).dataset.digest  # noqa: E731
    assert digest(source="parquet", path=str(a.path)) == digest(source="parquet", path=str(b.path))
    assert digest(source="parquet", path=str(a.path)) != digest(source="parquet", path=str(a.path), train_tokens=400)
    synthetic = dataset_input(dataset_config(tmp_path, source="synthetic", synthetic_docs=300)).dataset
    assert synthetic.source_type == "code" and synthetic.name == "synthetic"
    assert synthetic.digest != digest(source="synthetic", synthetic_docs=301)


def test_a_sweep_logs_its_best_trials_model_on_its_parent_run(store, tmp_path, exports):
    from orchestrator.sweep_tracking import SweepRun

    config = Config.model_validate({
        "tracking": {"experiment": "exp"}, "checkpoint": {"dir": str(tmp_path)},
        "tune": {"scheduler": "pbt", "num_samples": 2, "mutations": {"optim.lr": {"low": 1e-4, "high": 1e-1}}}})
    sweep = SweepRun(config, "s")
    parent = sweep.start()
    model_id = sweep.log_best_model("/runs/s/s-t1/ckpt_000004", 4, "s-t1")
    sweep.close("FINISHED")
    (found,) = models_of(parent)
    assert (found.model_id, found.name, found.tags["flotilla.trial"], found.tags[STEP_TAG]) == (model_id, "s-t1", "s-t1", "4")

    off = SweepRun(config.model_copy(update={"tracking": config.tracking.model_copy(update={"log_models": "none"})}), "q")
    off.start()
    assert off.log_best_model("/runs/q/q-t0/ckpt_000004", 4, "q-t0") is None
    off.close("FINISHED")
    assert exports == ["/runs/s/s-t1/ckpt_000004"]
