"""`flotilla sweep` with persistent workers (tune.reuse_workers, on wherever every trial fits at once): one trainer
per trial for the whole sweep, exploits loaded in place. Synchronous and asynchronous PBT, PB2 (with a replay
of its best schedule, which must land on the same loss) and STN, and a trial whose worker is killed mid-sweep.
The same records as the segment-restart sweep (tests/integration/test_sweep.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from orchestrator import local_cluster
from tests.integration.test_sweep import CONFIG, finished_parent_and_children

# Half a CPU per worker: all 3 trials fit the 2-core machine at once, which persistent workers need.
PERSISTENT = {**CONFIG, "cluster": {"num_workers": 1, "cpus_per_worker": 0.5}}
TRIALS = ("t0", "t1", "t2")


def sweep(tmp_path: Path, config: dict, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    env = env or {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                  "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", "sweep.yaml", *args], cwd=tmp_path,
                          env=env, text=True, capture_output=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def assert_kept_its_workers(out: Path, name: str) -> dict:
    """Every trial trained in one trainer, checkpointed at each decision; returns lineage.json."""
    lineage = json.loads((out / "lineage.json").read_text())
    assert len(lineage["segments"]) == 6
    assert json.loads((out / "timings.json").read_text())["reuse_workers"] is True
    for trial in TRIALS:
        assert not list((out / f"{name}-{trial}").glob("segment_*")), "a segment restart happened"
        assert sorted(p.name for p in (out / f"{name}-{trial}").glob("ckpt_*")) == ["ckpt_000002", "ckpt_000004"]
    for exploit in lineage["exploits"]:
        assert (out / exploit["recipient"] / f"exploit_000002_from_{exploit['donor']}").is_dir()
    return lineage


def learning_rates(client, child) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(child.info.run_id, "lr")}


def assert_only_the_recipient_loaded_a_checkpoint(client, children, recipient: str) -> None:
    """The recipient loaded the donor's checkpoint (its restore time is reported with its first report after
    the exploit, at step 4); the other trials went on in place and loaded nothing."""
    for child in children:
        loads = [m.step for m in client.get_metric_history(child.info.run_id, "pbt/restore_s")]
        assert loads == ([4] if child.info.run_name == recipient else []), child.info.run_name


@pytest.mark.slow  # 89 s on the 2-core machine (3 trials at once on 0.5 CPU each); async below covers the default suite
def test_persistent_synch_pbt_exploits_in_place_with_one_trainer_per_trial(tmp_path):
    stdout = sweep(tmp_path, PERSISTENT, "-o", "tracking.run_name=ps")
    assert "segment restarts" not in stdout
    lineage = assert_kept_its_workers(tmp_path / "runs" / "ps", "ps")
    (exploit,) = lineage["exploits"]  # 3 trials, quantile 1: the worst copies the best at step 2
    assert exploit["step"] == 2 and exploit["recipient"] != exploit["donor"]

    client, _, children = finished_parent_and_children(f"sqlite:///{tmp_path / 'mlflow.db'}", "ps")
    recipient = next(c for c in children if c.info.run_name == exploit["recipient"])
    # after the exploit the recipient trained on with the donor's explored learning rate
    lrs = learning_rates(client, recipient)
    assert lrs[3] == lrs[4] == pytest.approx(exploit["new"]["optim.lr"]) != lrs[2]
    assert_only_the_recipient_loaded_a_checkpoint(client, children, exploit["recipient"])


@pytest.mark.slow  # two workers per trial: 6 Ray Train workers on the 2 cores
def test_persistent_trials_of_two_workers_share_each_decision_across_their_ranks(tmp_path):
    """Synchronous PBT with 2 data-parallel workers per trial: rank 0 checks in and waits for the generation, the
    other rank waits for rank 0's decision through the population actor (no collective held while waiting),
    both write their part of every segment-end checkpoint, and the recipient's ranks both load the donor's copy
    and go on with its explored learning rate (the ranks stay in step: the loss is all-reduced every step)."""
    config = {**PERSISTENT, "cluster": {"num_workers": 2, "cpus_per_worker": 0.25}}
    stdout = sweep(tmp_path, config, "-o", "tracking.run_name=p2", timeout=400)
    assert "persistent workers" in stdout
    lineage = assert_kept_its_workers(tmp_path / "runs" / "p2", "p2")
    (exploit,) = lineage["exploits"]
    client, _, children = finished_parent_and_children(f"sqlite:///{tmp_path / 'mlflow.db'}", "p2")
    recipient = next(c for c in children if c.info.run_name == exploit["recipient"])
    lrs = learning_rates(client, recipient)
    assert lrs[3] == lrs[4] == pytest.approx(exploit["new"]["optim.lr"]) != lrs[2]
    assert_only_the_recipient_loaded_a_checkpoint(client, children, exploit["recipient"])


# 64 s on 2 cores: the default suite's sweep with persistent workers (the default wherever every trial fits)
def test_persistent_async_pbt_decides_each_trial_on_arrival(tmp_path):
    """Asynchronous PBT: each trial is decided as it checks in, against whoever has checked in so far, so which
    trial exploits (if any) depends on the order they arrive in; what must hold is that no trial waits for a
    generation, every exploit is loaded in place and the recipient goes on with its explored values."""
    config = {**PERSISTENT, "tune": {**PERSISTENT["tune"], "synch": False}}
    stdout = sweep(tmp_path, config, "-o", "tracking.run_name=pa")
    out = tmp_path / "runs" / "pa"
    lineage = assert_kept_its_workers(out, "pa")
    assert len(lineage["exploits"]) <= 2 and all(e["step"] == 2 for e in lineage["exploits"])
    # a decision is a call to the population actor, not a wait for the others (synch: seconds per trial)
    timings = json.loads((out / "timings.json").read_text())
    assert timings["wait_s"] < 1.0
    assert "time over 6 segments (trial-s): training" in stdout and "s per segment; persistent workers" in stdout

    client, parent, children = finished_parent_and_children(f"sqlite:///{tmp_path / 'mlflow.db'}", "pa")
    # where the time went, in the parent run as in timings.json
    for key in ("train_s", "startup_s", "wait_s", "overhead_per_segment_s", "segments"):
        assert parent.data.metrics[f"sweep/{key}"] == pytest.approx(timings[key]), key
    assert "timings.json" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    for exploit in lineage["exploits"]:
        recipient = next(c for c in children if c.info.run_name == exploit["recipient"])
        assert learning_rates(client, recipient)[3] == pytest.approx(exploit["new"]["optim.lr"])


@pytest.mark.slow  # 93 s on 2 cores: a PB2 sweep with persistent workers, then a 2-part replay
def test_persistent_pb2_then_replay_reproduces_the_best_trial(tmp_path):
    """PB2 with persistent workers, then `--replay` of the best trial's schedule as one plain run that restarts
    at every stretch: trials that went on in place (nothing reloaded) must have trained exactly as one that
    reloads its checkpoint, so the replay lands on the best trial's final validation loss."""
    config = {**PERSISTENT, "tune": {**PERSISTENT["tune"], "scheduler": "pb2"}}
    sweep(tmp_path, config, "-o", "tracking.run_name=pb")
    lineage = assert_kept_its_workers(tmp_path / "runs" / "pb", "pb")
    (exploit,) = lineage["exploits"]
    assert set(exploit["operations"].values()) == {"pb2 ucb"} and exploit["new"] != exploit["old"]
    best = lineage["best_trial"]
    best_score = next(s["score"] for s in lineage["segments"] if s["trial"] == best and s["stop"] == 4)

    out = sweep(tmp_path, config, "--replay", "runs/pb/lineage.json", "-o", "tracking.run_name=again")
    assert "replayed runs/pb/lineage.json as run again" in out
    client, _, _ = finished_parent_and_children(f"sqlite:///{tmp_path / 'mlflow.db'}", "pb")
    (replayed,) = client.search_runs([client.get_experiment_by_name("it-sweep").experiment_id],
                                     "tags.`flotilla.run_name` = 'again'")
    assert replayed.data.metrics["val_loss"] == pytest.approx(best_score, rel=1e-5)


