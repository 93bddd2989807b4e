#!/bin/sh
# One shot (the minio-bucket service, the minio-bucket Job): creates MLflow's artifact bucket and
# the MinIO user MLflow writes it with. Idempotent: safe to run again. Every value comes from the
# environment: MINIO_URL, MINIO_ROOT_USER, MINIO_ROOT_PASSWORD, MLFLOW_BUCKET,
# MLFLOW_S3_ACCESS_KEY, MLFLOW_S3_SECRET_KEY.
set -eu

: "${MINIO_URL:?}" "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${MLFLOW_BUCKET:?}"
: "${MLFLOW_S3_ACCESS_KEY:?}" "${MLFLOW_S3_SECRET_KEY:?}"

# MinIO may still be starting (Kubernetes has no depends_on): wait up to 5 minutes.
tries=0
until mc alias set local "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge 150 ]; then
    echo "MinIO at $MINIO_URL did not answer" >&2
    exit 1
  fi
  sleep 2
done

mc mb --ignore-existing "local/$MLFLOW_BUCKET"
# adding a user that exists sets its secret key again
mc admin user add local "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY"
mc admin policy attach local readwrite --user "$MLFLOW_S3_ACCESS_KEY" \
  || echo "policy readwrite is already attached to $MLFLOW_S3_ACCESS_KEY"
echo "bucket $MLFLOW_BUCKET ready"
