"""README's adaptive SP demo as a newcomer runs it: `flotilla train configs/adaptive-tiny.yaml` on the 2-core
machine it promises (4 workers of half a CPU, the shipped CPU cost model), and its plans mix group degrees
within a step among the first 10, as MLflow records them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~2 min on 2 cores: 4 workers, 10 steps of 8,192 tokens
def test_the_adaptive_demo_runs_and_mixes_degrees_within_a_step_in_its_first_10(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    # From the checkout, as README runs it (the cost model's path is relative to it); only where the run writes
    # moves to tmp_path, and the run is cut to the 10 steps the check reads.
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", "configs/adaptive-tiny.yaml",
                           "-o", "train.steps=10", "-o", "train.val_every=10", "-o", f"checkpoint.dir={tmp_path / 'runs'}",
                           "-o", "tracking.run_name=demo"], cwd=REPO, env=env, text=True, capture_output=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "flotilla: finished" in out, out[-4000:]

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("flotilla-adaptive").experiment_id])
    degrees = {}
    for d in (1, 2, 4):
        for m in client.get_metric_history(run.info.run_id, f"sp/groups_degree_{d}"):
            if m.value > 0:
                degrees.setdefault(m.step, set()).add(d)
    assert sorted(degrees) == list(range(1, 11)), degrees  # every step planned
    mixed = [step for step, used in degrees.items() if len(used) > 1]
    assert mixed, f"no step of the first 10 mixed degrees: {degrees}"