# 62 s on 2 cores
def test_persistent_stn_sweep_rebuilds_in_place_for_an_explored_stn_setting(tmp_path):
    """STN trials with PBT over the STN's hyper learning rate: an exploit changes an STN setting, which the
    trainee is built with, so the recipient rebuilds in its own worker and loads the donor's weights and
    hyperparameters (the STN's learned dropout rates) before going on."""
    config = {**PERSISTENT, "model": {**PERSISTENT["model"], "dropout_resid": 0.0},
              "tune": {**PERSISTENT["tune"], "scheduler": "stn", "stn": {"hyper_every": 1},
                       "mutations": {"stn.hyper_lr": {"low": 1e-3, "high": 1e-1, "log": True}}}}
    sweep(tmp_path, config, "-o", "tracking.run_name=st")
    lineage = assert_kept_its_workers(tmp_path / "runs" / "st", "st")
    (exploit,) = lineage["exploits"]
    assert exploit["new"]["stn.hyper_lr"] != exploit["old"]["stn.hyper_lr"]

    client, _, children = finished_parent_and_children(f"sqlite:///{tmp_path / 'mlflow.db'}", "st")
    assert_only_the_recipient_loaded_a_checkpoint(client, children, exploit["recipient"])
    for child in children:  # the STN's learned rates went on being reported after the rebuild
        assert [m.step for m in client.get_metric_history(child.info.run_id, "stn/dropout_resid")] == [1, 2, 3, 4]


