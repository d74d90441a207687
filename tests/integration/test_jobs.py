"""`flotilla submit / status / logs` against a real Ray head on loopback, through the Jobs API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.distributed.spawn import free_port

CONFIG = {
    "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
    "data": {"source": "synthetic", "synthetic_docs": 300, "synthetic_mean_len": 24},
    "train": {"steps": 4, "micro_batch_size": 4, "seq_len": 32, "val_every": 2, "val_batches": 2},
    "cluster": {"num_workers": 2},
    "tracking": {"experiment": "jobs", "system_metrics": False},
}


@pytest.fixture
def ray_head(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    bin_dir = Path(sys.executable).parent
    dashboard = free_port()
    # The job's entrypoint runs `flotilla`; the head (started from this venv) passes its PATH on.
    start = [str(bin_dir / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(free_port()),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--disable-usage-stats"]
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    yield f"http://127.0.0.1:{dashboard}", env
    subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def flotilla(args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=cwd, text=True,
                          capture_output=True, timeout=300)


def test_submit_status_logs(ray_head, tmp_path):
    address, env = ray_head
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(CONFIG))
    submitted = flotilla(["submit", "run.yaml", "--address", address, "-o", "tracking.run_name=job1"], env, tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id == "flotilla-job1"

    deadline = time.monotonic() + 240
    status = ""
    while time.monotonic() < deadline:
        status = flotilla(["status", job_id, "--address", address], env, tmp_path).stdout.strip()
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = flotilla(["logs", job_id, "--address", address], env, tmp_path).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    assert "step 4/4" in logs and "finished job1" in logs


def test_bad_config_is_refused_before_submission(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**CONFIG, "train": {"steps": 0}}))
    # No cluster at this address: the config is checked before anything is sent.
    proc = flotilla(["submit", "run.yaml", "--address", f"http://127.0.0.1:{free_port()}"], os.environ, tmp_path)
    assert proc.returncode == 2 and "train.steps = 0" in proc.stderr
