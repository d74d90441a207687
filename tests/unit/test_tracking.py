"""The MLflow tracker against a real SQLite store, and against a server that is not there."""

from __future__ import annotations

import json
import socket

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.mlflow_client import REDACTED, is_secret, loggable_params
from orchestrator.tracking import Tracker, sync_outbox


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def make(tmp_path, name="r", **kw) -> Tracker:
    return Tracker("exp", name, {"train.steps": "3", "model.dim": "8"}, {"flotilla.layout": "single"},
                   {"config.yaml": "train:\n  steps: 3\n"}, tmp_path / "outbox.jsonl",
                   system_metrics_interval=None, flush_interval=0.05, **kw)


def test_params_name_every_leaf():
    assert loggable_params({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}}) == {
        "a.b": "1", "a.c.d": "[1, 2]", "e": "None", "f": "{}"}


@pytest.mark.parametrize("name", ["tracking.api_token", "env.AWS_SECRET_ACCESS_KEY", "db.Password", "hfToken",
                                  "s3.accessKey", "x.apikey", "gcp.credentials", "env.MLFLOW_TRACKING_PASSWORD"])
def test_secret_names(name):
    assert is_secret(name)


@pytest.mark.parametrize("name", ["data.tokenizer", "train.tokens_per_step", "parallel.adaptive.max_tokens_per_device",
                                  "data.train_tokens", "tune.mutations", "keyboard.layout", "monkey"])
def test_names_that_are_not_secrets(name):
    assert not is_secret(name)


def test_no_secret_reaches_the_runs_params(store, tmp_path):
    """Secret-named keys anywhere in what is logged: a config section, or environment variables put there."""
    config = {"train": {"steps": 3}, "data": {"tokenizer": "byte"},
              "tracking": {"api_token": "abc-secret-1", "server": {"password": "hunter2-xyz"}},
              "env": {"FLOTILLA_TEST_API_KEY": "env-secret-42", "HOME": "/home/u"}}
    t = Tracker("exp", "secrets", loggable_params(config), {}, {}, tmp_path / "outbox.jsonl",
                system_metrics_interval=None, flush_interval=0.05)
    t.start()
    t.close()

    (run,) = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("exp").experiment_id])
    params = run.data.params
    assert params["tracking.api_token"] == params["tracking.server.password"] == params["env.FLOTILLA_TEST_API_KEY"] == REDACTED
    assert params["train.steps"] == "3" and params["data.tokenizer"] == "byte" and params["env.HOME"] == "/home/u"
    logged = json.dumps(params)
    assert not any(secret in logged for secret in ("abc-secret-1", "hunter2-xyz", "env-secret-42"))


def test_run_holds_params_tags_metrics_and_config(store, tmp_path):
    t = make(tmp_path)
    run_id = t.start()
    for step in (1, 2, 3):
        t.log_metrics({"loss": 1.0 / step, "note": "text is skipped"}, step)
    t.close()
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.steps": "3", "model.dim": "8"}
    assert run.data.tags["flotilla.layout"] == "single"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert "note" not in run.data.metrics
    assert not (tmp_path / "outbox.jsonl").exists()


def test_resumed_run_continues_the_same_mlflow_run(store, tmp_path):
    first = make(tmp_path, "again")
    first.start()
    first.log_metrics({"loss": 2.0}, 1)
    first.close("KILLED")
    second = make(tmp_path, "again")
    assert second.start() == first.run_id
    second.log_metrics({"loss": 1.0}, 2)
    second.close()
    history = MlflowClient(store).get_metric_history(first.run_id, "loss")
    assert [m.step for m in history] == [1, 2]


def test_unreachable_server_never_raises_and_keeps_everything(tmp_path, monkeypatch, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    t = make(tmp_path, "offline")
    assert t.start() is None
    t.log_metrics({"loss": 3.0}, 1)
    t.log_metrics({"loss": 2.0}, 2)
    t.close()
    assert "not answering" in caplog.text
    (record,) = [json.loads(line) for line in (tmp_path / "outbox.jsonl").read_text().splitlines()]
    assert [m[3] for m in record["metrics"]] == [1, 2] and record["params"]["train.steps"] == "3"

    uri = f"sqlite:///{tmp_path / 'later.db'}"
    mlflow.set_tracking_uri(uri)
    assert sync_outbox(tmp_path / "outbox.jsonl") == 1
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [3.0, 2.0]
    assert run.data.params["model.dim"] == "8" and run.info.status == "FINISHED"
    mlflow.set_tracking_uri(None)


def test_relay_logs_each_step_once_across_a_restart_and_a_resubmit(store, tmp_path):
    """The driver's relay (orchestrator.relay.ReportRelay) against a real store. First driver: steps 1-7, a
    worker fails, the new worker group reports again from its step-5 checkpoint. Second driver (a resubmitted
    job), which the first left at step 7 though the step-8 checkpoint persisted: the resumed workers hand it
    step 8 from that checkpoint, and it goes on from 9. Each step reaches MLflow once; restarts and resumes
    are recorded at the step they continued from."""
    from orchestrator.console import FailedRank
    from orchestrator.relay import WORKER_FAILURE, ReportRelay, RunOutcome
    from trainers.reporter import CHECKPOINT_STEPS, HISTORY, RESUMED_FROM

    def step(n):
        return {"step": n, "loss": 10.0 - n}

    first, outcome = make(tmp_path, "again"), RunOutcome("again", None, metrics={})
    first.start()
    relay = ReportRelay(first, outcome, None, max_failures=1)
    for n in range(1, 8):
        relay({**step(n), HISTORY: [step(n)]})
    relay({WORKER_FAILURE: [FailedRank(1, "died", "ActorDiedError", "", "")]})
    relay({HISTORY: [{**step(6), RESUMED_FROM: 5, CHECKPOINT_STEPS: [step(5)]}, step(7)]})
    first.close()
    assert outcome.restarts == [5] and [h["step"] for h in outcome.history] == list(range(1, 8))

    second, outcome = make(tmp_path, "again"), RunOutcome("again", None, metrics={})
    second.start()
    relay = ReportRelay(second, outcome, None, max_failures=1)
    relay({HISTORY: [{**step(9), RESUMED_FROM: 8, CHECKPOINT_STEPS: [step(8)]}]})
    relay({HISTORY: [step(10)]})
    second.close()
    assert outcome.restarts == []

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (n, 10.0 - n) for n in range(1, 11)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "restarts")] == [(5, 1)]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, RESUMED_FROM)) == [(5, 5), (8, 8)]


