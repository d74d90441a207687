"""What a training run records in MLflow: every config key as a param, tags naming its layout, engine,
storage, code revision and Ray job, and its resolved config and plan as artifacts (orchestrator.tracking
sends them)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from orchestrator.config import Config
from orchestrator.jobs import JOB_ID_ENV
from orchestrator.mlflow_client import loggable_params
from orchestrator.plan import format_plan, make_plan
from orchestrator.tracking import Tracker
from trainers.parallel.mesh import ParallelDims


def git_revision() -> str | None:
    """The revision of the Flotilla code that runs (its checkout, not the working directory's)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def run_tracker(config: Config, run_name: str, tags: dict[str, str]) -> Tracker:
    """The tracker of run `run_name` of `config` (its paths already absolute); `tags` are added to its own.
    Metrics MLflow could not take go to an outbox under the run's storage."""
    storage = Path(config.checkpoint.dir)
    dims = ParallelDims.from_config(config.parallel, config.cluster.num_workers)
    tags = {"flotilla.layout": dims.layout(), "flotilla.engine": config.parallel.engine,
            "ray.run_name": run_name, "flotilla.storage": str(storage / run_name), **tags}
    if rev := git_revision():
        tags["git.revision"] = rev
    if job := os.environ.get(JOB_ID_ENV):
        tags["ray.job_id"] = job
    resolved = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return Tracker(config.tracking.experiment, run_name, loggable_params(config.model_dump(mode="json")), tags,
                   {"config.yaml": resolved, "plan.txt": format_plan(make_plan(config))},
                   outbox=storage / run_name / "mlflow-outbox.jsonl",
                   system_metrics_interval=config.tracking.system_metrics_interval if config.tracking.system_metrics else None)
