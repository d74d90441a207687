"""The installed project imports as itself from anywhere, not only from its checkout (Ray workers run in
their own directories)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_top_level_packages_resolve_to_this_checkout_outside_it(tmp_path):
    # A dependency once brought a distribution with a top-level `kernels` package of its own (transformers
    # 5.25 -> Hugging Face's kernels), which took the name from ours everywhere but the checkout.
    probe = "import kernels, orchestrator, trainers, tune; print('\\n'.join(m.__file__ for m in (kernels, orchestrator, trainers, tune)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for path in out.stdout.split():
        assert Path(path).resolve().is_relative_to(ROOT), path
