"""The sweep's MLflow parent run: the sweep config as params, exploit events as metrics and tags, and the
lineage, the schedules and their plots as artifacts. Each trial's trainer logs its own child run (tagged
mlflow.parentRunId) through the launcher, exactly as `flotilla train` does.

Like the orchestrator's tracker, nothing here raises into the sweep when MLflow does not answer: the
sweep's records are on disk beside its checkpoints either way (lineage.json).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("flotilla.tune")

# A param whose name holds one of these words (`tracking.api_token`, `env.AWS_SECRET_ACCESS_KEY`, `hfToken`) is
# logged as REDACTED. Whole words, so `data.tokenizer` and `train.tokens_per_step` stay visible.
SECRET_WORDS = frozenset({"token", "key", "apikey", "password", "passwd", "secret", "credential", "credentials"})
REDACTED = "[redacted]"
# MLflow's limit on a param value's length.
PARAM_VALUE_MAX = 6000


def is_secret(name: str) -> bool:
    """`name` is a dotted param name; its words are split at non-letters and at camelCase humps."""
    words = re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name)
    return any(word.lower() in SECRET_WORDS for word in words)


def loggable_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'train': {'steps': 5}} -> {'train.steps': '5'}: every config key becomes one MLflow param, with the
    value of any secret-named key redacted. The one place params are made, for runs and sweeps alike."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= loggable_params(value, f"{name}.")
        else:
            out[name] = REDACTED if is_secret(name) else str(value)[:PARAM_VALUE_MAX]
    return out


class SweepRun:
    def __init__(self, config: Any, name: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.config, self.name = config, name
        self.tracking_uri = mlflow.get_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)
        self.run_id: str | None = None

    def _guard(self, what: str, action) -> Any:
        try:
            return action()
        except Exception as err:  # a tracking outage must not stop the sweep
            log.warning("MLflow at %s: could not %s (%s)", self.tracking_uri, what, str(err).splitlines()[0][:200])
            return None

    def start(self) -> str | None:
        def open_run():
            from mlflow.entities import Param

            exp = self.client.get_experiment_by_name(self.config.tracking.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(self.config.tracking.experiment)
            run = self.client.create_run(exp_id, run_name=self.name, tags={
                "flotilla.run_name": self.name, "flotilla.sweep": self.name, "flotilla.kind": "sweep",
                "flotilla.scheduler": self.config.tune.scheduler})
            params = [Param(k, v) for k, v in loggable_params(self.config.model_dump(mode="json")).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(run.info.run_id, params=params[i:i + 100])
            return run.info.run_id

        self.run_id = self._guard("create the sweep's parent run", open_run)
        return self.run_id

    def finish_records(self, segments, lineage, timings, best: str, finals: dict[str, float], crashed: set[str],
                       out_dir: Path, keys: list[str]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        from tune.lineage import full_schedule, merge_schedule, plot_lineage, plot_schedules

        run_id, client = self.run_id, self.client
        metrics = []
        for i, r in enumerate(lineage):
            # Exploit events: one point per exploit at its step (value = the donor's score it copied), and a
            # tag per event with who copied whom and the old -> new values.
            metrics.append(Metric(f"exploit/{r.recipient}", r.donor_score, 0, r.step))
            metrics.append(Metric("exploit/count", i + 1, 0, r.step))
        for s in segments:
            if s.score is not None:
                metrics.append(Metric(f"score/{s.trial}", s.score, 0, s.stop))
        metrics += [Metric("sweep/wall_s", timings.wall_s, 0, 0), Metric("sweep/exploit_s", timings.exploit_s, 0, 0),
                    Metric("sweep/exploit_fraction", timings.exploit_fraction, 0, 0),
                    Metric("sweep/copy_s", timings.copy_s, 0, 0),
                    Metric("sweep/restore_after_exploit_s", timings.restore_after_exploit_s, 0, 0),
                    Metric("sweep/exploits", len(lineage), 0, 0), Metric("sweep/best_score", finals[best], 0, 0)]
        tags = {"flotilla.best_trial": best, "flotilla.crashed_trials": ",".join(sorted(crashed)) or "none"}
        for r in lineage:
            change = ", ".join(f"{k}: {r.old.get(k)!r} -> {v!r} ({r.operations.get(k, '')})" for k, v in r.new.items())
            tags[f"exploit.step{r.step:06d}.{r.recipient}"] = f"copied {r.donor} (score {r.donor_score:.4f} vs {r.recipient_score:.4f}); {change}"[:4900]

        def log_all():
            from mlflow.entities import RunTag

            for i in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[i:i + 1000])
            items = [RunTag(k, v) for k, v in tags.items()]
            for i in range(0, len(items), 100):
                client.log_batch(run_id, tags=items[i:i + 100])
            client.log_artifact(run_id, str(out_dir / "lineage.json"))
            client.log_text(run_id, json.dumps(merge_schedule(full_schedule(best, segments, lineage)), indent=1),
                            "best_schedule.json")
            with tempfile.TemporaryDirectory() as tmp:
                plot_schedules(segments, keys, Path(tmp) / "hparam_schedules.png")
                plot_lineage(segments, lineage, Path(tmp) / "lineage.png")
                client.log_artifact(run_id, str(Path(tmp) / "hparam_schedules.png"))
                client.log_artifact(run_id, str(Path(tmp) / "lineage.png"))

        self._guard("log the sweep's records", log_all)

    def close(self, status: str) -> None:
        if self.run_id is not None:
            self._guard("close the sweep's run", lambda: self.client.set_terminated(self.run_id, status))
