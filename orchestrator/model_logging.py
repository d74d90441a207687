"""Trained models in MLflow as MLflow 3 shows them: each one a LoggedModel in the transformers flavor, found in the
experiment's Models tab and by `mlflow.search_logged_models`, linked to the run that made it at its step (the run's
metrics at that step become the model's), and loaded by MLflow's own loader:

    pipeline = mlflow.transformers.load_model(f"models:/{model_id}")   # a text-generation pipeline
    model = pipeline.model                                               # LlamaForCausalLM

A checkpoint is exported (trainers.export.export_hf) into a temporary directory, loaded back and logged from there,
so the logged model is the exported one, weight for weight. tracking.log_models says which: the final model of a
run (launch.run_training), each persisted checkpoint too (the report relay hands them over), or none; a sweep logs
its best trial's final model on its parent run (orchestrator.sweep_tracking).

Like the rest of tracking, nothing here raises into training: an unreachable MLflow is said once, in one warning,
and a checkpoint that does not export is said with its error; the checkpoints stay on disk either way.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from orchestrator.tracking import Tracker

log = logging.getLogger("flotilla.tracking")

TASK = "text-generation"
"""The transformers pipeline task the models are logged for (what mlflow.transformers.load_model builds)."""
STEP_TAG, CHECKPOINT_TAG = "flotilla.step", "flotilla.checkpoint"
"""Tags of each logged model: the training step of its weights and the checkpoint directory they came from."""
MODEL_CARD = """---
library_name: transformers
pipeline_tag: text-generation
---
# {name}

Trained by Flotilla: a Llama-style decoder at step {step}, exported from the checkpoint {checkpoint}.
"""
"""The model card logged with each model. Given, MLflow does not fetch one from the HuggingFace Hub."""


def model_name(run_name: str, step: int | None = None) -> str:
    """A run's final model is named after the run; a checkpoint's, after the run and its step. MLflow refuses
    '/', ':', '.', '%' and quotes in model names: they become '-'."""
    name = run_name if step is None else f"{run_name}-step-{step}"
    return re.sub(r"""[/:.%"']""", "-", name)


def _pip_requirements() -> list[str]:
    """What loading the model needs, pinned to what runs here (MLflow adds itself). Given rather than inferred:
    MLflow's inference loads the model in a subprocess (seconds), and its default list wants torchvision."""
    pinned = []
    for package in ("transformers", "torch", "tokenizers", "safetensors"):
        try:
            pinned.append(f"{package}=={version(package).split('+')[0]}")  # '2.13.0+cpu': no such wheel on PyPI
        except PackageNotFoundError:
            continue
    return pinned


def log_hf_model(run_id: str, checkpoint: str | Path, step: int, name: str, tags: dict[str, str] | None = None) -> str:
    """Export `checkpoint` (a Flotilla checkpoint directory, or a run directory: its newest) and log it as the
    LoggedModel `name` of run `run_id` at `step`, in the run's experiment, with the run's params; returns its
    model id. Raises whatever the export or MLflow raises."""
    import mlflow
    import mlflow.transformers
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.export import export_hf

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory(prefix="flotilla-model-") as tmp, _no_progress_bars():
        exported = export_hf(checkpoint, Path(tmp) / "hf")
        # transformers objects, not the directory's path: MLflow 3.18's path form reads the pipeline class from
        # transformers 4's task registry and fails on 5's (check_task's "impl" is a string there)
        components = {"model": AutoModelForCausalLM.from_pretrained(exported, local_files_only=True),
                      "tokenizer": AutoTokenizer.from_pretrained(exported, local_files_only=True)}
        # Created here rather than by log_model: without an active run, log_model puts the model in the
        # default experiment, not its run's.
        model = client.create_logged_model(
            run.info.experiment_id, name=name, source_run_id=run_id, params=run.data.params,
            tags={STEP_TAG: str(step), CHECKPOINT_TAG: str(checkpoint), **(tags or {})})
        card = ModelCard(MODEL_CARD.format(name=name, step=step, checkpoint=checkpoint))
        mlflow.transformers.log_model(components, name=name, task=TASK, model_id=model.model_id, run_id=run_id,
                                      step=step, model_card=card, pip_requirements=_pip_requirements(),
                                      save_pretrained=True)
    return model.model_id


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' progress bars off (loading, and MLflow's save_pretrained): they would cut into the run's
    progress line, for a model that takes a second."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def log_model_or_warn(run_id: str, checkpoint: str | Path, step: int, name: str, tags: dict[str, str] | None = None,
                      warn: bool = True) -> str | None:
    """log_hf_model that never raises: its model id, or None after a warning (if `warn`) saying what failed."""
    try:
        return log_hf_model(run_id, checkpoint, step, name, tags)
    except Exception as err:  # noqa: BLE001 - a model MLflow did not take must not end a run or a sweep
        if warn:
            log.warning("could not log the model of step %d to MLflow (%s); the checkpoint stays in %s "
                        "(`flotilla export` writes it as a HuggingFace directory)", step, _first_line(err), checkpoint)
        return None


def _first_line(err: BaseException) -> str:
    text = str(err).splitlines()[0][:300] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class ModelLogger:
    """The models of one run, as tracking.log_models (`mode`) asks: `checkpoint(path, step)` for each persisted
    checkpoint as it arrives, `final(path, step)` once the run finished. Each step is logged once; never raises.

    Before a model is logged the tracker sends what it has queued, so the run's metrics at the model's step are in
    MLflow and become the model's own (mlflow.transformers.log_model copies them)."""

    def __init__(self, mode: str, tracker: Tracker, run_name: str, final_step: int):
        self.mode, self.tracker, self.run_name, self.final_step = mode, tracker, run_name, final_step
        self.logged: dict[int, str] = {}
        """Step -> model id of each model this run logged."""
        self.warned = False

    def checkpoint(self, path: str, step: int) -> None:
        # the last step's checkpoint is the final model, logged by `final` under the run's own name
        if self.mode == "every" and step != self.final_step:
            self._log(path, step, model_name(self.run_name, step))

    def final(self, path: str | None, step: int) -> str | None:
        """Log the run's final model (unless tracking.log_models is none); returns its model id, or None."""
        if self.mode == "none" or path is None:
            return None
        model_id = self._log(path, step, model_name(self.run_name))
        if model_id is not None:
            print(f"flotilla: MLflow model {model_name(self.run_name)} (step {step}): models:/{model_id}", flush=True)
        return model_id

    def _log(self, path: str, step: int, name: str) -> str | None:
        if step in self.logged:  # a restarted worker group persists the same step again
            return self.logged[step]
        run_id = self.tracker.run_id
        if run_id is None:  # MLflow did not answer when the run began, nor since: the tracker has said so
            return None
        self.tracker.flush()
        model_id = log_model_or_warn(run_id, path, step, name, warn=not self.warned)
        if model_id is None:
            self.warned = True  # once a run: an MLflow outage fails every checkpoint alike
            return None
        self.logged[step] = model_id
        return model_id
