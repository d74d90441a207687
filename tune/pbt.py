"""Population Based Training decisions, pure: sampling, explore (perturb / resample / PB2), exploit choice,
and the population's bookkeeping (who is where, synchronous generations, crashes).

Nothing here touches Ray or a clock of its own: `Population` is driven by check-ins from the trials (a thin
Ray actor in tune.sweep wraps it) and by the time it is given, so every rule below is unit-tested directly.

Where Ray Tune's own PBT has bitten users, and what this module does instead:
- a donor that never checkpointed is never chosen (a trial only checks in with the checkpoint it just
  wrote, and members without one are skipped as donors);
- the decision carries the donor's checkpoint path; the trial starts its next segment from exactly that
  path, never from its own storage (tune.trial);
- synchronous generations wait only for live trials, and a waiting trial holds no training resources
  (it waits between segments), so pending trials can still run and reach the barrier;
- a crashed trial leaves the population (or is declared stalled after `stall_timeout_s`): it never blocks
  a generation;
- asynchronous trials drift apart: a recipient copies its donor as the donor was at the recipient's step,
  never weights from further on (which would skip the recipient's steps under a lineage naming the wrong ones);
- a trial restarted after a crash that checks in a step again gets the decision already made for it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tune.config import Mutation, TuneConfig

Hparams = dict[str, Any]


# -- sampling and explore -------------------------------------------------------------------------------

def sample(mutation: Mutation, rng: random.Random) -> Any:
    """A fresh value from a mutation's distribution."""
    if not mutation.is_range:
        return rng.choice(mutation.choices)
    if mutation.log:
        return math.exp(rng.uniform(math.log(mutation.low), math.log(mutation.high)))
    return rng.uniform(mutation.low, mutation.high)


def initial_population(mutations: dict[str, Mutation], n: int, seed: int) -> list[Hparams]:
    """n starting points, each hyperparameter drawn independently (the same draws as random search)."""
    rng = random.Random(seed)
    return [{key: sample(m, rng) for key, m in mutations.items()} for _ in range(n)]


def perturb(value: Any, mutation: Mutation, factors: tuple[float, float], rng: random.Random) -> tuple[Any, str]:
    """PBT's perturb: a range value times 0.8 or 1.2 (clipped to the range); a choice moves one place."""
    if mutation.is_range:
        factor = rng.choice(factors)
        return min(mutation.high, max(mutation.low, value * factor)), f"*{factor}"
    choices = mutation.choices
    i = choices.index(value) if value in choices else 0
    j = min(len(choices) - 1, max(0, i + rng.choice((-1, 1))))
    return choices[j], f"{'-' if j < i else '+'}1 choice" if j != i else "same choice"


def explore(hparams: Hparams, mutations: dict[str, Mutation], resample_probability: float,
            factors: tuple[float, float], rng: random.Random) -> tuple[Hparams, dict[str, str]]:
    """New hyperparameters from a donor's: each one resampled with `resample_probability`, else perturbed.
    Returns (new values, how each was made)."""
    new, ops = dict(hparams), {}
    for key, mutation in mutations.items():
        if rng.random() < resample_probability:
            new[key], ops[key] = sample(mutation, rng), "resample"
        else:
            new[key], ops[key] = perturb(hparams[key], mutation, factors, rng)
    return new, ops


# -- PB2: a Gaussian-process bandit as the explore step (Parker-Holder et al. 2020) ---------------------

def _to_unit(hparams: Hparams, bounds: dict[str, Mutation]) -> np.ndarray:
    out = []
    for key, m in bounds.items():
        lo, hi, v = (math.log(m.low), math.log(m.high), math.log(hparams[key])) if m.log else (m.low, m.high, hparams[key])
        out.append((v - lo) / (hi - lo))
    return np.array(out)


def _from_unit(x: np.ndarray, bounds: dict[str, Mutation]) -> Hparams:
    out = {}
    for xi, (key, m) in zip(x, bounds.items()):
        lo, hi = (math.log(m.low), math.log(m.high)) if m.log else (m.low, m.high)
        v = lo + float(np.clip(xi, 0.0, 1.0)) * (hi - lo)
        out[key] = math.exp(v) if m.log else v
    return out


def gp_ucb(x: np.ndarray, y: np.ndarray, candidates: np.ndarray, kappa: float,
           length_scale: float = 0.3, noise: float = 0.1) -> np.ndarray:
    """Upper confidence bound mean + kappa*std of a GP (RBF kernel, unit variance) fitted to standardised y.

    x: (n, d) observed points in [0,1]^d (time is one of the columns); y: (n,) rewards; candidates: (m, d).
    Returns (m,) UCB scores. The length scale is fixed rather than fitted: with a handful of points per
    generation a marginal-likelihood fit is noise (PB2 fits it with GPy; we have no GPy here)."""
    y = (y - y.mean()) / (y.std() + 1e-9)

    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-0.5 * d2 / length_scale**2)

    kxx = k(x, x) + noise * np.eye(len(x))
    chol = np.linalg.cholesky(kxx)
    alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, y))
    kcx = k(candidates, x)
    mean = kcx @ alpha
    v = np.linalg.solve(chol, kcx.T)
    var = np.clip(1.0 - (v**2).sum(0), 1e-12, None)
    return mean + kappa * np.sqrt(var)


