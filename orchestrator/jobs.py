"""Ray Jobs API: submit a run to a cluster, follow it, stop it (as `ray job` does).

A submitted job runs `flotilla train config.yaml` on the cluster with the config already validated and
resolved here, so a bad config never reaches the cluster. The cluster's image must have Flotilla installed
(infra/Dockerfile); paths in the config are the cluster's paths. The job logs to the MLFLOW_TRACKING_URI
set where `flotilla submit` runs, if any (the cluster must reach it), else to the cluster's own.

Token authentication: Ray (2.60) starts a cluster with it on when RAY_AUTH_MODE=token, and `ray start --head`
also when RAY_AUTH_MODE is unset and a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).
Such a cluster answers 401 to a request without its token and 403 to a wrong one. Here the token comes from
RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, and goes in the Authorization header whatever
RAY_AUTH_MODE says (Ray's client sends one only with RAY_AUTH_MODE=token); with neither set, Ray's own
lookup applies (RAY_AUTH_MODE=token and ~/.ray/auth_token).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.config import Config

# Our own submit sets this, so a run started by `flotilla submit` is tagged with its Ray job id.
JOB_ID_ENV = "FLOTILLA_RAY_JOB_ID"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(RuntimeError):
    """The cluster could not be reached, refused us, or does not know the job; the message is for people."""


@dataclass
class JobOutcome:
    status: str
    """SUCCEEDED, FAILED or STOPPED (or PENDING / RUNNING when asked before the end)."""
    message: str
    """Ray's account of why it ended, e.g. the entrypoint's exit code."""


def _token() -> tuple[str | None, str]:
    """The token to send and where it came from."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            return Path(path).read_text().strip(), f"RAY_AUTH_TOKEN_PATH ({path})"
        except OSError as err:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH = {path!r}: cannot read the token ({err.strerror})") from None
    return None, "Ray's default token file ~/.ray/auth_token (RAY_AUTH_MODE=token)"


@contextmanager
def _talking_to(address: str):
    """Turn the Jobs client's errors into ones that say what to do."""
    from ray.exceptions import AuthenticationError

    token, source = _token()
    try:
        yield
    except AuthenticationError:
        if token is None and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            raise JobsError(f"the Ray cluster at {address} uses token authentication and no token was given: set "
                            "RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the head node prints "
                            "it), or RAY_AUTH_TOKEN_PATH to a file holding it") from None
        raise JobsError(f"the Ray cluster at {address} refused the token from {source}: set RAY_AUTH_TOKEN to the "
                        "token its nodes were started with (`ray get-auth-token` on the head node prints it)") from None
    except ConnectionError:
        raise JobsError(f"nothing answers at {address}: give the head's dashboard address (http://HEAD:8265), and "
                        "check the cluster is up; a dashboard on the head's loopback needs a tunnel "
                        "(`ray dashboard cluster.yaml`, `kubectl port-forward svc/NAME-head-svc 8265:8265`)") from None
    except RuntimeError as err:  # the Jobs API's answer to a bad request, e.g. an unknown job id
        raise JobsError(f"the Ray Jobs API at {address}: {err}") from None


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    token, _ = _token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with _talking_to(address):
        return JobSubmissionClient(address, headers=headers)


def _call(address: str, action: Callable):
    client = _client(address)
    with _talking_to(address):
        return action(client)


def next_submission_id(run_name: str, jobs: dict[str, str]) -> str:
    """The job id for run `run_name`, given the cluster's jobs (id -> status): flotilla-<run>, or
    flotilla-<run>-<n> when earlier jobs of the run have ended (a resubmitted run continues from its
    checkpoint under a new job id). A run whose job is still going is refused: two drivers of one run would
    write over each other's checkpoints."""
    base = f"flotilla-{run_name}"
    numbered = {job: int(job.removeprefix(base + "-")) for job in jobs
                if job.startswith(base + "-") and job.removeprefix(base + "-").isdigit()}
    ours = [job for job in jobs if job == base or job in numbered]
    if live := sorted(job for job in ours if jobs[job] not in TERMINAL):
        raise JobsError(f"run {run_name!r} is already running as job {live[0]}: wait for it, or stop it "
                        f"(flotilla stop {live[0]}) before submitting it again")
    if base not in ours:
        return base
    return f"{base}-{max(numbered.values(), default=1) + 1}"


def submit(config: Config, run_name: str, address: str) -> str:
    jobs = _call(address, lambda c: {j.submission_id: str(j.status.value) for j in c.list_jobs() if j.submission_id})
    job_id = next_submission_id(run_name, jobs)
    env = {JOB_ID_ENV: job_id}
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = uri
    with tempfile.TemporaryDirectory(prefix="flotilla-job-") as workdir:
        resolved = config.model_copy(update={"tracking": config.tracking.model_copy(update={"run_name": run_name})})
        (Path(workdir) / "config.yaml").write_text(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False))
        return _call(address, lambda c: c.submit_job(
            entrypoint="flotilla train config.yaml",
            submission_id=job_id,
            runtime_env={"working_dir": workdir, "env_vars": env},
            metadata={"flotilla.run_name": run_name},
        ))


def status(job_id: str, address: str) -> JobOutcome:
    info = _call(address, lambda c: c.get_job_info(job_id))
    return JobOutcome(str(info.status.value), info.message or "")


def logs(job_id: str, address: str, follow: bool = False) -> Iterator[str]:
    """Yields the job's log text: all of it, or (follow) chunks as they are written until the job ends."""
    client = _client(address)
    if not follow:
        with _talking_to(address):
            yield client.get_job_logs(job_id)
        return
    chunks = client.tail_job_logs(job_id).__aiter__()
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                with _talking_to(address):
                    yield loop.run_until_complete(chunks.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def wait(job_id: str, address: str, out: Callable[[str], None], settle_s: float = 30) -> JobOutcome:
    """Follow the job's logs (each chunk to `out`) to its end; returns its final status."""
    for chunk in logs(job_id, address, follow=True):
        out(chunk)
    # The log stream closes when the entrypoint exits; the status turns terminal a moment later.
    deadline = time.monotonic() + settle_s
    outcome = status(job_id, address)
    while outcome.status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        outcome = status(job_id, address)
    return outcome


def stop(job_id: str, address: str) -> bool:
    return bool(_call(address, lambda c: c.stop_job(job_id)))
