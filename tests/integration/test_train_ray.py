"""`flotilla train` end to end: the real CLI, an embedded Ray with 2 workers, a real MLflow store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]

CONFIG = {
    "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
    "data": {"source": "synthetic", "synthetic_docs": 300, "synthetic_mean_len": 24},
    "train": {"steps": 8, "micro_batch_size": 4, "seq_len": 32, "val_every": 4, "val_batches": 2, "seed": 1,
              "log_every": 1},
    "optim": {"lr": 1e-2, "warmup_steps": 2},
    "cluster": {"num_workers": 2},
    "checkpoint": {"every": 4},
    "tracking": {"experiment": "it", "system_metrics_interval": 1.0},
}


def flotilla(args: list[str], cwd: Path, uri: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(CONFIG))
    return tmp_path


def run_by_name(uri: str, name: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("it")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`flotilla.run_name` = '{name}'")
    return client, run


def test_train_tracks_everything_in_mlflow(workdir):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    out = finish(flotilla(["train", "run.yaml", "-o", "tracking.run_name=demo"], workdir, uri))
    assert "step 8/8" in out and "MLflow run" in out

    client, run = run_by_name(uri, "demo")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "8" and run.data.params["model.n_kv_heads"] == "2"
    assert run.data.tags["flotilla.layout"] == "dp_shard=2"
    assert "git.revision" in run.data.tags or not (ROOT / ".git").exists()
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == list(range(1, 9))
    assert loss[-1].value < loss[0].value
    assert len(client.get_metric_history(run.info.run_id, "tokens_per_s")) == 8
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [0, 4, 8]
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(workdir))).read_text())
    assert config["train"]["steps"] == 8 and config["cluster"]["num_workers"] == 2
    plan = Path(client.download_artifacts(run.info.run_id, "plan.txt", str(workdir))).read_text()
    assert "dp_shard=2" in plan and "memory per device" in plan


@pytest.mark.slow  # ~215 s on 2 cores (two Ray Train starts); resume itself is in tests/distributed's defaults
def test_stopped_run_resumes_to_the_same_final_loss(workdir):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    finish(flotilla(["train", "run.yaml", "-o", "tracking.run_name=straight"], workdir, uri))

    slow = ["-o", "tracking.run_name=stopped", "-o", "checkpoint.every=3"]
    proc = flotilla(["train", "run.yaml", *slow], workdir, uri)
    seen = ""
    deadline = time.monotonic() + 180
    # Stop once step 4 is reported: the step-3 checkpoint exists, the step-6 one is two report round trips away.
    while "step 4/8" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert "step 4/8" in seen, seen[-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    out = finish(flotilla(["train", "run.yaml", *slow], workdir, uri))
    assert "step 4/8" in out  # it continued after the step-3 checkpoint, not from scratch
    assert "step 1/8" not in out

    client, straight = run_by_name(uri, "straight")
    _, stopped = run_by_name(uri, "stopped")
    assert stopped.info.status == "FINISHED"
    final = lambda run: client.get_metric_history(run.info.run_id, "loss")[-1].value  # noqa: E731
    assert final(stopped) == pytest.approx(final(straight), rel=1e-5)
    val = lambda run: run.data.metrics["val_loss"]  # noqa: E731
    assert val(stopped) == pytest.approx(val(straight), rel=1e-5)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~80 s on 2 cores; an unreachable server losing nothing is also tests/unit/test_tracking.py's
def test_tracking_outage_loses_nothing(workdir):
    down = f"http://127.0.0.1:{closed_port()}"
    out = finish(flotilla(["train", "run.yaml", "-o", "tracking.run_name=offline", "-o", "train.steps=4"], workdir, down))
    assert "not answering" in out and "step 4/4" in out
    outbox = workdir / "runs" / "offline" / "mlflow-outbox.jsonl"
    assert outbox.is_file()

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sync", str(outbox)], cwd=workdir, text=True,
                          capture_output=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr
    client, run = run_by_name(uri, "offline")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert run.data.params["train.steps"] == "4"


LAYOUTS = [  # (overrides, workers, layout tag)
    (["parallel.tp=2", "parallel.dp_shard=1"], 2, "tp=2"),
    (["parallel.tp=2", "parallel.dp_shard=2", "cluster.num_workers=4", "cluster.cpus_per_worker=0.5"], 4,
     "dp_shard=2,tp=2"),
    (["parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.dp_shard=1", "train.grad_accum=2"], 2, "pp=2"),
    (["parallel.engine=deepspeed", "parallel.zero_stage=1"], 2, "dp_shard=2"),
    (["parallel.engine=deepspeed", "parallel.zero_stage=2"], 2, "dp_shard=2"),
    (["parallel.sp=2", "parallel.dp_shard=1"], 2, "sp=2"),
    (["parallel.sp=2", "parallel.sp_mode=ring", "parallel.dp_shard=1"], 2, "sp=2"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "model.n_layers=4", "parallel.dp_shard=1",
      "train.grad_accum=2"], 2, "pp=2"),
    (["parallel.pp=2", "parallel.dp_shard=2", "train.grad_accum=2", "cluster.num_workers=4",
      "cluster.cpus_per_worker=0.5"], 4, "pp=2,dp_shard=2"),
    (["parallel.sp=2", "parallel.dp_shard=2", "cluster.num_workers=4", "cluster.cpus_per_worker=0.5"], 4, "dp_shard=2,sp=2"),
    (["parallel.engine=deepspeed", "parallel.zero_stage=3"], 2, "dp_shard=2"),
    (["parallel.engine=deepspeed", "parallel.zero_stage=1", "parallel.sp=2", "parallel.dp_shard=1"], 2, "sp=2"),
]


@pytest.mark.slow  # about 40 s a layout on 2 cores (Ray start, Ray Train start, 8 steps)
@pytest.mark.parametrize("overrides, workers, layout", LAYOUTS, ids=[" ".join(o) for o, _, _ in LAYOUTS])
def test_layouts_run_through_the_cli_and_are_tagged(workdir, overrides, workers, layout):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    args = ["train", "run.yaml", "-o", "tracking.run_name=layout", "-o", "tracking.system_metrics=false"]
    out = finish(flotilla(args + [a for o in overrides for a in ("-o", o)], workdir, uri))
    assert "step 8/8" in out
    client, run = run_by_name(uri, "layout")
    assert run.data.tags["flotilla.layout"] == layout
    assert run.data.params["cluster.num_workers"] == str(workers)
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 8 and losses[-1] < losses[0]


ADAPTIVE = {
    **CONFIG,
    "model": {**CONFIG["model"], "max_seq_len": 160},
    "data": {**CONFIG["data"], "synthetic_mean_len": 40, "batching": "documents"},
    "train": {**CONFIG["train"], "steps": 4, "tokens_per_step": 400, "max_doc_len": 160, "val_every": 4},
    "parallel": {"sp": 4, "dp_shard": 1, "sp_mode": "adaptive", "adaptive": {"cost_model": "flexsp-7b", "max_tokens_per_device": 48}},
    "cluster": {"num_workers": 4, "cpus_per_worker": 0.5},
    "checkpoint": {"every": 0},
}


@pytest.mark.slow  # ~95 s on 2 cores; the executor itself is in tests/distributed/test_adaptive_sp.py's defaults
def test_adaptive_sp_trains_through_the_cli_and_logs_its_plans(tmp_path):
    (tmp_path / "adaptive.yaml").write_text(yaml.safe_dump(ADAPTIVE))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = finish(flotilla(["train", "adaptive.yaml", "-o", "tracking.run_name=adaptive"], tmp_path, uri))
    assert "step 4/4" in out
    client, run = run_by_name(uri, "adaptive")
    assert run.data.tags["flotilla.layout"] == "sp=4"
    # per step: the plan's estimate next to the measured step time, the planning time, the group degrees
    for key in ("sp/estimated_s", "step_time_s", "sp/planning_ms", "sp/micro_batches", "sp/groups_degree_4"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4], key
    used = {d for d in (1, 2, 4) if any(m.value for m in client.get_metric_history(run.info.run_id, f"sp/groups_degree_{d}"))}
    assert len(used) >= 2  # mixed degrees
    assert "val_loss" in run.data.metrics


@pytest.mark.slow  # ~3 min on 2 cores: two Ray Train runs, 4 workers and 1
def test_adaptive_sp_over_two_domains_trains_as_one_worker_through_the_cli(tmp_path):
    # two SP domains of 2 workers (dp_replicate x sp), the step's documents split between them by the cost model;
    # a small model's cost model (flexsp-7b's 7B model states do not fit a domain of 2), documents cut at what a
    # domain's degree-2 group holds (2 x 48 tokens)
    small = str(ROOT / "tests" / "distributed" / "adaptive_sp_cost.json")
    config = {**ADAPTIVE, "train": {**ADAPTIVE["train"], "max_doc_len": 96},
              "parallel": {"dp_replicate": 2, "sp": 2, "dp_shard": 1, "sp_mode": "adaptive",
                           "adaptive": {"cost_model": small, "max_tokens_per_device": 48}}}
    (tmp_path / "domains.yaml").write_text(yaml.safe_dump(config))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    one = ["-o", "tracking.run_name=one", "-o", "cluster.num_workers=1", "-o", "parallel.dp_replicate=1", "-o",
           "parallel.sp=1", "-o", "parallel.adaptive.max_tokens_per_device=null"]
    for args in (["-o", "tracking.run_name=domains"], one):
        assert "step 4/4" in finish(flotilla(["train", "domains.yaml", *args], tmp_path, uri))
    client, domains = run_by_name(uri, "domains")
    _, single = run_by_name(uri, "one")
    assert domains.data.tags["flotilla.layout"] == "dp_replicate=2,sp=2"
    assert single.data.tags["flotilla.layout"] == "single"
    final = lambda run: client.get_metric_history(run.info.run_id, "loss")[-1].value  # noqa: E731
    assert final(domains) == pytest.approx(final(single), rel=2e-3)
    for key in ("sp/domain_imbalance", "sp/estimated_s", "sp/micro_batches"):
        assert [m.step for m in client.get_metric_history(domains.info.run_id, key)] == [1, 2, 3, 4], key
    assert all(m.value >= 1 for m in client.get_metric_history(domains.info.run_id, "sp/domain_imbalance"))
