"""What a training run records in MLflow: every config key as a param, tags naming its layout, engine,
storage, code revision and Ray job, its resolved config and plan as artifacts, and its training data as the
run's dataset input (orchestrator.tracking sends them)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import yaml
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from orchestrator.config import Config
from orchestrator.jobs import JOB_ID_ENV
from orchestrator.mlflow_client import loggable_params
from orchestrator.plan import format_plan, make_plan
from orchestrator.tracking import Tracker
from trainers.corpus import SPLITS, read_dataset_info
from trainers.parallel.mesh import ParallelDims
from trainers.token_files import split_file


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
                   system_metrics_interval=config.tracking.system_metrics_interval if config.tracking.system_metrics else None,
                   dataset=dataset_input(config))


def dataset_input(config: Config) -> DatasetInput:
    """The run's training data as an MLflow dataset input (context "training"), from what the driver knows without
    reading tokens: a dataset directory (data.source parquet, or stdlib once orchestrator.data built its cache)
    by its meta.json, as a "local" source; synthetic data by the settings that generate it, as a "code" source.
    The digest is a hash of those, so the same data gets the same digest wherever and whenever it was built."""
    d = config.data
    if d.source == "synthetic":
        # what trainers.data.synthetic_split draws from: the same settings give the same documents
        recipe = {"generator": "trainers.data.synthetic_split", "docs": d.synthetic_docs, "mean_len": d.synthetic_mean_len,
                  "val_fraction": d.val_fraction, "vocab_size": config.model.vocab_size, "seq_len": config.train.seq_len,
                  "seed": config.train.seed}
        name, source_type, source, profile = "synthetic", "code", {"tags": recipe}, dict(recipe)
        fingerprint = recipe
    else:
        info = read_dataset_info(d.path)
        meta = json.loads((Path(info.path) / "meta.json").read_text())
        meta.pop("created", None)  # a rebuild of the same files is the same data
        sizes = {s: split_file(info.path, s).stat().st_size for s in SPLITS if split_file(info.path, s).is_file()}
        name, source_type, source = Path(info.path).name, "local", {"uri": str(Path(info.path).absolute())}
        profile = {"tokenizer": info.tokenizer, "vocab_size": info.vocab_size, "train_docs": info.train_docs,
                   "train_tokens": info.train_tokens, "val_docs": info.val_docs, "val_tokens": info.val_tokens,
                   **({"text_from": meta["root"]} if "root" in meta else {})}
        fingerprint = {"meta": meta, "split_bytes": sizes}
    if d.train_tokens is not None:
        profile["train_tokens_used"] = d.train_tokens
        fingerprint = {**fingerprint, "train_tokens": d.train_tokens}
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:10]
    dataset = Dataset(name=name, digest=digest, source_type=source_type, source=json.dumps(source),
                      profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])
