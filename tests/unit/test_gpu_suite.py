"""bench/gpu_suite.py --smoke: every stage of the GPU suite runs on a CPU at tiny sizes (Ray and MLflow included)
and writes its results, so the one command the GPU machine gets is known to get through its plumbing. A
subprocess, as a user runs it; under a minute on a quiet 2-core machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["correctness", "kernels", "training", "flotilla-train", "sp-profile"]


def test_the_smoke_run_writes_every_stage(tmp_path):
    out = tmp_path / "suite"
    # as a user runs it: no Triton interpreter or forced kernels (tests/conftest.py sets them for this process)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLOTILLA_KERNELS")}
    done = subprocess.run([sys.executable, "bench/gpu_suite.py", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    suite = (out / "suite.md").read_text()
    for stage in STAGES:
        assert f"| {stage} | done |" in suite, suite
        result = json.loads((out / f"{stage}.json").read_text())
        assert result["rows"], (stage, result["notes"])
        assert result["environment"]["versions"]["torch"] and result["environment"]["date"]
        assert (out / f"{stage}.md").read_text().startswith("# ")
    rows = {stage: json.loads((out / f"{stage}.json").read_text())["rows"] for stage in STAGES}
    assert {r["suite"] for r in rows["correctness"]} and all(r["failed"] == 0 for r in rows["correctness"])
    assert {r["bench"] for r in rows["kernels"]} >= {"attention", "packed", "adamw", "RMSNorm"}
    assert {r["engine"] for r in rows["training"]} == {"hf-eager", "fsdp"}
    assert all(r["loss_vs_hf_eager"] < 1e-4 for r in rows["training"])  # float32 on a CPU: the same losses
    assert rows["flotilla-train"][0]["steps"] == 3 and rows["flotilla-train"][0]["mlflow_run"]
    assert all(r["measured_ms"] > 0 for r in rows["sp-profile"])
