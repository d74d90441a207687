#!/usr/bin/env bash
# Set up (if needed) and run the tiny demo on an embedded Ray, tracked in MLflow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
flotilla train configs/tiny.yaml "$@"
