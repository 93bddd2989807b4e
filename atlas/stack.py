"""The servers a task is configured to use, each checked without a model call (`atlas doctor
[TASK]`): ATLAS's state store, the tracking store, vector and graph memory, and the model
cache. One `PartCheck` per part: where it is (no password) and what is wrong, if anything.

A run makes the same checks before its first model call: a state or memory server that
cannot be used, or an unreachable cache, stops it there in one line naming the part; a
tracking server that cannot be used sends the trace to the local store with one warning.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas.errors import AtlasError
from atlas.tracing.redact import public_url, scrub_text, secret_values


@dataclass
class PartCheck:
    part: str
    """`state`, `tracking`, `vector memory`, `graph memory` or `cache`."""
    where: str
    """The server's URL or the embedded store's path, with no password in it."""
    problem: str | None = None
    """Why a run cannot use it; None when it can."""
    note: str = "ok"
    """What was found when it can (`ok`, `tables ready`, `embedded, created on first use`)."""

    def line(self) -> str:
        state = f"FAILED: {self.problem}" if self.problem else self.note
        return scrub_text(f"{self.part}: {self.where}: {state}", secret_values())


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return scrub_text(text, secret_values())[:300]


def check_state(spec: Any) -> PartCheck:
    from atlas.runs_postgres import connect, state_url

    url = state_url(spec)
    if url is None:
        return PartCheck("state", "SQLite files in the state directory", note="embedded")
    where = public_url(url)
    try:
        con = connect(url)
    except AtlasError as exc:
        return PartCheck("state", where, _why(exc).removeprefix(f"state store {where}: "))
    try:
        row = con.execute(
            "SELECT to_regclass('atlas_runs') AS runs, to_regclass('checkpoints') AS saver"
        ).fetchone()
    except Exception as exc:
        return PartCheck("state", where, _why(exc))
    finally:
        with contextlib.suppress(Exception):
            con.close()
    ready = bool(row and row["runs"] and row["saver"])
    return PartCheck(
        "state", where, note="tables ready" if ready else "reachable; the first run makes tables"
    )


def check_tracking(spec: Any, state_dir: Path, tracking_uri: str | None) -> PartCheck:
    from atlas.tracing.mlflow import (
        DEFAULT_EXPERIMENT,
        choose_uri,
        local_uri,
        store_problem,
    )

    if not spec.tracing.enabled:
        return PartCheck("tracking", "-", note="off (tracing.enabled: false)")
    uri = choose_uri(spec, state_dir, tracking_uri)
    if uri == local_uri(state_dir):
        # The state directory's own store: doctor's file checks look at mlflow.db (and can
        # move a corrupt one aside).
        return PartCheck("tracking", public_url(uri), note="embedded")
    problem = store_problem(
        uri, local_uri(state_dir), spec.tracing.experiment or DEFAULT_EXPERIMENT
    )
    if problem:
        problem += "; runs would trace to the local store instead"
    return PartCheck("tracking", public_url(uri), problem)


def check_memory(spec: Any, state_dir: Path) -> list[PartCheck]:
    from atlas.memory.graph import is_server_uri
    from atlas.memory.store import GRAPH_FILE, VECTOR_DIR, Memory

    if not spec.memory.enabled:
        return [PartCheck("memory", "-", note="off (memory.enabled: false)")]
    memory = Memory.for_spec(spec, state_dir)
    checks: list[PartCheck] = []
    try:
        settings = spec.memory
        if settings.vector_url:
            checks.append(
                _opened("vector memory", settings.vector_url, lambda: memory.vector.collection)
            )
        else:
            checks.append(_embedded("vector memory", memory.directory / VECTOR_DIR))
        if is_server_uri(settings.graph_uri):
            checks.append(
                _opened("graph memory", str(settings.graph_uri), lambda: memory.graph.backend)
            )
        else:
            checks.append(_embedded("graph memory", memory.directory / GRAPH_FILE))
    finally:
        with contextlib.suppress(Exception):
            memory.close()
    return checks


def _opened(part: str, url: str, open_store: Callable[[], object]) -> PartCheck:
    """A memory server, opened as a run opens it."""
    try:
        open_store()
    except AtlasError as exc:
        return PartCheck(part, public_url(url), _why(exc))
    return PartCheck(part, public_url(url))


def _embedded(part: str, path: Path) -> PartCheck:
    """An embedded store is only looked at: doctor creates nothing."""
    if path.exists():
        return PartCheck(part, str(path), note="embedded")
    return PartCheck(part, str(path), note="embedded, created on first use")


def check_cache(spec: Any, state_dir: Path) -> PartCheck | None:
    from atlas.models.cache import CACHE_FILE, cache_enabled, cache_url, open_store

    if not cache_enabled(spec):
        return None
    url = cache_url(spec)
    where = public_url(url) if url else str(state_dir / CACHE_FILE)
    try:
        store = open_store(url, state_dir)
        try:
            store.check()
        finally:
            store.close()
    except AtlasError as exc:
        return PartCheck("cache", where, _why(exc).split(": ", 2)[-1])
    return PartCheck("cache", where)


def check_stack(spec: Any, state_dir: Path, tracking_uri: str | None = None) -> list[PartCheck]:
    """Every configured part, in the order a run uses them."""
    checks = [check_state(spec), check_tracking(spec, state_dir, tracking_uri)]
    checks += check_memory(spec, state_dir)
    cache = check_cache(spec, state_dir)
    if cache is not None:
        checks.append(cache)
    return checks


def default_spec() -> Any:
    """The settings a task gets when it sets none (and the environment's servers)."""
    from atlas.spec import TaskSpec

    return TaskSpec.from_dict({"task": "atlas doctor"}, base_dir=os.getcwd())
