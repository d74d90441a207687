"""infra/: the `ray up` config through Ray's own validator, and the fields KubeRay, Docker and MLflow need."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"


def load(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def dockerfile_ray_version() -> str:
    (version,) = re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)-", (INFRA / "Dockerfile").read_text())
    return version


def test_ray_up_config_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("cluster.yaml")
    config = prepare_config(raw)  # what `ray up` does first: fill in the provider's defaults
    validate_config(config)  # ray/autoscaler/ray-schema.json, as `ray up` checks it
    assert config["docker"]["image"] == "flotilla:latest"
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_the_validator_catches_a_misspelt_key():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("cluster.yaml")
    raw["docker"]["run_option"] = raw["docker"].pop("run_options")
    with pytest.raises(ValidationError, match="run_option"):
        validate_config(prepare_config(raw))


def containers(template: dict) -> list[dict]:
    return template["template"]["spec"]["containers"]


def check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == dockerfile_ray_version(), f"{where}: rayVersion differs from the Dockerfile's Ray"
    assert spec["authOptions"] == {"mode": "token"}, where
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: rayStartParams values are strings"
    assert [c["image"] for c in containers(head)] == ["flotilla:latest"]
    assert spec["workerGroupSpecs"], where
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (worker,) = containers(group)
        assert worker["image"] == "flotilla:latest" and worker["resources"]["limits"]["nvidia.com/gpu"]
        mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
        volumes = {v["name"] for v in group["template"]["spec"]["volumes"]}
        assert mounts["runs"] == "/runs" and set(mounts) <= volumes, f"{where}: checkpoints need shared storage"


def test_raycluster_manifest():
    m = load("raycluster.yaml")
    assert (m["apiVersion"], m["kind"], m["metadata"]["name"]) == ("ray.io/v1", "RayCluster", "flotilla")
    check_cluster_spec(m["spec"], "raycluster.yaml")
    assert m["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_rayjob_manifest():
    m = load("rayjob.yaml")
    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", "RayJob") and m["metadata"]["name"]
    spec = m["spec"]
    config = re.search(r"flotilla train (\S+)", spec["entrypoint"]).group(1)
    # The entrypoint's config is one the image holds (the Dockerfile copies configs/ to /home/ray/flotilla).
    assert config.startswith("/home/ray/flotilla/configs/") and (INFRA.parent / config.removeprefix("/home/ray/flotilla/")).is_file()
    assert "checkpoint.dir=/runs" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")


def test_dockerfile_installs_the_project_on_a_cuda_base():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:[\d.]+-py311-gpu$", text, re.M)  # Ray's CUDA image
    assert "pip install --no-cache-dir -e ." in text
    for package in ("orchestrator", "trainers", "tune", "kernels", "configs"):
        assert re.search(rf"^COPY .*\b{package} {package}$", text, re.M), package


def test_mlflow_server_has_a_database_an_artifact_store_and_loopback_by_default():
    script = INFRA / "mlflow-server.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "HOST=${HOST:-127.0.0.1}" in text
    assert "--backend-store-uri" in text and "sqlite:///" in text
    assert "--artifacts-destination" in text and "--serve-artifacts" in text
