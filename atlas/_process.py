"""Child servers ATLAS starts on 127.0.0.1 (the local model server, the MLflow UI), and the
file lock that serialises work several processes may start at once."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def die_with_parent() -> None:
    """`preexec_fn` for a child server: the kernel sends it SIGTERM when ATLAS dies, even of
    SIGKILL, so no server outlives the process that started it (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def wait_for_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """Poll `url` until it answers. None when it does; otherwise why not (exited or timed out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return None
        except urllib.error.HTTPError as exc:
            exc.close()  # not ready yet (a loading server answers 503); free its socket
            time.sleep(0.2)
        except OSError:
            time.sleep(0.2)
    return f"did not answer at {url} within {timeout:g}s"


def stop(proc: subprocess.Popen[bytes], first: signal.Signals = signal.SIGTERM) -> None:
    """Ask a child to stop, then kill it if it has not within 10 s."""
    if proc.poll() is not None:
        return
    proc.send_signal(first)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (first creation of a store, a one-time export)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