def test_client_cuts_batches_to_mlflow_limits(store):
    """orchestrator.mlflow_client.TrackingClient.log_batch: one layer cuts every run's and sweep's batches."""
    from mlflow.entities import Metric

    from orchestrator.mlflow_client import METRICS_PER_CALL, PARAMS_PER_CALL, TAGS_PER_CALL, TrackingClient

    client = TrackingClient("training goes on")
    run_id = client.client.create_run(client.experiment_id("exp")).info.run_id
    calls = []
    send = client.client.log_batch
    client.client.log_batch = lambda run, **batch: (calls.append({k: len(v) for k, v in batch.items()}), send(run, **batch))
    client.log_batch(run_id, metrics=[Metric("loss", float(i), 0, i) for i in range(2 * METRICS_PER_CALL + 1)],
                     params={f"p{i}": str(i) for i in range(PARAMS_PER_CALL + 1)},
                     tags={f"t{i}": str(i) for i in range(TAGS_PER_CALL + 1)})
    assert calls == [{"params": 100}, {"params": 1}, {"tags": 100}, {"tags": 1},
                     {"metrics": 1000}, {"metrics": 1000}, {"metrics": 1}]
    run = client.client.get_run(run_id)
    assert len(run.data.params) == PARAMS_PER_CALL + 1 and run.data.tags["t100"] == "100"
    assert len(client.client.get_metric_history(run_id, "loss")) == 2 * METRICS_PER_CALL + 1



def sweep_config(tmp_path):
    from orchestrator.config import Config

    return Config.model_validate({
        "tracking": {"experiment": "exp"}, "checkpoint": {"dir": str(tmp_path)},
        "tune": {"scheduler": "pbt", "num_samples": 2, "mutations": {"optim.lr": {"low": 1e-4, "high": 1e-1}}}})


def test_sweep_run_records_the_parent_run(store, tmp_path):
    """orchestrator.sweep_tracking.SweepRun through the same client layer: params, exploit events, tags and
    the lineage artifacts on the sweep's parent run."""
    from orchestrator.sweep_tracking import SweepRun
    from tune.lineage import Segment, write_lineage
    from tune.pbt import ExploitRecord
    from tune.sweep import Timings

    segments = [Segment("s-t0", 0, 2, {"optim.lr": 0.01}, 2.0), Segment("s-t1", 0, 2, {"optim.lr": 0.001}, 3.0),
                Segment("s-t0", 2, 4, {"optim.lr": 0.01}, 1.0), Segment("s-t1", 2, 4, {"optim.lr": 0.012}, 1.5)]
    lineage = [ExploitRecord(2, "s-t1", "s-t0", {"optim.lr": 0.001}, {"optim.lr": 0.012}, {"optim.lr": "x1.2"}, 3.0, 2.0)]
    write_lineage(tmp_path / "lineage.json", segments, lineage, "s-t0")
    sweep = SweepRun(sweep_config(tmp_path), "s")
    run_id = sweep.start()
    sweep.finish_records(segments, lineage, Timings(wall_s=10.0, copy_s=0.5), "s-t0", {"s-t0": 1.0, "s-t1": 1.5},
                         set(), tmp_path, ["optim.lr"])
    sweep.close("FINISHED")

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["flotilla.kind"] == "sweep"
    assert run.data.params["tune.scheduler"] == "pbt" and run.data.params["train.steps"] == "100"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "exploit/s-t1")] == [(2, 2.0)]
    assert run.data.metrics["sweep/best_score"] == 1.0 and run.data.tags["flotilla.best_trial"] == "s-t0"
    assert run.data.tags["exploit.step000002.s-t1"].startswith("copied s-t0")
    assert {a.path for a in client.list_artifacts(run_id)} == {"lineage.json", "best_schedule.json",
                                                              "hparam_schedules.png", "lineage.png"}


def test_sweep_run_goes_on_without_mlflow_with_one_warning(tmp_path, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    try:
        from orchestrator.sweep_tracking import SweepRun

        sweep = SweepRun(sweep_config(tmp_path), "s")
        assert sweep.start() is None
        sweep.close("FINISHED")
    finally:
        mlflow.set_tracking_uri(None)
    assert caplog.text.count("not answering") == 1 and "create the sweep's parent run" in caplog.text
