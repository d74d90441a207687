#!/usr/bin/env bash
# Set up (if needed) and run the default test suite: unit, distributed (gloo) and integration (real Ray,
# real MLflow). Heavier tests are marked `slow` and run with: .venv/bin/python -m pytest -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
