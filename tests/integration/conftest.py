"""A real multi-node Ray cluster on loopback for the integration tests that need one: one per test module."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from orchestrator import local_cluster


@pytest.fixture(scope="module")
def ray_cluster():
    """Two nodes (head `node_a`, `node_b`), one CPU each, token authentication on.

    Its temp dirs live under a short /tmp path (Ray's Unix sockets have a 107-byte path limit, which
    pytest's tmp_path can pass), and stopping it ends only its own processes.
    """
    root = Path(tempfile.mkdtemp(prefix="flotilla-ray-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "MLFLOW_"))}
    cluster = local_cluster.start(root, nodes=("node_a", "node_b"), cpus=1, env={**env, "RAY_USAGE_STATS_ENABLED": "0"})
    yield cluster
    local_cluster.stop(root)
    shutil.rmtree(root, ignore_errors=True)
