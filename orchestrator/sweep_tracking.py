"""The sweep's MLflow parent run: the sweep config as params, exploit events as metrics and tags, the
lineage, the schedules and their plots as artifacts, and the best trial's final model (a LoggedModel,
orchestrator.model_logging). Each trial's trainer logs its own child run (tagged mlflow.parentRunId) through the
launcher, as `flotilla train` does, but no model.

The orchestrator hands it to tune.sweep.run_sweep (`track`), as it hands over the launcher: tune never
imports MLflow. Like a run's tracker, nothing here raises into the sweep when MLflow does not answer: the
sweep's records are on disk beside its checkpoints either way (lineage.json).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow.entities import Metric

from orchestrator.mlflow_client import RUN_NAME_TAG, TrackingClient, loggable_params
from orchestrator.model_logging import log_model_or_warn, model_name
from tune.lineage import full_schedule, merge_schedule, plot_lineage, plot_schedules


class SweepRun:
    """One sweep's parent run: `start()`, `finish_records(...)` once the population is done, `close(status)`."""

    def __init__(self, config: Any, name: str):
        self.config, self.name = config, name
        self.mlflow = TrackingClient("the sweep goes on; its records are kept in lineage.json beside its checkpoints")
        self.tracking_uri = self.mlflow.uri
        self.run_id: str | None = None

    def start(self) -> str | None:
        """Create the parent run; returns its id, or None if MLflow does not answer."""
        def open_run():
            experiment_id = self.mlflow.experiment_id(self.config.tracking.experiment)
            run = self.mlflow.client.create_run(experiment_id, run_name=self.name, tags={
                RUN_NAME_TAG: self.name, "flotilla.sweep": self.name, "flotilla.kind": "sweep",
                "flotilla.scheduler": self.config.tune.scheduler})
            self.mlflow.log_batch(run.info.run_id, params=loggable_params(self.config.model_dump(mode="json")))
            self.run_id = run.info.run_id

        self.mlflow.attempt("create the sweep's parent run", open_run)
        return self.run_id

    def finish_records(self, segments, lineage, timings, best: str, finals: dict[str, float], crashed: set[str],
                       out_dir: Path, keys: list[str]) -> None:
        if self.run_id is None:
            return
        run_id, client = self.run_id, self.mlflow.client
        metrics = []
        for i, r in enumerate(lineage):
            # Exploit events: one point per exploit at its step (value = the donor's score it copied), and a
            # tag per event with who copied whom and the old -> new values.
            metrics.append(Metric(f"exploit/{r.recipient}", r.donor_score, 0, r.step))
            metrics.append(Metric("exploit/count", i + 1, 0, r.step))
        for s in segments:
            if s.score is not None:
                metrics.append(Metric(f"score/{s.trial}", s.score, 0, s.stop))
        # where the sweep's time went (timings.json's figures: trial-seconds but for wall_s)
        metrics += [Metric(f"sweep/{key}", float(value), 0, 0) for key, value in timings.summary().items()]
        metrics += [Metric("sweep/exploits", len(lineage), 0, 0), Metric("sweep/best_score", finals[best], 0, 0)]
        tags = {"flotilla.best_trial": best, "flotilla.crashed_trials": ",".join(sorted(crashed)) or "none"}
        for r in lineage:
            change = ", ".join(f"{k}: {r.old.get(k)!r} -> {v!r} ({r.operations.get(k, '')})" for k, v in r.new.items())
            tags[f"exploit.step{r.step:06d}.{r.recipient}"] = f"copied {r.donor} (score {r.donor_score:.4f} vs {r.recipient_score:.4f}); {change}"[:4900]

        def log_all():
            self.mlflow.log_batch(run_id, metrics=metrics, tags=tags)
            client.log_artifact(run_id, str(out_dir / "lineage.json"))
            if (out_dir / "timings.json").exists():
                client.log_artifact(run_id, str(out_dir / "timings.json"))
            client.log_text(run_id, json.dumps(merge_schedule(full_schedule(best, segments, lineage)), indent=1),
                            "best_schedule.json")
            with tempfile.TemporaryDirectory() as tmp:
                plot_schedules(segments, keys, Path(tmp) / "hparam_schedules.png")
                plot_lineage(segments, lineage, Path(tmp) / "lineage.png")
                client.log_artifact(run_id, str(Path(tmp) / "hparam_schedules.png"))
                client.log_artifact(run_id, str(Path(tmp) / "lineage.png"))

        self.mlflow.attempt("log the sweep's records", log_all)

    def log_best_model(self, checkpoint: str | None, step: int, trial: str) -> str | None:
        """The best trial's model (its checkpoint at the sweep's last step) on the parent run, named after the
        trial, unless tracking.log_models is none; returns its model id, or None. Never raises."""
        if self.run_id is None or checkpoint is None or self.config.tracking.log_models == "none":
            return None
        model_id = log_model_or_warn(self.run_id, checkpoint, step, model_name(trial),
                                     tags={"flotilla.sweep": self.name, "flotilla.trial": trial})
        if model_id is not None:
            print(f"flotilla: MLflow model {model_name(trial)} (best trial, step {step}): models:/{model_id}", flush=True)
        return model_id

    def close(self, status: str) -> None:
        if self.run_id is not None:
            self.mlflow.attempt("close the sweep's run", lambda: self.mlflow.client.set_terminated(self.run_id, status))
