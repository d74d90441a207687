#!/usr/bin/env bash
# Create .venv and install Flotilla with its test dependencies. torch is pinned to the CPU build first
# where one is available locally, so the `torch>=2.6` range does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.6"
python -m pip install -q -e ".[dev]"
