"""PBT's pure decisions (tune.pbt) and the population's bookkeeping, without Ray."""

from __future__ import annotations

import math
import random

import pytest

from tune.config import Mutation, TuneConfig
from tune.lineage import Segment, full_schedule, merge_schedule
from tune.pbt import (ExploitRecord, Member, Population, Slots, decide, explore, gp_ucb, initial_population,
                      pb2_explore, perturb, quantiles)

LR = Mutation(low=1e-4, high=1e-1, log=True)
WD = Mutation(low=0.0, high=0.3)
CHOICE = Mutation(choices=[16, 32, 64])


def cfg(**kw) -> TuneConfig:
    base = {"num_samples": 4, "perturbation_interval": 10, "quantile_fraction": 0.25,
            "mutations": {"optim.lr": LR, "optim.weight_decay": WD}}
    return TuneConfig.model_validate({**base, **kw})


def members(scores: dict[str, float], step: int = 10, checkpoints: dict[str, str | None] | None = None) -> list[Member]:
    checkpoints = checkpoints or {}
    return [Member(n, step, s, checkpoints.get(n, f"/ckpt/{n}"), {"optim.lr": 1e-3, "optim.weight_decay": 0.1})
            for n, s in scores.items()]


def test_initial_population_is_seeded_and_within_bounds():
    a = initial_population({"optim.lr": LR, "x": CHOICE}, 50, seed=3)
    assert a == initial_population({"optim.lr": LR, "x": CHOICE}, 50, seed=3)
    assert all(1e-4 <= h["optim.lr"] <= 1e-1 and h["x"] in (16, 32, 64) for h in a)
    # log-uniform: about half the draws below the geometric midpoint 10^-2.5
    below = sum(h["optim.lr"] < 10**-2.5 for h in a)
    assert 15 <= below <= 35


def test_perturb_multiplies_by_a_factor_and_clips_to_the_range():
    rng = random.Random(0)
    values = sorted({round(perturb(1e-2, LR, (0.8, 1.2), rng)[0], 12) for _ in range(50)})
    assert values == [8e-3, 1.2e-2]
    assert all(perturb(0.1, LR, (0.8, 1.2), random.Random(s))[0] <= 0.1 for s in range(20))


def test_perturb_moves_a_choice_one_place_within_the_list():
    seen = {perturb(32, CHOICE, (0.8, 1.2), random.Random(s))[0] for s in range(30)}
    assert seen == {16, 64}
    assert {perturb(64, CHOICE, (0.8, 1.2), random.Random(s))[0] for s in range(30)} == {32, 64}


def test_explore_resamples_with_the_given_probability():
    rng = random.Random(0)
    ops = [explore({"optim.lr": 1e-3}, {"optim.lr": LR}, 0.25, (0.8, 1.2), rng)[1]["optim.lr"] for _ in range(400)]
    assert 0.18 < ops.count("resample") / 400 < 0.32
    always = explore({"optim.lr": 1e-3}, {"optim.lr": LR}, 1.0, (0.8, 1.2), rng)[1]
    never = explore({"optim.lr": 1e-3}, {"optim.lr": LR}, 0.0, (0.8, 1.2), rng)[1]
    assert always == {"optim.lr": "resample"} and never["optim.lr"] in ("*0.8", "*1.2")


def test_quantiles_rank_by_mode_and_never_overlap():
    ms = members({"a": 1.0, "b": 2.0, "c": 3.0, "d": float("nan"), "e": 0.5})
    bottom, top = quantiles(ms, 1, "min")
    assert [m.name for m in bottom] == ["c"] and [m.name for m in top] == ["e"]
    bottom, top = quantiles(ms, 1, "max")
    assert [m.name for m in bottom] == ["e"] and [m.name for m in top] == ["c"]
    bottom, top = quantiles(members({"a": 1.0, "b": 2.0, "c": 3.0}), 5, "min")
    assert len(bottom) == len(top) == 1
    assert quantiles(members({"a": 1.0}), 1, "min") == ([], [])