def trial_workers(cluster, trial: str) -> list[psutil.Process]:
    """The Ray Train workers of one trial: Ray Train runs them in a folder named after the run (the trial)."""
    found = []
    for p in local_cluster.processes(cluster.root):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()) and Path(p.cwd()).name == trial:
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow  # 81 s on 2 cores with the two-node cluster's start: a sweep and a worker-group restart
def test_a_trial_whose_worker_is_killed_restarts_from_its_checkpoint_and_rejoins(ray_cluster, tmp_path):
    """A persistent trial's worker SIGKILLed after the trial checked in its first segment: Ray Train restarts
    its worker group (cluster.max_failures), which continues from the trial's last decision (its own
    checkpoint or the donor's copy) and rejoins the population. The sweep ends with every trial finished,
    the lineage as without the crash (each segment once), and MLflow holding each step once and the restart."""
    steps, every = 30, 10  # long enough segments that the kill lands while the trial is still training
    config = {**PERSISTENT,
              "train": {**PERSISTENT["train"], "steps": steps, "val_every": every, "log_every": 5},
              "cluster": {**PERSISTENT["cluster"], "max_failures": 1},
              "tune": {**PERSISTENT["tune"], "perturbation_interval": every}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_"))}
    env = {**env, **ray_cluster.client_env(), "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", "sweep.yaml", "--address",
                             ray_cluster.gcs_address, "-o", "tracking.run_name=kc"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp_path / "runs" / "kc"
    victim, deadline = "kc-t1", time.monotonic() + 240
    while not (out / victim / f"ckpt_{every:06d}").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = trial_workers(ray_cluster, victim)
    assert len(workers) == 1, [p.cmdline() for p in trial_workers(ray_cluster, victim)]
    os.kill(workers[0].pid, signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, stdout[-5000:]
    assert "worker failure" in stdout

    lineage = json.loads((out / "lineage.json").read_text())
    spans = sorted((s["trial"], s["start"], s["stop"]) for s in lineage["segments"])
    assert spans == [(f"kc-{t}", a, a + every) for t in TRIALS for a in range(0, steps, every)]
    assert len(lineage["exploits"]) == 2 and {e["step"] for e in lineage["exploits"]} == {10, 20}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("it-sweep")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`flotilla.kind` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.tags["flotilla.crashed_trials"] == "none"
    children = {c.info.run_name: c for c in client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert sorted(children) == [f"kc-{t}" for t in TRIALS] and all(c.info.status == "FINISHED" for c in children.values())
    for child in children.values():  # every step once, the restarted trial's too
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == list(range(1, steps + 1))
    restarts = client.get_metric_history(children[victim].info.run_id, "restarts")
    # from the last decision it had acted on: none yet (a kill while it waited at step 10) or step 10's
    assert [m.value for m in restarts] == [1] and restarts[0].step in (0, every, 2 * every)
    assert "restarts" not in children["kc-t0"].data.metrics
