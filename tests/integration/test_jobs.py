"""`flotilla submit / status / logs / stop` against a real two-node Ray cluster on loopback, with token
authentication on, through the Jobs API; the job's run is read back from a real MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml
from mlflow.tracking import MlflowClient

from orchestrator import local_cluster

from tests.distributed.spawn import free_port

# Two workers of one CPU on nodes of one CPU each: the run spans both nodes.
CONFIG = {
    "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
    "data": {"source": "synthetic", "synthetic_docs": 300, "synthetic_mean_len": 24},
    "train": {"steps": 4, "micro_batch_size": 4, "seq_len": 32, "val_every": 2, "val_batches": 2},
    "cluster": {"num_workers": 2},
    "tracking": {"experiment": "jobs", "system_metrics": False},
}


def write_config(tmp_path: Path, **sections) -> None:
    config = {**CONFIG, **sections, "checkpoint": {"dir": str(tmp_path / "runs")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))


def client_env(cluster, tmp_path: Path, **extra) -> dict[str, str]:
    """A client that holds the cluster's token in RAY_AUTH_TOKEN alone (no RAY_AUTH_MODE): Flotilla sends it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return {**env, "RAY_AUTH_TOKEN": cluster.token, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **extra}


def jobs_api(cluster):
    """Ray's own client, for polling without starting a `flotilla` process (and importing torch) each time."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {cluster.token}"})


def flotilla(args, env, cwd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=cwd, text=True,
                          capture_output=True, timeout=timeout)


def test_submit_wait_succeeds_and_tags_the_run_with_the_job_id(ray_cluster, tmp_path):
    write_config(tmp_path)
    env = client_env(ray_cluster, tmp_path)
    proc = flotilla(["submit", "run.yaml", "--address", ray_cluster.dashboard_url, "--wait",
                     "-o", "tracking.run_name=job1"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = proc.stdout.splitlines()[0]
    assert job_id == "flotilla-job1"
    assert "step 4/4" in proc.stdout and "finished job1" in proc.stdout and "job flotilla-job1 SUCCEEDED" in proc.stdout

    status = flotilla(["status", job_id, "--address", ray_cluster.dashboard_url], env, tmp_path)
    assert status.stdout.strip() == "SUCCEEDED"
    logs = flotilla(["logs", job_id, "--address", ray_cluster.dashboard_url], env, tmp_path).stdout
    assert "step 4/4" in logs

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("jobs").experiment_id], "tags.`flotilla.run_name` = 'job1'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray.job_id"] == job_id
    assert ray_cluster.token not in str(run.data.params)


def test_a_run_no_node_can_hold_fails_fast_naming_the_resource(ray_cluster, tmp_path):
    """No node has `node_c`: the job fails at once, instead of waiting forever for its workers' placement."""
    write_config(tmp_path, cluster={"num_workers": 2, "resources": {"node_c": 1}})
    proc = flotilla(["submit", "run.yaml", "--address", ray_cluster.dashboard_url, "--wait",
                     "-o", "tracking.run_name=nowhere"], client_env(ray_cluster, tmp_path), tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "job flotilla-nowhere FAILED" in proc.stderr
    assert "each worker needs node_c = 1, and no node has it at all" in proc.stdout
    # From the job's start to its end, by the cluster's clock: importing torch and connecting take most of it.
    info = jobs_api(ray_cluster).get_job_info("flotilla-nowhere")
    took = (info.end_time - info.start_time) / 1000
    assert took < 30, f"the job took {took:.0f}s to fail"


def test_tensor_parallel_groups_that_no_node_can_hold_whole_fail_fast(ray_cluster, tmp_path):
    """Two 1-CPU nodes hold the two workers only one per node: a tp = 2 group would span them."""
    write_config(tmp_path, parallel={"tp": 2})
    proc = flotilla(["submit", "run.yaml", "--address", ray_cluster.dashboard_url, "--wait",
                     "-o", "tracking.run_name=split"], client_env(ray_cluster, tmp_path), tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parallel.tp = 2 keeps each tensor-parallel group of 2 workers on one node" in proc.stdout
    assert "only 0 of the 2 workers" in proc.stdout


def test_tensor_parallel_groups_train_within_their_nodes(ray_cluster, tmp_path):
    """Four half-CPU workers, tp = 2 x dp_shard = 2, on two nodes: ranks 0-1 on one node, 2-3 on the other
    (the workers refuse to train otherwise, trainers.parallel.mesh.check_tp_within_nodes)."""
    write_config(tmp_path, parallel={"tp": 2}, cluster={"num_workers": 4, "cpus_per_worker": 0.5})
    env = client_env(ray_cluster, tmp_path)
    proc = flotilla(["submit", "run.yaml", "--address", ray_cluster.dashboard_url, "--wait",
                     "-o", "tracking.run_name=tp2"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 4/4" in proc.stdout and "job flotilla-tp2 SUCCEEDED" in proc.stdout


def test_stop_ends_a_running_job(ray_cluster, tmp_path):
    write_config(tmp_path, train={**CONFIG["train"], "steps": 100_000})
    env = client_env(ray_cluster, tmp_path)
    address = ray_cluster.dashboard_url
    submitted = flotilla(["submit", "run.yaml", "--address", address, "-o", "tracking.run_name=long"], env, tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    api = jobs_api(ray_cluster)
    deadline = time.monotonic() + 180
    while len([p for p in local_cluster.processes(ray_cluster.root) if _is_training(p, "ray::RayTrainWorker")]) < 2:
        assert time.monotonic() < deadline, f"no 2 training workers after 3 min; logs:\n{api.get_job_logs(job_id)[-3000:]}"
        time.sleep(1)
    assert flotilla(["status", job_id, "--address", address], env, tmp_path).stdout.strip() == "RUNNING"
    stopped = flotilla(["stop", job_id, "--address", address], env, tmp_path)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped", stopped.stderr

    deadline = time.monotonic() + 60
    while (status := api.get_job_status(job_id).value) != "STOPPED":
        assert time.monotonic() < deadline, f"status {status} a minute after stop"
        time.sleep(1)
    assert flotilla(["status", job_id, "--address", address], env, tmp_path).stdout.strip() == "STOPPED"
    # The run's Ray Train workers and controller end with the job's driver.
    deadline = time.monotonic() + 30
    while training := [p for p in local_cluster.processes(ray_cluster.root) if _is_training(p)]:
        assert time.monotonic() < deadline, f"still running after stop: {[p.name() for p in training]}"
        time.sleep(1)


def _is_training(proc, kinds=("ray::RayTrainWorker", "ray::TrainController")) -> bool:
    try:
        return proc.cmdline()[0].startswith(kinds)
    except (psutil.Error, IndexError):
        return False


def test_missing_or_wrong_token_says_what_to_set(ray_cluster, tmp_path):
    env = client_env(ray_cluster, tmp_path)
    del env["RAY_AUTH_TOKEN"]
    missing = flotilla(["status", "flotilla-job1", "--address", ray_cluster.dashboard_url], env, tmp_path)
    assert missing.returncode == 1
    assert "uses token authentication and no token was given: set RAY_AUTH_TOKEN" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr

    wrong = flotilla(["status", "flotilla-job1", "--address", ray_cluster.dashboard_url],
                     {**env, "RAY_AUTH_TOKEN": "not-the-token"}, tmp_path)
    assert wrong.returncode == 1
    assert "refused the token from RAY_AUTH_TOKEN: set RAY_AUTH_TOKEN" in wrong.stderr, wrong.stderr


def test_bad_config_is_refused_before_submission(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**CONFIG, "train": {"steps": 0}}))
    # No cluster at this address: the config is checked before anything is sent.
    proc = flotilla(["submit", "run.yaml", "--address", f"http://127.0.0.1:{free_port()}"], os.environ, tmp_path)
    assert proc.returncode == 2 and "train.steps = 0" in proc.stderr
