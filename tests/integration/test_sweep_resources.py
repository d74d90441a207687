"""Sweep trials drive, they do not compute: on a 2-CPU Ray, 4 trial drivers must leave both CPUs to the
trainers they launch, so that two 1-CPU trainers run at once (a hundredth of a CPU per driver did not:
1.96 CPUs left room for one, and a sweep ran its trials one at a time)."""

from __future__ import annotations

import time

import pytest

from orchestrator.ray_connect import use_fresh_token
from tune.sweep import DRIVER_RESOURCES

pytest.importorskip("ray")


def test_trial_drivers_leave_every_cpu_to_the_trainers(tmp_path):
    import ray
    from ray import tune

    use_fresh_token()  # as Flotilla's embedded Ray: token authentication on, a token of this test's own
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        @ray.remote(num_cpus=1)
        def trainer() -> tuple[float, float]:  # stands for a 1-CPU Ray Train worker: it holds its CPU for 3 s
            began = time.time()
            time.sleep(3)
            return began, time.time()

        def driver(config):
            # DEFAULT: outside the trial's placement group, as Ray Train places its own workers
            began, ended = ray.get(trainer.options(scheduling_strategy="DEFAULT").remote())
            return {"began": began, "ended": ended}

        grid = tune.Tuner(
            tune.with_resources(driver, DRIVER_RESOURCES),
            param_space={"trial": tune.grid_search([0, 1, 2, 3])},
            tune_config=tune.TuneConfig(max_concurrent_trials=4),
            run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
        ).fit()
        spans = sorted((r.metrics["began"], r.metrics["ended"]) for r in grid)
    finally:
        ray.shutdown()
    assert len(spans) == 4
    # two at a time: the first two overlap, and the four take about two trainers' time (one at a time: four)
    assert spans[1][0] < spans[0][1]
    assert spans[-1][1] - spans[0][0] < 3 * 3
