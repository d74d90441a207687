"""Faults on a real two-node Ray cluster on loopback (token authentication on), each checked against one
uninterrupted run of the same config: a training worker SIGKILLed mid-run, a job stopped and resubmitted
under the same run name, a corrupt latest checkpoint, and the MLflow server going away and coming back.
Every test asserts that the final loss matches the uninterrupted run's and that MLflow holds each step once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator import local_cluster

from tests.distributed.spawn import free_port

STEPS, EVERY = 30, 5
# Two workers of one CPU on nodes of one CPU each: every run spans both nodes. Enough steps that a fault
# lands mid-run; a checkpoint every 5 steps, the newest 3 kept (the corrupt-checkpoint test needs an older one).
CONFIG = {
    "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
    "data": {"source": "synthetic", "synthetic_docs": 300, "synthetic_mean_len": 24},
    "train": {"steps": STEPS, "micro_batch_size": 4, "seq_len": 32, "val_every": 10, "val_batches": 2, "seed": 3,
              "log_every": 1},
    "optim": {"lr": 1e-2, "warmup_steps": 2},
    "cluster": {"num_workers": 2, "max_failures": 1},
    "checkpoint": {"every": EVERY, "keep": 3},
    "tracking": {"experiment": "faults", "system_metrics": False},
}


def write_config(tmp_path: Path) -> Path:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**CONFIG, "checkpoint": {**CONFIG["checkpoint"], "dir": str(tmp_path / "runs")}}))
    return tmp_path / "run.yaml"


def env_for(cluster, uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_"))}
    return {**env, **cluster.client_env(), "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}


def flotilla(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def read_until(proc: subprocess.Popen, text: str, timeout: float = 240) -> str:
    seen, deadline = "", time.monotonic() + timeout
    while text not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert text in seen, seen[-4000:]
    return seen


def finish(proc: subprocess.Popen, seen: str = "", timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (seen + out)[-5000:]
    return seen + out


def the_run(uri: str, name: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id],
                                f"tags.`flotilla.run_name` = '{name}'")
    return client, run


def steps_of(client, run, key: str = "loss") -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def final(client, run) -> tuple[float, float]:
    return (client.get_metric_history(run.info.run_id, "loss")[-1].value,
            client.get_metric_history(run.info.run_id, "val_loss")[-1].value)


def assert_whole_and_equal(client, run, reference: tuple[float, float]) -> None:
    """Every step once, nothing past the last checkpoint lost, and the same end as the uninterrupted run."""
    assert steps_of(client, run) == list(range(1, STEPS + 1))
    assert steps_of(client, run, "val_loss") == [0, 10, 20, 30]
    assert final(client, run) == pytest.approx(reference, rel=1e-5)


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory) -> tuple[float, float]:
    """Final loss and val_loss of the run no fault touches."""
    tmp = tmp_path_factory.mktemp("reference")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    write_config(tmp)
    finish(flotilla(["train", "run.yaml", "--address", ray_cluster.gcs_address, "-o", "tracking.run_name=straight"],
                    env_for(ray_cluster, uri), tmp))
    return final(*the_run(uri, "straight"))


def train_workers(cluster) -> list[psutil.Process]:
    """The cluster's Ray Train worker processes (Ray titles them ray::RayTrainWorker...)."""
    return [p for p in local_cluster.processes(cluster.root) if "RayTrainWorker" in " ".join(p.cmdline())]


