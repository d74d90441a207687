"""Ray Jobs API: submit a run to a cluster, follow it, stop it (as `ray job` does).

A submitted job runs `flotilla train config.yaml` on the cluster with the config already validated and
resolved here, so a bad config never reaches the cluster. The cluster's image must have Flotilla installed
(infra/Dockerfile); paths in the config are the cluster's paths.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from orchestrator.config import Config
from orchestrator.launch import JOB_ID_ENV


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(config: Config, run_name: str, address: str) -> str:
    submission_id = f"flotilla-{run_name}"
    with tempfile.TemporaryDirectory(prefix="flotilla-job-") as workdir:
        resolved = config.model_copy(update={"tracking": config.tracking.model_copy(update={"run_name": run_name})})
        (Path(workdir) / "config.yaml").write_text(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False))
        return _client(address).submit_job(
            entrypoint="flotilla train config.yaml",
            submission_id=submission_id,
            runtime_env={"working_dir": workdir, "env_vars": {JOB_ID_ENV: submission_id}},
            metadata={"flotilla.run_name": run_name},
        )


def status(job_id: str, address: str) -> str:
    return str(_client(address).get_job_status(job_id).value)


def logs(job_id: str, address: str, follow: bool = False):
    """Yields the job's log text: all of it, or (follow) chunks as they are written until the job ends."""
    client = _client(address)
    if not follow:
        yield client.get_job_logs(job_id)
        return
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            yield chunk

    agen = tail().__aiter__()
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop(job_id: str, address: str) -> bool:
    return bool(_client(address).stop_job(job_id))
