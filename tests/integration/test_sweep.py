"""`flotilla sweep` end to end: the real CLI, an embedded Ray, Ray Tune trials that are whole trainers,
a real MLflow store. Synchronous PBT with more trials than the machine runs at once (the hang Ray users hit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

CONFIG = {
    "model": {"vocab_size": 64, "dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32},
    "data": {"source": "synthetic", "synthetic_docs": 200, "synthetic_mean_len": 20},
    "train": {"steps": 4, "micro_batch_size": 2, "seq_len": 16, "val_every": 2, "val_batches": 1, "log_every": 2},
    "optim": {"warmup_steps": 0, "schedule": "constant"},
    "cluster": {"num_workers": 1},
    "tracking": {"experiment": "it-sweep", "system_metrics": False},
    "tune": {"scheduler": "pbt", "num_samples": 3, "perturbation_interval": 2, "synch": True,
             "quantile_fraction": 0.34, "mutations": {"optim.lr": {"low": 1e-4, "high": 1e-1, "log": True}}},
}


def finished_parent_and_children(uri: str, sweep: str):
    """The sweep's parent run and its three trials' child runs, all FINISHED, each child with loss steps 1-4."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("it-sweep")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`flotilla.kind` = 'sweep'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == [f"{sweep}-t0", f"{sweep}-t1", f"{sweep}-t2"]
    assert all(c.info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2, 3, 4]
    return client, parent, children


@pytest.mark.slow  # 111 s on the 2-core CI machine: 6 trainer segments, ~25 s of Ray Train start-up each
def test_synch_pbt_sweep_exploits_and_tracks_parent_and_children(tmp_path):
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(CONFIG))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", "sweep.yaml", "-o", "tracking.run_name=sw"],
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "MLflow parent run" in proc.stdout

    lineage = json.loads((tmp_path / "runs" / "sw" / "lineage.json").read_text())
    assert len(lineage["exploits"]) == 1  # 3 trials, quantile 1: the worst copies the best at step 2
    exploit = lineage["exploits"][0]
    assert exploit["step"] == 2 and exploit["recipient"] != exploit["donor"]
    assert len(lineage["segments"]) == 6

    client, parent, _ = finished_parent_and_children(uri, "sw")
    event = client.get_metric_history(parent.info.run_id, f"exploit/{exploit['recipient']}")
    assert [m.step for m in event] == [2]
    assert any(k.startswith("exploit.step000002.") for k in parent.data.tags)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"lineage.json", "best_schedule.json", "hparam_schedules.png", "lineage.png"} <= artifacts
    # the recipient restarted from the donor's checkpoint: it restored once, and the time was measured
    assert parent.data.metrics["sweep/exploit_fraction"] < 0.1


@pytest.mark.slow  # about 3 minutes on 2 cores: a PB2 sweep (6 segments), then a 2-part replay
def test_pb2_sweep_then_replay_reproduces_the_best_trial(tmp_path):
    """PB2 end to end through the CLI, then `--replay` of the best trial's schedule as one plain run: on a
    deterministic CPU run (no dropout), retracing the donor's segments and then the best trial's own from the
    same initialisation must land on the best trial's final validation loss."""
    config = {**CONFIG, "tune": {**CONFIG["tune"], "scheduler": "pb2"}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}

    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", "sweep.yaml", *args],
                              cwd=tmp_path, env=env, text=True, capture_output=True, timeout=400)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return proc.stdout

    cli("-o", "tracking.run_name=pb")
    lineage = json.loads((tmp_path / "runs" / "pb" / "lineage.json").read_text())
    (exploit,) = lineage["exploits"]
    assert set(exploit["operations"].values()) == {"pb2 ucb"} and exploit["new"] != exploit["old"]
    best = lineage["best_trial"]
    best_score = next(s["score"] for s in lineage["segments"] if s["trial"] == best and s["stop"] == 4)
    assert lineage["best_schedule"][-1]["stop"] == 4

    out = cli("--replay", "runs/pb/lineage.json", "-o", "tracking.run_name=again")
    assert "replayed runs/pb/lineage.json as run again" in out
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("it-sweep")
    (replayed,) = client.search_runs([exp.experiment_id], "tags.`flotilla.run_name` = 'again'")
    assert [m.step for m in client.get_metric_history(replayed.info.run_id, "loss")] == [1, 2, 3, 4]
    assert replayed.data.metrics["val_loss"] == pytest.approx(best_score, rel=1e-5)
