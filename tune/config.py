"""The `tune` section: which scheduler, how big a population, how often and how it exploits and explores.

Hyperparameters are named by their config key (`optim.lr`, `model.dropout_resid`, ...): a trial is a whole
Flotilla trainer whose config has those keys replaced, so anything the trainer reads can be tuned.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from trainers.config import Section, TrainerConfig


class Mutation(Section):
    """How one hyperparameter is sampled at the start and explored after an exploit.

    Either `choices` (a list, explored by moving one place left or right) or a range `low`..`high`
    (explored by multiplying with one of `tune.perturbation_factors`, clipped to the range; `log` samples
    the range log-uniformly, as learning rates and weight decays want)."""

    low: float | None = None
    """Lower bound of a continuous range."""
    high: float | None = None
    """Upper bound of a continuous range."""
    log: bool = False
    """Sample the range log-uniformly (low must be > 0)."""
    choices: list[float | int | str | bool] | None = None
    """A categorical set; mutually exclusive with low/high."""

    @model_validator(mode="after")
    def _check(self) -> "Mutation":
        ranged = self.low is not None or self.high is not None
        if self.choices is not None:
            if ranged:
                raise ValueError("give either choices or low/high, not both")
            if len(self.choices) < 2:
                raise ValueError(f"choices = {self.choices}: give at least two values")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give both low and high (a range) or choices (a list)")
        if not self.low < self.high:
            raise ValueError(f"low = {self.low} must be below high = {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log = true needs low > 0, got low = {self.low}")
        return self

    @property
    def is_range(self) -> bool:
        return self.choices is None


class STNSettings(Section):
    """Self-Tuning Networks (tune.scheduler = stn): what each trial's STN does. PBT tunes `hyper_lr` and
    `perturb_scale` across the population when they are listed in tune.mutations as `stn.hyper_lr` and
    `stn.perturb_scale`; `stn.init_*` there draw each trial's starting values (never explored afterwards)."""

    hyper_lr: float = Field(3e-3, gt=0)
    """Adam learning rate of the hyperparameter step (on the unconstrained, logit/log scale)."""
    perturb_scale: float = Field(0.5, gt=0)
    """Standard deviation of the Gaussian around the current hyperparameters (unconstrained scale) that
    weight steps sample from: how wide a neighbourhood the best-response approximation must fit."""
    hyper_every: int = Field(2, ge=1)
    """One hyperparameter step (on one validation batch) after every this many weight steps."""
    entropy_weight: float = Field(1e-3, ge=0)
    """Weight of the perturbation distribution's entropy bonus in the hyperparameter step (keeps the
    neighbourhood from collapsing, as in the STN paper)."""
    tuned: list[Literal["dropout_embed", "dropout_attn", "dropout_resid", "weight_decay", "input_noise"]] = Field(
        ["dropout_embed", "dropout_attn", "dropout_resid", "weight_decay", "input_noise"], min_length=1)
    """Which regularisation hyperparameters the network learns online; the others may be PBT mutations.
    weight_decay is decoupled (AdamW, outside the loss), so its hypergradient reaches it only through the
    gates, weakly: on the tuning benchmark PBT tuned it better."""
    init_dropout: float = Field(0.05, gt=0, lt=1)
    """Starting dropout rate of each tuned dropout."""
    init_weight_decay: float = Field(0.05, gt=0)
    """Starting weight-decay penalty (decoupled, per weight step)."""
    init_input_noise: float = Field(0.02, gt=0, lt=1)
    """Starting probability of replacing an input token with a random one (data noise)."""


