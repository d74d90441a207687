#!/usr/bin/env bash
# A tracking server for a team: run metadata in a database, artifacts in an artifact store that the server
# proxies (clients need no storage credentials), on loopback unless HOST says otherwise.
#
#   infra/mlflow-server.sh                                  # SQLite + files under ~/mlflow, http://127.0.0.1:5000
#   BACKEND_STORE_URI=postgresql://mlflow@db:5432/mlflow ARTIFACTS_DESTINATION=s3://bucket/mlflow \
#     HOST=0.0.0.0 ALLOWED_HOSTS=mlflow,mlflow:5000 infra/mlflow-server.sh    # shared: Postgres + S3, for the cluster
#
# Then, where runs start: export MLFLOW_TRACKING_URI=http://HOST:5000 (`flotilla submit` passes it to its jobs).
# A database password belongs in ~/.pgpass or PGPASSWORD, not in BACKEND_STORE_URI: the URI shows in `ps`.
# Listening beyond loopback serves anyone who reaches the port; put it behind a private network or an
# authenticating proxy (or MLflow's own `--app-name basic-auth`, passed through EXTRA_ARGS).
set -euo pipefail
STORE=${STORE:-$HOME/mlflow}
BACKEND_STORE_URI=${BACKEND_STORE_URI:-sqlite:///$STORE/mlflow.db}
ARTIFACTS_DESTINATION=${ARTIFACTS_DESTINATION:-$STORE/artifacts}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-5000}
case "$BACKEND_STORE_URI" in sqlite:*) mkdir -p "$STORE" ;; esac
case "$ARTIFACTS_DESTINATION" in *://*) ;; *) mkdir -p "$ARTIFACTS_DESTINATION" ;; esac
# MLflow's host-header check (against DNS rebinding) lets in only the names listed, loopback by default.
ALLOWED_HOSTS=${ALLOWED_HOSTS:-localhost,localhost:$PORT,127.0.0.1,127.0.0.1:$PORT}
# shellcheck disable=SC2086  # EXTRA_ARGS is a list of options
exec mlflow server --host "$HOST" --port "$PORT" \
  --backend-store-uri "$BACKEND_STORE_URI" \
  --artifacts-destination "$ARTIFACTS_DESTINATION" --serve-artifacts \
  --allowed-hosts "$ALLOWED_HOSTS" ${EXTRA_ARGS:-}