def test_bottom_trial_copies_a_top_trial_and_explores_from_its_values():
    ms = members({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    ms[0].hparams = {"optim.lr": 2e-3, "optim.weight_decay": 0.2}
    d = decide(ms[3], ms, cfg(resample_probability=0.0), random.Random(0))
    assert d.exploit and d.donor == "a" and d.checkpoint == "/ckpt/a"
    assert d.hparams["optim.lr"] in (pytest.approx(1.6e-3), pytest.approx(2.4e-3))
    assert d.hparams["optim.weight_decay"] in (pytest.approx(0.16), pytest.approx(0.24))
    keep = decide(ms[1], ms, cfg(), random.Random(0))
    assert not keep.exploit and keep.checkpoint == "/ckpt/b" and keep.hparams == ms[1].hparams


def test_stn_starting_values_are_drawn_but_never_explored():
    # stn.init_* only set where a trial's STN begins; after an exploit the donor's checkpoint carries the
    # hyperparameters the network learned, so perturbing the starting value would record a change that acts on nothing
    mutations = {"optim.lr": LR, "stn.init_dropout": {"low": 0.01, "high": 0.3}}
    config = cfg(scheduler="stn", mutations=mutations, resample_probability=0.5)
    starts = initial_population(config.mutations, 8, seed=0)
    assert len({round(s["stn.init_dropout"], 6) for s in starts}) == 8
    assert all(0.01 <= s["stn.init_dropout"] <= 0.3 for s in starts)
    ms = members({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    for m, start in zip(ms, starts):
        m.hparams = start
    for seed in range(20):
        d = decide(ms[3], ms, config, random.Random(seed))
        assert d.exploit and d.hparams["stn.init_dropout"] == ms[0].hparams["stn.init_dropout"]
        assert set(d.operations) == {"optim.lr"}


def test_random_search_never_exploits_even_in_the_bottom_quantile():
    ms = members({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    d = decide(ms[3], ms, cfg(scheduler="random"), random.Random(0))
    assert not d.exploit and d.checkpoint == "/ckpt/d" and d.hparams == ms[3].hparams
    # and it starts from the draws a pbt sweep with the same seed starts from: a like-for-like baseline
    assert initial_population(cfg().mutations, 4, 7) == initial_population(cfg(scheduler="random").mutations, 4, 7)


# -- the five failure modes --------------------------------------------------------------------------------

def test_failure_mode_exploit_before_any_checkpoint():
    """A top trial that never checkpointed is never a donor (the recipient keeps its own state), and a
    recipient that has no checkpoint of its own still gets the donor's path, not None."""
    ms = members({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, checkpoints={"a": None, "d": None})
    d = decide(ms[3], ms, cfg(), random.Random(0))
    assert not d.exploit and "no top trial has a checkpoint" in d.reason
    ms = members({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, checkpoints={"d": None})
    d = decide(ms[3], ms, cfg(), random.Random(0))
    assert d.exploit and d.checkpoint == "/ckpt/a"


def test_failure_mode_decision_names_the_donors_checkpoint_not_the_recipients():
    pop = Population(["a", "b"], cfg(num_samples=2, quantile_fraction=0.5), total_steps=100)
    pop.check_in("a", 10, 1.0, "/a/ckpt10", {"optim.lr": 1e-3, "optim.weight_decay": 0.1}, now=0)
    pop.check_in("b", 10, 5.0, "/b/ckpt10", {"optim.lr": 1e-2, "optim.weight_decay": 0.2}, now=0)
    d = pop.decision("b", now=0)
    assert d.exploit and d.checkpoint == "/a/ckpt10" and d.donor == "a"
    assert pop.lineage == [ExploitRecord(10, "b", "a", {"optim.lr": 1e-2, "optim.weight_decay": 0.2}, d.hparams,
                                         d.operations, 5.0, 1.0)]


def _simulate(pop: Population, names: list[str], slots: Slots, interval: int, total: int,
              crash: dict[str, int] | None = None, max_ticks: int = 10_000) -> dict[str, int]:
    """Drive trials as the sweep's trial drivers do, one action per trial per tick: wait for a slot, train
    one segment (holding the slot for `interval` ticks), release, check in, wait for the decision."""
    crash = crash or {}
    state = {n: {"step": 0, "phase": "slot", "busy": 0} for n in names}
    for tick in range(max_ticks):
        if all(s["phase"] in ("done", "crashed") for s in state.values()):
            return {n: s["step"] for n, s in state.items()}
        for n in names:
            s = state[n]
            if s["phase"] == "slot" and slots.acquire(n, s["step"], now=tick):
                s["phase"], s["busy"] = "train", interval
            elif s["phase"] == "train":
                s["busy"] -= 1
                if s["busy"] == 0:
                    slots.release(n)
                    if crash.get(n) == s["step"]:
                        s["phase"] = "crashed"
                        pop.leave(n, crashed=True)
                        continue
                    s["step"] += interval
                    pop.check_in(n, s["step"], float(hash(n) % 7), f"/{n}/{s['step']}", {"optim.lr": 1e-3, "optim.weight_decay": 0.1}, now=tick)
                    s["phase"] = "decide"
            elif s["phase"] == "decide":
                if pop.decision(n, now=tick) is not None:
                    s["phase"] = "done" if s["step"] >= total else "slot"
    raise AssertionError(f"population hung: {state}")


def test_failure_mode_synch_with_more_trials_than_slots_does_not_hang():
    """Ray Tune's synch PBT pauses trials at the barrier; with fewer slots than trials the pending ones
    could then never run. Here a trial waiting for its generation holds no slot, so 4 trials on 2 slots
    all reach the end, every generation decided once all 4 arrived."""
    names = ["a", "b", "c", "d"]
    pop = Population(names, cfg(synch=True, quantile_fraction=0.25), total_steps=30)
    steps = _simulate(pop, names, Slots(2), interval=10, total=30)
    assert steps == {n: 30 for n in names}
    assert {r.step for r in pop.lineage} <= {10, 20} and len(pop.lineage) >= 1


def test_synch_generation_waits_for_every_live_trial():
    pop = Population(["a", "b", "c"], cfg(num_samples=3, synch=True), total_steps=30)
    pop.check_in("a", 10, 1.0, "/a", {"optim.lr": 1e-3, "optim.weight_decay": 0.1}, now=0)
    pop.check_in("b", 10, 2.0, "/b", {"optim.lr": 1e-3, "optim.weight_decay": 0.1}, now=0)
    assert pop.decision("a", now=1) is None and pop.decision("b", now=1) is None
    pop.check_in("c", 10, 3.0, "/c", {"optim.lr": 1e-3, "optim.weight_decay": 0.1}, now=2)
    assert pop.decision("c", now=2).donor == "a"
    assert not pop.decision("a", now=2).exploit


def test_failure_mode_crashed_trial_does_not_block_a_synch_population():
    names = ["a", "b", "c", "d"]
    pop = Population(names, cfg(synch=True), total_steps=30)
    steps = _simulate(pop, names, Slots(2), interval=10, total=30, crash={"c": 10})
    assert steps["c"] == 10 and all(steps[n] == 30 for n in "abd")
    assert pop.crashed == {"c"} and all(r.donor != "c" for r in pop.lineage if r.step > 10)


def test_stalled_trial_is_declared_crashed_after_the_timeout():
    pop = Population(["a", "b"], cfg(num_samples=2, synch=True, stall_timeout_s=60), total_steps=30)
    pop.check_in("a", 10, 1.0, "/a", {"optim.lr": 1e-3, "optim.weight_decay": 0.1}, now=0)
    assert pop.decision("a", now=59) is None
    assert pop.decision("a", now=61) is not None and pop.crashed == {"b"}


def test_failure_mode_async_recipient_copies_the_donor_at_its_own_step_not_further_on():
    """Asynchronous trials drift apart: the best trial may have checked in at step 20 by the time a slow one
    is decided at step 10. The slow one must copy the donor's step-10 checkpoint (and score and values):
    its step-20 weights would skip ten of the recipient's steps, and the lineage would say step 10."""
    hp = {"optim.lr": 1e-3, "optim.weight_decay": 0.1}
    pop = Population(["a", "b"], cfg(num_samples=2, quantile_fraction=0.5), total_steps=40)
    pop.check_in("a", 10, 1.0, "/a/10", hp, now=0)
    pop.check_in("a", 20, 0.8, "/a/20", {**hp, "optim.lr": 2e-3}, now=1)
    pop.check_in("b", 10, 2.0, "/b/10", hp, now=2)
    decision = pop.decision("b", now=2)
    assert decision.donor == "a" and decision.checkpoint == "/a/10"
    (record,) = pop.lineage
    assert (record.step, record.donor_score) == (10, 1.0)
    assert pop.decision("a", now=2).checkpoint == "/a/20"  # a itself went on from its own latest


def test_a_trial_behind_is_never_copied_from_a_step_it_has_not_reached():
    hp = {"optim.lr": 1e-3, "optim.weight_decay": 0.1}
    pop = Population(["a", "b"], cfg(num_samples=2, quantile_fraction=0.5), total_steps=40)
    pop.check_in("a", 10, 1.0, "/a/10", hp, now=0)
    pop.check_in("b", 10, 2.0, "/b/10", hp, now=0)
    pop.check_in("b", 20, 3.0, "/b/20", hp, now=1)  # b is worst but a has no step-20 checkpoint yet
    assert not pop.decision("b", now=1).exploit


def test_a_restarted_trial_checking_in_again_gets_its_decision_again():
    """A trial whose workers died after it checked in (say while waiting for its generation) trains that
    segment again and checks in at the same step: it must get the decision already made for it, not open a
    generation of its own that the others, gone on, would never join."""
    hp = {"optim.lr": 1e-3, "optim.weight_decay": 0.1}
    pop = Population(["a", "b", "c"], cfg(num_samples=3, synch=True), total_steps=30)
    for name, score in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        pop.check_in(name, 10, score, f"/{name}", hp, now=0)
    decided = pop.decision("c", now=0)
    assert decided.donor == "a" and pop.decision("a", now=0) and pop.decision("b", now=0)
    pop.check_in("c", 10, 3.0, "/c", hp, now=5)  # restarted: the same segment once more
    assert pop.decision("c", now=5) == decided and 10 not in pop.waiting
    assert len(pop.lineage) == 1
    pop.check_in("a", 20, 1.0, "/a", hp, now=6)
    pop.check_in("b", 20, 2.0, "/b", hp, now=6)
    assert pop.decision("a", now=6) is None  # the next generation still waits for c


def test_slots_go_to_the_trial_furthest_behind():
    slots = Slots(1)
    assert slots.acquire("a", 10, now=0)
    assert not slots.acquire("b", 20, now=1) and not slots.acquire("c", 0, now=2)
    slots.release("a")
    assert not slots.acquire("b", 20, now=3) and slots.acquire("c", 0, now=4)


# -- PB2 ---------------------------------------------------------------------------------------------------

def test_gp_ucb_prefers_the_region_with_high_rewards():
    x = [[0.0, v] for v in (0.1, 0.2, 0.8, 0.9)]
    import numpy as np
    ucb = gp_ucb(np.array(x), np.array([1.0, 0.9, -1.0, -0.9]), np.array([[0.0, 0.15], [0.0, 0.85]]), kappa=0.5)
    assert ucb[0] > ucb[1]


def test_pb2_explore_picks_values_near_the_best_observations_within_bounds():
    bounds = {"optim.lr": LR}
    obs = [(t, {"optim.lr": lr}, -abs(math.log10(lr) + 2.0)) for t in (10, 20) for lr in (1e-4, 1e-3, 1e-2, 1e-1)]
    new, ops = pb2_explore(obs, bounds, now=30, kappa=0.1, rng=random.Random(0))
    assert 10**-2.6 < new["optim.lr"] < 10**-1.4 and ops == {"optim.lr": "pb2 ucb"}
    new, ops = pb2_explore(obs[:1], bounds, now=30, kappa=0.1, rng=random.Random(0))
    assert 1e-4 <= new["optim.lr"] <= 1e-1 and ops == {"optim.lr": "pb2 sample"}


# -- lineage -----------------------------------------------------------------------------------------------

def test_full_schedule_follows_exploits_back_through_donors():
    h = lambda lr: {"optim.lr": lr}  # noqa: E731
    segments = [Segment("a", 0, 10, h(1)), Segment("b", 0, 10, h(2)), Segment("a", 10, 20, h(1)),
                Segment("b", 10, 20, h(3)), Segment("a", 20, 30, h(4)), Segment("b", 20, 30, h(3))]
    lineage = [ExploitRecord(10, "b", "a", h(2), h(3), {}, 5.0, 1.0), ExploitRecord(20, "a", "b", h(1), h(4), {}, 5.0, 1.0)]
    schedule = full_schedule("a", segments, lineage)
    assert [(s.trial, s.start, s.stop, s.hparams["optim.lr"]) for s in schedule] == [
        ("a", 0, 10, 1), ("b", 10, 20, 3), ("a", 20, 30, 4)]
    merged = merge_schedule(full_schedule("b", segments, lineage))
    assert merged == [{"start": 0, "stop": 10, "hparams": h(1), "trained_by": ["a"]},
                      {"start": 10, "stop": 30, "hparams": h(3), "trained_by": ["b"]}]


def test_pb2_learns_from_the_first_segment_when_its_start_was_measured():
    """A trial's first segment is an observation (improvement per step since the step-0 validation), so the
    first generation's explore already fits the GP instead of sampling blindly."""
    pop = Population(["a", "b", "c"], cfg(scheduler="pb2", num_samples=3, quantile_fraction=0.34), total_steps=100)
    for name, lr, score in (("a", 1e-2, 2.0), ("b", 1e-3, 3.0), ("c", 1e-4, 4.0)):
        pop.check_in(name, 10, score, f"/{name}", {"optim.lr": lr, "optim.weight_decay": 0.1}, now=0, started=(0, 5.0))
    assert sorted(round(r, 6) for _, _, r in pop.observations) == [0.1, 0.2, 0.3]  # (5 - score) / 10 steps
    d = pop.decision("c", now=0)
    assert d.exploit and set(d.operations.values()) == {"pb2 ucb"}
    pop.check_in("a", 20, 1.5, "/a20", {"optim.lr": 1e-2, "optim.weight_decay": 0.1}, now=1, started=(10, 9.9))
    assert pop.observations[-1][2] == pytest.approx(0.05)  # from the previous check-in (2.0), not `started`
