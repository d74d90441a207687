"""How Flotilla talks to MLflow, for a run (orchestrator.tracking) and a sweep (orchestrator.sweep_tracking)
alike: params made from a config with secrets redacted, batches cut to MLflow's limits, and calls that
never raise into training (an outage is said once, in one warning).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

# MLflow retries an unreachable server for minutes by default; a training driver must not wait that long.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

log = logging.getLogger("flotilla.tracking")

RUN_NAME_TAG = "flotilla.run_name"
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
"""MLflow 3's UI opens an experiment by this tag: "custom_model_development" in its training view (runs, metric
charts, models), "genai_development" in its GenAI view (traces). Its other values (from the UI's bundle): finetuning,
forecasting, classification, regression, automl, and the UI's own guesses, "..._inferred" and "no_inferred_type"."""
# MLflow's log_batch limits: 1000 metrics, 100 params, 100 tags per call.
METRICS_PER_CALL, PARAMS_PER_CALL, TAGS_PER_CALL = 1000, 100, 100
# MLflow's limit on a param value's length.
PARAM_VALUE_MAX = 6000

# A param whose name holds one of these words (`tracking.api_token`, `env.AWS_SECRET_ACCESS_KEY`, `hfToken`) is
# logged as REDACTED. Whole words, so `data.tokenizer` and `train.tokens_per_step` stay visible.
SECRET_WORDS = frozenset({"token", "key", "apikey", "password", "passwd", "secret", "credential", "credentials"})
REDACTED = "[redacted]"


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


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


class TrackingClient:
    """An MlflowClient on the current tracking URI, with what runs and sweeps both need of it.

    `while_down` ends the one warning an outage gives: what goes on meanwhile (e.g. "training goes on")."""

    def __init__(self, while_down: str):
        self.uri = tracking_uri()
        self.client = MlflowClient(self.uri)
        self.while_down = while_down
        self.warned = False

    def attempt(self, what: str, action: Callable[[], Any]) -> bool:
        """Run `action` (MLflow calls); False if it failed. Never raises: an unreachable or failing tracking
        server must leave training and sweeps running. The first failure is logged, the rest are not."""
        try:
            action()
            return True
        except Exception as err:
            if not self.warned:
                log.warning("MLflow at %s is not answering (%s): could not %s; %s", self.uri,
                            str(err).splitlines()[0][:200] if str(err) else type(err).__name__, what, self.while_down)
                self.warned = True
            return False

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created if there is none yet, marked as a model-training experiment unless
        someone set its kind by hand (EXPERIMENT_KIND_TAG). Raises if MLflow does not answer."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
        kind = experiment.tags.get(EXPERIMENT_KIND_TAG, "")
        if kind in ("", "no_inferred_type") or kind.endswith("_inferred"):
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        return experiment.experiment_id

    def log_batch(self, run_id: str, metrics: list[Metric] = (), params: dict[str, str] | None = None,
                  tags: dict[str, str] | None = None) -> None:
        """Log them all, in as many calls as MLflow's per-call limits need. Raises if MLflow does not answer."""
        params = [Param(k, v) for k, v in (params or {}).items()]
        tags = [RunTag(k, v) for k, v in (tags or {}).items()]
        for items, per_call, field in ((params, PARAMS_PER_CALL, "params"), (tags, TAGS_PER_CALL, "tags"),
                                       (list(metrics), METRICS_PER_CALL, "metrics")):
            for i in range(0, len(items), per_call):
                self.client.log_batch(run_id, **{field: items[i : i + per_call]})
