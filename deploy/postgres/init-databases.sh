#!/bin/sh
# Postgres's first start only (docker-entrypoint-initdb.d runs it when the data volume is new):
# the role `mlflow` with its databases `mlflow` (tracking store) and `mlflow_auth` (basic-auth's
# users), and the role `atlas` with its database `atlas` (ATLAS_STATE_URL). The passwords come
# from the environment (MLFLOW_DB_PASSWORD, ATLAS_DB_PASSWORD); psql reads them itself
# (\getenv, psql 15+), so no password is written into a file or a command line.
set -eu

: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"
: "${ATLAS_DB_PASSWORD:?ATLAS_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres <<'SQL'
\getenv mlflow_password MLFLOW_DB_PASSWORD
\getenv atlas_password ATLAS_DB_PASSWORD
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE ROLE atlas LOGIN PASSWORD :'atlas_password';
CREATE DATABASE atlas OWNER atlas;
SQL
