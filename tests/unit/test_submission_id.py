"""Job ids of a run submitted again (orchestrator.jobs.next_submission_id): pure, no cluster."""

from __future__ import annotations

import pytest

from orchestrator.jobs import JobsError, next_submission_id


def test_a_run_gets_its_name_then_numbered_ids_after_earlier_jobs_ended():
    assert next_submission_id("r", {}) == "flotilla-r"
    assert next_submission_id("r", {"flotilla-r": "STOPPED"}) == "flotilla-r-2"
    assert next_submission_id("r", {"flotilla-r": "FAILED", "flotilla-r-2": "STOPPED", "flotilla-r-7": "SUCCEEDED"}) == "flotilla-r-8"
    # other runs whose names start alike are not this run's jobs
    assert next_submission_id("r", {"flotilla-r-big": "RUNNING", "flotilla-rx": "RUNNING"}) == "flotilla-r"


@pytest.mark.parametrize("state", ["PENDING", "RUNNING"])
def test_a_run_whose_job_is_still_going_is_refused(state):
    with pytest.raises(JobsError, match="run 'r' is already running as job flotilla-r-2: .*flotilla stop flotilla-r-2"):
        next_submission_id("r", {"flotilla-r": "STOPPED", "flotilla-r-2": state})
