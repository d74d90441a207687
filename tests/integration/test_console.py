"""Quiet consoles: `flotilla train` shows Flotilla's lines and errors; Ray's and MLflow's chatter only with
--verbose (orchestrator.console). The real CLI on an embedded Ray, twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import yaml

CONFIG = {
    "model": {"vocab_size": 64, "dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32},
    "data": {"source": "synthetic", "synthetic_docs": 100, "synthetic_mean_len": 20},
    "train": {"steps": 2, "micro_batch_size": 2, "seq_len": 16, "val_every": 2, "val_batches": 1, "log_every": 1},
    "cluster": {"num_workers": 1},
    "tracking": {"experiment": "console", "system_metrics": False},
}
# The shape of Ray's C++ log lines: every Ray Train controller prints one, "[2026-12-04 20:04:50,952 E 8145 8197]
# core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' ... has constructor arguments in the object store".
RAY_CPP_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWE] \d+ \d+\] \w+\.cc:\d+:")
MLFLOW_INFO = "Creating initial MLflow database tables"  # MLflow's INFO line on a new store


def train(tmp_path, *flags: str) -> str:
    tmp_path.mkdir()
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(CONFIG))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_AIR_NEW_OUTPUT", "MLFLOW_LOGGING_LEVEL")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", "run.yaml", *flags], cwd=tmp_path, env=env,
                          text=True, capture_output=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "step 2/2" in out and "flotilla: finished" in out
    return out


def test_ray_and_mlflow_chatter_only_with_verbose(tmp_path):
    quiet = train(tmp_path / "quiet")
    assert not RAY_CPP_LINE.search(quiet) and MLFLOW_INFO not in quiet, quiet[-4000:]
    verbose = train(tmp_path / "verbose", "--verbose")
    assert RAY_CPP_LINE.search(verbose) and MLFLOW_INFO in verbose, verbose[-4000:]
