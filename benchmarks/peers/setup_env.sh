#!/usr/bin/env bash
# Create the peers' environment, .venv-peers at the repository root, from requirements.txt.
#
# The peers (langgraph-supervisor, CrewAI) get their own venv so their dependencies never touch
# ATLAS's .venv. ATLAS's heavy dependencies (mlflow, torch, ATLAS's memory stack) are not installed
# here: the peers import only atlas.testing, atlas.tools, atlas.spec and atlas.registry from the
# source tree (PYTHONPATH=<repo root>). Idempotent: a stamp file holds the hash of
# requirements.txt, and a matching stamp skips the install.
#
# Usage: benchmarks/peers/setup_env.sh [--force]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$ROOT/.venv-peers"
REQS="$HERE/requirements.txt"
STAMP="$VENV/.requirements.sha256"

hash_now="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [[ "${1:-}" != "--force" && -x "$VENV/bin/python" && -f "$STAMP" ]] \
    && [[ "$(cat "$STAMP")" == "$hash_now" ]]; then
    echo "peers env up to date: $VENV"
    exit 0
fi

# uv if it is on PATH or in ATLAS's venv; else the standard library's venv and pip.
UV="$(command -v uv || true)"
if [[ -z "$UV" && -x "$ROOT/.venv/bin/uv" ]]; then
    UV="$ROOT/.venv/bin/uv"
fi

started=$(date +%s)
if [[ -n "$UV" ]]; then
    [[ -x "$VENV/bin/python" ]] || "$UV" venv --python 3.11 "$VENV"
    "$UV" pip install --python "$VENV/bin/python" -r "$REQS"
else
    [[ -x "$VENV/bin/python" ]] || python3.11 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --upgrade pip
    "$VENV/bin/python" -m pip install -r "$REQS"
fi
echo "$hash_now" >"$STAMP"
echo "peers env ready: $VENV ($(($(date +%s) - started)) s)"
