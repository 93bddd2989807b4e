#!/bin/sh
# Starts `mlflow server` with basic auth: the tracking store in Postgres, artifacts proxied to
# S3 (MinIO). Everything comes from the environment:
#   MLFLOW_BACKEND_STORE_URI      postgresql+psycopg://mlflow:PASSWORD@postgres:5432/mlflow
#   MLFLOW_AUTH_DATABASE_URI      postgresql+psycopg://mlflow:PASSWORD@postgres:5432/mlflow_auth
#   MLFLOW_ARTIFACTS_DESTINATION  s3://BUCKET/artifacts (with MLFLOW_S3_ENDPOINT_URL, AWS_*)
#   MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD   the admin, created on first start
#   MLFLOW_FLASK_SERVER_SECRET_KEY, MLFLOW_SERVER_ALLOWED_HOSTS
# MLflow reads basic auth's database from an ini file only, so this writes one (mode 600, in
# the container's own /tmp) and points MLFLOW_AUTH_CONFIG_PATH at it.
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?}" "${MLFLOW_AUTH_DATABASE_URI:?}" "${MLFLOW_ARTIFACTS_DESTINATION:?}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?}" "${MLFLOW_AUTH_ADMIN_PASSWORD:?}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?}"

config="$(mktemp -d)/basic_auth.ini"
umask 077
# configparser treats % as interpolation: a literal % (a percent-encoded password) is %%
auth_uri=$(printf '%s' "$MLFLOW_AUTH_DATABASE_URI" | sed 's/%/%%/g')
cat > "$config" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${auth_uri}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config"

exec mlflow server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --app-name basic-auth \
  --host 0.0.0.0 \
  --port 5000 \
  --workers "${MLFLOW_WORKERS:-2}"