def pb2_explore(observations: list[tuple[int, Hparams, float]], bounds: dict[str, Mutation], now: int,
                kappa: float, rng: random.Random, n_candidates: int = 512) -> tuple[Hparams, dict[str, str]]:
    """PB2's explore: fit a GP to (time, hyperparameters) -> reward (the metric's improvement per step over
    an interval, higher is better) and pick the hyperparameters with the highest UCB at time `now`.
    With fewer than 2 observations there is nothing to fit: sample uniformly in the bounds."""
    if len(observations) < 2:
        return {k: sample(m, rng) for k, m in bounds.items()}, {k: "pb2 sample" for k in bounds}
    t_max = max(max(t for t, _, _ in observations), now, 1)
    x = np.array([[t / t_max, *_to_unit(h, bounds)] for t, h, _ in observations])
    y = np.array([r for _, _, r in observations], dtype=float)
    gen = np.random.default_rng(rng.getrandbits(32))
    cand = np.concatenate([np.full((n_candidates, 1), now / t_max), gen.random((n_candidates, len(bounds)))], axis=1)
    best = cand[int(np.argmax(gp_ucb(x, y, cand, kappa)))]
    return _from_unit(best[1:], bounds), {k: "pb2 ucb" for k in bounds}


# -- exploit ---------------------------------------------------------------------------------------------

@dataclass
class Member:
    """A trial as the population last saw it: at `step`, scoring `score`, with the checkpoint written there."""

    name: str
    step: int
    score: float
    checkpoint: str | None
    hparams: Hparams