class TuneConfig(Section):
    """A Ray Tune sweep over whole trainers: Population Based Training (pbt), PB2 (pbt with a GP-bandit
    explore step), a population of Self-Tuning Networks (stn) with PBT over the STN's own settings, or
    random search (the baseline the others are measured against)."""

    scheduler: Literal["pbt", "pb2", "stn", "random"] = "pbt"
    """'pbt' (perturb / resample), 'pb2' (GP-UCB explore within bounds), 'stn' (PBT over STN trials),
    'random' (num_samples independent trials drawn from the mutations, each trained to the end, no exploits:
    the same starting draws a pbt sweep with the same seed begins from)."""
    num_samples: int = Field(4, ge=2)
    """Population size: trials trained side by side."""
    perturbation_interval: int = Field(50, ge=1)
    """Training steps between exploit/explore decisions; each trial checkpoints at these steps."""
    synch: bool = False
    """Synchronous PBT: decide once every live trial reached the same step (generations). Asynchronous:
    each trial decides when it gets there, against the latest scores of the others."""
    metric: str = "val_loss"
    """Reported metric the population is ranked by (validation runs at every perturbation step)."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher `metric` is better."""
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    """Bottom share of the population that exploits (copies) the top share of the same size."""
    resample_probability: float = Field(0.25, ge=0, le=1)
    """pbt: chance that an explored value is drawn afresh from its mutation instead of perturbed."""
    perturbation_factors: tuple[float, float] = (0.8, 1.2)
    """pbt: a continuous value is multiplied by one of these when perturbed (PBT paper: 0.8 / 1.2)."""
    mutations: dict[str, Mutation] = {}
    """Hyperparameters to tune, by config key, e.g. {optim.lr: {low: 1e-4, high: 1e-2, log: true}}.
    pb2 needs ranges (its GP works on bounds)."""
    seed: int = 0
    """Seeds the initial sampling and every explore decision."""
    stall_timeout_s: float = Field(900.0, gt=0)
    """Synchronous mode: a trial that has not reached a generation this long after the first trial did is
    treated as crashed, so one hung trial cannot block the population."""
    ucb_kappa: float = Field(1.0, ge=0)
    """pb2: exploration weight of the upper confidence bound (mean + kappa * std)."""
    stn: STNSettings = STNSettings()
    """Settings of each STN trial (scheduler = stn)."""
    reuse_workers: bool = True
    """Keep each trial's worker group for the whole sweep (tune.persistent): exploits load the donor's
    checkpoint in place, other trials go on in place; no Ray Train start-up between segments
    (bench/results/sweep_overhead.md). Only possible while every trial runs at once (num_samples <= the
    trials the cluster fits); otherwise the sweep uses segment restarts, which let trials take turns.
    false: always segment restarts (a new trainer per segment)."""

    @model_validator(mode="after")
    def _check(self) -> "TuneConfig":
        lo, hi = self.perturbation_factors
        if not 0 < lo < 1 < hi:
            raise ValueError(f"tune.perturbation_factors = {self.perturbation_factors}: need 0 < down < 1 < up, e.g. [0.8, 1.2]")
        if not self.mutations:
            raise ValueError("tune.mutations: give at least one hyperparameter to tune, e.g. optim.lr: {low: 1e-4, high: 1e-2, log: true}")
        if self.scheduler == "pb2":
            cats = [k for k, m in self.mutations.items() if not m.is_range]
            if cats:
                raise ValueError(f"tune.mutations.{cats[0]}: pb2 explores within bounds; give low/high, not choices")
        if self.scheduler == "stn":
            bad = [k for k in self.mutations if not k.startswith("stn.") and k.split(".")[-1] in self.stn.tuned]
            if bad:
                raise ValueError(f"tune.mutations.{bad[0]}: with scheduler = stn the network learns this itself "
                                 f"(tune.stn.tuned = {self.stn.tuned}); drop it from tune.stn.tuned to have PBT "
                                 "tune it, or mutate stn.hyper_lr / stn.perturb_scale / stn.init_* instead")
        return self

    def explored(self) -> dict[str, Mutation]:
        """The mutations an exploit may change. The STN's starting values (stn.init_*) are drawn for each trial's
        start only: afterwards the network's own hyperparameters, carried in the donor's checkpoint, rule."""
        return {k: m for k, m in self.mutations.items() if k not in START_ONLY}

    def segment_steps(self, total_steps: int) -> int:
        """Steps between a trial's decisions: the perturbation interval, or the whole run for random search."""
        return total_steps if self.scheduler == "random" else self.perturbation_interval

    def quantile_size(self) -> int:
        """How many trials form the bottom (and top) quantile: at least 1, at most half the population."""
        return max(1, min(self.num_samples // 2, math.ceil(self.num_samples * self.quantile_fraction)))


START_ONLY = {f"stn.{name}" for name in STNSettings.model_fields if name.startswith("init_")}
"""Mutations sampled for a trial's start and never explored: they only set where an STN begins."""


def check_tune(tune: TuneConfig, trainer: TrainerConfig) -> list[str]:
    """Rules linking the tune section to the rest of the config; returns problems, each naming key and value."""
    problems = []
    if tune.scheduler == "stn" and trainer.parallel.engine != "fsdp":
        problems.append(f"parallel.engine = {trainer.parallel.engine!r}: STN trials train one process with the fsdp engine")
    for key in ("activation_checkpointing", "compile"):
        if tune.scheduler == "stn" and getattr(trainer.parallel, key):
            problems.append(f"parallel.{key} = true: STN trials build their own gated model, which does not apply "
                            "it; set it to false")
    cluster = getattr(trainer, "cluster", None)  # present on the orchestrator's Config
    if tune.scheduler == "stn" and cluster is not None and cluster.num_workers != 1:
        problems.append(f"cluster.num_workers = {cluster.num_workers}: STN trials run on one process; set it to 1")
    interval, val_every = tune.perturbation_interval, trainer.train.val_every
    if tune.scheduler == "random":
        interval = trainer.train.steps  # one segment per trial: nothing is decided on the way
    elif tune.perturbation_interval >= trainer.train.steps:
        problems.append(f"tune.perturbation_interval = {interval}: must be below train.steps = {trainer.train.steps}, "
                        "or no trial is ever exploited")
    if tune.metric == "val_loss" and val_every == 0:
        problems.append(f"train.val_every = 0: tune.metric = val_loss needs validation (set train.val_every)")
    elif tune.metric == "val_loss" and tune.scheduler != "random" and interval % val_every:
        problems.append(f"tune.perturbation_interval = {interval}: must be a multiple of train.val_every = {val_every} "
                        "so every trial has a fresh val_loss at each decision")
    for key, mutation in tune.mutations.items():
        if key.startswith("stn."):
            if tune.scheduler != "stn":
                problems.append(f"tune.mutations.{key}: stn.* keys need tune.scheduler = stn")
            elif key.split(".", 1)[1] not in STNSettings.model_fields:
                problems.append(f"tune.mutations.{key}: unknown; stn settings are {', '.join(STNSettings.model_fields)}")
            continue
        section, _, name = key.partition(".")
        model = TrainerConfig.model_fields.get(section)
        if model is None or not name or name not in model.annotation.model_fields:
            problems.append(f"tune.mutations.{key}: not a trainer config key (write section.key, e.g. optim.lr)")
            continue
        samples = [mutation.low, mutation.high] if mutation.is_range else mutation.choices
        for value in samples:
            try:
                getattr(trainer, section).model_copy().__setattr__(name, value)
            except ValueError as err:
                reason = str(err).splitlines()[-1].strip()
                problems.append(f"tune.mutations.{key}: value {value!r} is not valid for {key} ({reason})")
                break
    return problems
