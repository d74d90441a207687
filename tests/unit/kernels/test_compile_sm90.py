"""Every kernel compiles for an H100 (sm_90) at the tile sizes its launcher picks there, without register
spills and within the 227 KiB of shared memory a block may use — checked on a machine without a GPU by
compiling ahead of time (see compile_sm90.py); the interpreter cannot see any of this."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[3]
H100_MAX_SHARED_PER_BLOCK = 227 * 1024


@pytest.mark.skipif(not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
                    reason="this Triton has no bundled CUDA toolchain")
def test_kernels_compile_for_h100_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # GPU tile sizes, compiled kernels
    done = subprocess.run([sys.executable, "-m", "tests.unit.kernels.compile_sm90", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    compiled = {r["kernel"] for r in rows}
    defined = {line.split("(")[0][4:] for path in (ROOT / "kernels").glob("*.py")
               for line in path.read_text().splitlines() if line.startswith("def _") and "_kernel(" in line}
    assert compiled == defined, f"not compiled: {defined - compiled}"
    for r in rows:
        assert r["spill_bytes"] == 0, f"{r['kernel']} spills {r['spill_bytes']} B with {r['config']}"
        assert r["shared_bytes"] <= H100_MAX_SHARED_PER_BLOCK, f"{r['kernel']} needs {r['shared_bytes']} B of smem"