@pytest.mark.slow  # ~90 s on 2 cores: a Ray Train start and a restart of the worker group
def test_a_killed_worker_restarts_from_the_last_checkpoint(ray_cluster, reference, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_config(tmp_path)
    proc = flotilla(["train", "run.yaml", "--address", ray_cluster.gcs_address, "-o", "tracking.run_name=killed"],
                    env_for(ray_cluster, uri), tmp_path)
    seen = read_until(proc, f"step 7/{STEPS}")  # past the step-5 checkpoint
    workers = train_workers(ray_cluster)
    assert len(workers) == 2, [p.cmdline() for p in workers]
    os.kill(workers[-1].pid, signal.SIGKILL)
    out = finish(proc, seen)
    assert "worker failure" in out

    client, run = the_run(uri, "killed")
    assert run.info.status == "FINISHED"
    restarts = client.get_metric_history(run.info.run_id, "restarts")
    assert [m.value for m in restarts] == [1]
    resumed = restarts[0].step
    assert resumed % EVERY == 0 and 5 <= resumed < STEPS  # from a checkpoint, not from scratch
    assert [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")] == [resumed]
    assert_whole_and_equal(client, run, reference)


def corrupt_newest_checkpoint(storage: Path) -> tuple[Path, int]:
    """Truncate the biggest file of the run's newest checkpoint, as a writer killed mid-copy would; returns
    the checkpoint and the step of the one before it."""
    checkpoints = sorted(p for p in storage.iterdir() if p.name.startswith("checkpoint_") and p.is_dir())
    assert len(checkpoints) >= 2, checkpoints
    newest = checkpoints[-1]
    biggest = max((f for f in newest.iterdir() if f.is_file()), key=lambda f: f.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    import json

    previous_step = json.loads(next(checkpoints[-2].glob("manifest_rank*.json")).read_text())["step"]
    return newest, previous_step


@pytest.mark.slow  # ~2-3 min on 2 cores each: two jobs, each a Ray Train start
@pytest.mark.parametrize("corrupt", [False, True], ids=["resubmit", "resubmit-after-corrupt-checkpoint"])
def test_a_stopped_job_resubmitted_resumes_from_its_checkpoint(ray_cluster, reference, tmp_path, corrupt):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_config(tmp_path)
    env = {**env_for(ray_cluster, uri), "RAY_ADDRESS": ""}
    name = "corrupt" if corrupt else "again"  # one run name per case: the cluster keeps the other case's jobs
    submit = ["submit", "run.yaml", "--address", ray_cluster.dashboard_url, "-o", f"tracking.run_name={name}"]
    first = subprocess.run([sys.executable, "-m", "orchestrator.cli", *submit], env=env, cwd=tmp_path, text=True,
                           capture_output=True, timeout=120)
    assert first.returncode == 0, first.stderr
    job = first.stdout.splitlines()[0]
    logs = flotilla(["logs", job, "--address", ray_cluster.dashboard_url, "--follow"], env, tmp_path)
    read_until(logs, f"step 17/{STEPS}")  # the step-15 checkpoint (and 10, 5) persisted
    stopped = subprocess.run([sys.executable, "-m", "orchestrator.cli", "stop", job, "--address",
                              ray_cluster.dashboard_url], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    logs.communicate(timeout=120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "STOPPED" not in subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "status", job, "--address", ray_cluster.dashboard_url],
            env=env, cwd=tmp_path, capture_output=True, text=True).stdout:
        time.sleep(1)

    storage = tmp_path / "runs" / name
    if corrupt:
        newest, expected = corrupt_newest_checkpoint(storage)
    again = subprocess.run([sys.executable, "-m", "orchestrator.cli", *submit, "--wait"], env=env, cwd=tmp_path,
                           text=True, capture_output=True, timeout=400)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-3000:]
    assert again.stdout.splitlines()[0] == f"{job}-2"  # a new job of the same run
    assert f"step 1/{STEPS}" not in again.stdout  # continued, not from scratch
    if corrupt:
        assert f"skipping checkpoint {newest}" in again.stdout
        assert "resuming from the previous complete checkpoint" in again.stdout

    client, run = the_run(uri, name)
    assert run.data.tags["ray.job_id"] == f"{job}-2"
    resumed = client.get_metric_history(run.info.run_id, "resumed_from_step")
    assert len(resumed) == 1 and resumed[0].value >= 15
    if corrupt:
        assert resumed[0].value == expected
    assert_whole_and_equal(client, run, reference)


def start_mlflow_server(port: int, store: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination",
                             str(store / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            MlflowClient(f"http://127.0.0.1:{port}").search_experiments(max_results=1)
            return proc
        except Exception:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    raise AssertionError("mlflow server did not answer within 90 s")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow  # ~80 s on 2 cores: a Ray Train start and two MLflow server starts
def test_a_tracking_server_restart_loses_and_repeats_no_metric(ray_cluster, reference, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(port, tmp_path)
    try:
        write_config(tmp_path)
        proc = flotilla(["train", "run.yaml", "--address", ray_cluster.gcs_address, "-o", "tracking.run_name=outage"],
                        env_for(ray_cluster, uri), tmp_path)
        seen = read_until(proc, f"step 3/{STEPS}")
        stop_server(server)
        seen += read_until(proc, f"step {STEPS}/{STEPS}")  # training goes on while the server is gone
        server = start_mlflow_server(port, tmp_path)
        out = finish(proc, seen)
        assert "not answering" in out
        assert not (tmp_path / "runs" / "outage" / "mlflow-outbox.jsonl").exists()  # all of it reached the server
        client, run = the_run(uri, "outage")
        assert run.info.status == "FINISHED"
        assert_whole_and_equal(client, run, reference)
        for key in ("lr", "grad_norm", "tokens_per_s"):
            assert steps_of(client, run, key) == list(range(1, STEPS + 1)), key
    finally:
        stop_server(server)
