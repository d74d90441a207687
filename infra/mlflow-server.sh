#!/usr/bin/env bash
# A tracking server for a team: SQLite metadata and local artifacts, on loopback unless HOST is set.
#   infra/mlflow-server.sh            -> http://127.0.0.1:5000 ; export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
set -euo pipefail
STORE=${STORE:-$HOME/mlflow}
mkdir -p "$STORE/artifacts"
exec mlflow server --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}" \
  --backend-store-uri "sqlite:///$STORE/mlflow.db" --artifacts-destination "$STORE/artifacts" --serve-artifacts