def quantiles(members: list[Member], size: int, mode: str) -> tuple[list[Member], list[Member]]:
    """(bottom, top) `size` members by score; ([], []) when fewer than two members have a finite score."""
    ranked = [m for m in members if m.score is not None and math.isfinite(m.score)]
    if len(ranked) < 2:
        return [], []
    ranked.sort(key=lambda m: m.score, reverse=(mode == "max"))  # best first
    size = min(size, len(ranked) // 2)
    return ranked[-size:], ranked[:size]


@dataclass
class Decision:
    """What a trial does at a perturbation step: go on from its own checkpoint, or from the donor's with
    new hyperparameters."""

    checkpoint: str | None
    hparams: Hparams
    donor: str | None = None
    operations: dict[str, str] = field(default_factory=dict)
    reason: str = ""

    @property
    def exploit(self) -> bool:
        return self.donor is not None


def decide(me: Member, population: list[Member], cfg: TuneConfig, rng: random.Random,
           observations: list[tuple[int, Hparams, float]] = ()) -> Decision:
    """PBT's exploit-and-explore for one trial: a member of the bottom quantile copies a random member of
    the top quantile that has a checkpoint, then explores from the donor's hyperparameters."""
    if cfg.scheduler == "random":
        return Decision(me.checkpoint, me.hparams, reason="random search never exploits")
    bottom, top = quantiles(population, cfg.quantile_size(), cfg.mode)
    if all(m.name != me.name for m in bottom):
        return Decision(me.checkpoint, me.hparams, reason="not in the bottom quantile")
    donors = [m for m in top if m.checkpoint is not None and m.name != me.name]
    if not donors:
        return Decision(me.checkpoint, me.hparams, reason="no top trial has a checkpoint yet")
    donor = rng.choice(donors)
    if cfg.scheduler == "pb2":
        hparams, ops = pb2_explore(list(observations), cfg.explored(), me.step, cfg.ucb_kappa, rng)
        hparams = {**donor.hparams, **hparams}
    else:
        hparams, ops = explore(donor.hparams, cfg.explored(), cfg.resample_probability, cfg.perturbation_factors, rng)
    return Decision(donor.checkpoint, hparams, donor.name, ops, reason=f"bottom quantile, copies {donor.name}")


# -- the population ---------------------------------------------------------------------------------------

@dataclass
class ExploitRecord:
    """One exploit: `recipient` copied `donor`'s checkpoint at `step` and went on with `new` hyperparameters
    (where it had `old`)."""

    step: int
    recipient: str
    donor: str
    old: Hparams
    new: Hparams
    operations: dict[str, str]
    recipient_score: float
    donor_score: float


class Population:
    """The population's state. Trials `check_in` after each segment with the checkpoint they just wrote;
    `decision(name)` is then their next move, or None while a synchronous generation is still waiting for
    live trials. `leave(name)` when a trial ends (finished or crashed)."""

    def __init__(self, names: list[str], cfg: TuneConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps
        self.rng = random.Random(cfg.seed + 1)
        self.members: dict[str, Member] = {}
        self.live = set(names)
        self.crashed: set[str] = set()
        self.pending: dict[str, Decision] = {}
        self.waiting: dict[int, dict[str, float]] = {}  # synch: generation step -> {name: arrival time}
        self.lineage: list[ExploitRecord] = []
        self.observations: list[tuple[int, Hparams, float]] = []  # pb2: (step, hparams, reward per step)
        self.decided: dict[str, tuple[int, Decision]] = {}  # each trial's latest decision and its step
        self.history: dict[str, dict[int, Member]] = {}  # each trial as it checked in at each step

    def check_in(self, name: str, step: int, score: float, checkpoint: str | None, hparams: Hparams, now: float,
                 started: tuple[int, float] | None = None) -> None:
        """`started`: (step, score) where this segment began, when the trial measured it (its first segment
        validates at step 0); later segments start where the previous check-in ended.

        A trial checking in again at a step it was already decided at (restarted after a crash between its
        check-in and acting on the decision) gets that same decision again: it is neither ranked nor recorded
        twice, and a synchronous generation already decided is not opened again for it alone."""
        if name in self.decided and step <= self.decided[name][0]:
            self.pending[name] = self.decided[name][1]
            return
        previous = self.members.get(name)
        start = (previous.step, previous.score) if previous is not None else started
        if start is not None and start[0] < step and math.isfinite(score) and math.isfinite(start[1]):
            # PB2's reward: the metric's improvement per step over the segment, with these hyperparameters
            sign = -1.0 if self.cfg.mode == "min" else 1.0
            self.observations.append((step, dict(hparams), sign * (score - start[1]) / (step - start[0])))
        self.members[name] = Member(name, step, score, checkpoint, dict(hparams))
        self.history.setdefault(name, {})[step] = self.members[name]
        if step >= self.total_steps:
            self.leave(name)
            self._settle(name, step, Decision(checkpoint, hparams, reason="finished"))
            return
        if not self.cfg.synch:
            self._decide([name], step)
            return
        self.waiting.setdefault(step, {})[name] = now
        self._release(now)

    def decision(self, name: str, now: float) -> Decision | None:
        if self.cfg.synch:
            self._release(now)
        return self.pending.pop(name, None)

    def leave(self, name: str, crashed: bool = False) -> None:
        self.live.discard(name)
        if crashed:
            self.crashed.add(name)

    def _release(self, now: float) -> None:
        """Synchronous mode: a generation is decided once every live trial reached it. A live trial that is
        still missing `stall_timeout_s` after the first arrival is declared crashed."""
        for step in sorted(self.waiting):
            arrived = self.waiting[step]
            missing = self.live - set(arrived)
            if missing and now - min(arrived.values()) > self.cfg.stall_timeout_s:
                for name in missing:
                    self.leave(name, crashed=True)
                missing = set()
            if missing:
                return  # later generations wait behind this one
            del self.waiting[step]
            self._decide(sorted(n for n in arrived if n in self.live), step)

    def _at(self, name: str, step: int) -> Member:
        """`name` as it checked in at `step`; one that has not got there yet as last seen, with nothing to copy.
        Asynchronous trials drift apart: a recipient at `step` copies a donor's weights at `step` (those of a
        donor that went on would skip the recipient's steps, and the lineage would name the wrong ones)."""
        seen = self.history[name]
        return seen[step] if step in seen else replace(self.members[name], checkpoint=None)

    def _decide(self, names: list[str], step: int) -> None:
        # Ranked at `step` (synchronous generations all stand there); crashed trials' checkpoints are not trusted.
        population = [self._at(n, step) for n in self.members if n not in self.crashed]
        for name in names:
            me = self.members[name]
            decision = decide(me, population, self.cfg, self.rng, self.observations)
            if decision.exploit:
                donor = self._at(decision.donor, step)
                self.lineage.append(ExploitRecord(step, name, donor.name, me.hparams, decision.hparams,
                                                  decision.operations, me.score, donor.score))
            self._settle(name, step, decision)

    def _settle(self, name: str, step: int, decision: Decision) -> None:
        self.pending[name] = decision
        self.decided[name] = (step, decision)


class Slots:
    """Admission of trial segments to the cluster: at most `capacity` segments train at once, and a free slot
    goes to the waiting trial that is furthest behind (fewest steps, then longest waiting), as Ray Tune's
    PBT picks which paused trial to run. Without it, more trainers than the cluster holds start at once and
    Ray Train gives up waiting for workers; with it, a trial waits for a slot holding no resources."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.holders: set[str] = set()
        self.waiting: dict[str, tuple[int, float]] = {}

    def acquire(self, name: str, step: int, now: float) -> bool:
        if name in self.holders:
            return True
        self.waiting.setdefault(name, (step, now))
        if len(self.holders) >= self.capacity or min(self.waiting, key=self.waiting.get) != name:
            return False
        del self.waiting[name]
        self.holders.add(name)
        return True

    def release(self, name: str) -> None:
        self.holders.discard(name)
        self.waiting.pop(name, None)
