"""The embedded Ray of `flotilla train` keeps out whoever lacks its token (orchestrator.ray_connect): a client
without a token and one with a wrong token can neither join nor run a task, while the run itself trains to the
end; the token appears in no console line, MLflow param, tag, metric or artifact, checkpoint file or Ray log."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import yaml

CONFIG = {
    "model": {"vocab_size": 64, "dim": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
    "data": {"source": "synthetic", "synthetic_docs": 400, "synthetic_mean_len": 40},
    # Long enough (half a minute of training on 2 cores, after Ray Train's start-up) for the probes below, a few
    # seconds each, to run while the cluster is up; the last probe, which holds the right token, shows that it was.
    "train": {"steps": 150, "micro_batch_size": 4, "seq_len": 64, "val_every": 150, "val_batches": 1, "log_every": 50},
    "cluster": {"num_workers": 1},
    "checkpoint": {"every": 75},
    "tracking": {"experiment": "auth", "system_metrics": False},
}

# A client of the cluster: joins it and runs one task. Prints RAN only if the task ran.
PROBE = """
import sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
    print(ray.get(ray.remote(num_cpus=0)(lambda: "RAN").remote(), timeout=60))
except Exception as err:
    print("REFUSED", type(err).__name__, str(err)[:200])
    sys.exit(3)
"""


def _gcs_port(ray_tmp: Path, deadline: float) -> int:
    """The GCS port of the only Ray session under `ray_tmp`, once Ray has written it."""
    while time.time() < deadline:
        ports = list(ray_tmp.glob("ray/session_latest/gcs_server_port_*"))
        if ports and ports[0].read_text().strip():
            return int(ports[0].read_text())
        time.sleep(0.5)
    raise AssertionError(f"no GCS port file under {ray_tmp} in time")


def _session_token(ray_tmp: Path) -> str:
    """The token the run's GCS server was started with, read from its process environment: this test's stand-in
    for the run's own driver, the one client that holds it."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "gcs_server" and str(ray_tmp) in " ".join(proc.info["cmdline"] or []):
            return proc.environ()["RAY_AUTH_TOKEN"]
    raise AssertionError("the run's gcs_server process was not found")


def _probe(address: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", PROBE, address], env=env, text=True, capture_output=True, timeout=120)
    return proc.stdout + proc.stderr


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def test_embedded_ray_refuses_clients_without_its_token_while_the_run_trains(tmp_path):
    import mlflow
    from ray.util import get_node_ip_address

    # A short path of its own: Ray's socket paths must stay under the 107 bytes of a unix socket name
    ray_tmp = Path(tempfile.mkdtemp(prefix="flauth-", dir="/tmp"))
    try:
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(CONFIG))
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_"))}
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        env = {**clean, "MLFLOW_TRACKING_URI": uri, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
        run = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", "run.yaml", "-o", "tracking.run_name=auth"],
                               cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            address = f"{get_node_ip_address()}:{_gcs_port(ray_tmp, time.time() + 180)}"  # the machine's address, not loopback
            # No ~/.ray/auth_token to fall back on; 3 connection attempts a second apart (Ray's default is 20) before
            # a refused client gives up
            client = {**clean, "HOME": str(tmp_path), "RAY_gcs_server_port_wait_time_s": "3"}
            with ThreadPoolExecutor(2) as pool:
                no_token = pool.submit(_probe, address, client)
                wrong_token = pool.submit(_probe, address, {**client, "RAY_AUTH_MODE": "token",
                                                            "RAY_AUTH_TOKEN": secrets.token_urlsafe(32)})
                no_token, wrong_token = no_token.result(), wrong_token.result()
            token = _session_token(ray_tmp)
            right_token = _probe(address, {**client, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
            out, _ = run.communicate(timeout=600)
        finally:
            if run.poll() is None:
                run.kill()
        for refused in (no_token, wrong_token):
            assert "RAN" not in refused and "REFUSED" in refused and "InvalidAuthToken" in refused, refused[-2000:]
        assert "RAN" in right_token, right_token[-2000:]  # the address was right and the cluster up all along
        assert run.returncode == 0 and "flotilla: finished" in out, out[-4000:]

        assert token not in out
        mlflow.set_tracking_uri(uri)
        (found,) = mlflow.search_runs(experiment_names=["auth"], output_format="list")
        logged = {**found.data.params, **found.data.tags, **{k: str(v) for k, v in found.data.metrics.items()}}
        assert not [k for k, v in logged.items() if token in k or token in v]
        artifacts = Path(mlflow.artifacts.download_artifacts(run_id=found.info.run_id, dst_path=str(tmp_path / "artifacts")))
        assert any(artifacts.rglob("*")) and any((tmp_path / "runs").rglob("*"))
        # the run's whole folder: MLflow's store and artifacts, the checkpoints, the config; and Ray's session files
        assert not _files_containing(tmp_path, token.encode())
        assert not _files_containing(ray_tmp, token.encode())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
