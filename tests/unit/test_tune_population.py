"""The population actor's class (tune.population) without Ray: trials block in `decision` until theirs is made."""

from __future__ import annotations

import threading
import time

from tune.lineage import Segment
from tune.population import PopulationActor

CFG = {"num_samples": 2, "perturbation_interval": 10, "synch": True, "quantile_fraction": 0.5,
       "mutations": {"optim.lr": {"low": 1e-4, "high": 1e-1, "log": True}}}


def test_a_waiting_trial_gets_its_decision_as_soon_as_the_generation_is_complete():
    actor = PopulationActor(["a", "b"], CFG, total_steps=30, slots=2)
    actor.check_in("a", Segment("a", 0, 10, {"optim.lr": 1e-3}, 1.0, "/a"))
    got = {}

    def wait():
        got["decision"], got["at"] = actor.decision("a", timeout_s=30), time.monotonic()

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    assert "decision" not in got  # the generation waits for b
    arrived = time.monotonic()
    actor.check_in("b", Segment("b", 0, 10, {"optim.lr": 1e-2}, 2.0, "/b"))
    waiter.join(timeout=10)
    assert not got["decision"].exploit and got["at"] - arrived < 0.2  # woken, not polled
    assert actor.decision("b", timeout_s=1).donor == "a"
    assert actor.decision("b", timeout_s=0.1) is None  # nothing more to decide yet


def test_a_segment_checked_in_again_is_recorded_once():
    actor = PopulationActor(["a", "b"], {**CFG, "synch": False}, total_steps=30, slots=2)
    for _ in range(2):
        actor.check_in("a", Segment("a", 0, 10, {"optim.lr": 1e-3}, 1.0, "/a"))
    segments, *_ = actor.records()
    assert [(s.trial, s.stop) for s in segments] == [("a", 10)]
