"""The `ray` executor: one Ray task per run, on a running cluster (`--address`) or on a local
one started for the batch (usage stats off, no dashboard, on 127.0.0.1).

Retries are the driver's, not Ray's (`max_retries=0`): a task whose worker died comes back as
lost, and the driver submits it again, which resumes the run from its checkpoint; the manifest
and the progress lines show every attempt. A cluster that spans machines needs shared state:
the batch is refused, in one line naming what to configure, when the runs would keep their
state, traces, memory or cache in embedded stores on each machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from dataclasses import asdict
from typing import Any

from atlas.batch import Batch, Item, run_item
from atlas.batch.driver import WorkerLost, item_payload
from atlas.errors import AtlasError, SpecError


class RayUnavailable(AtlasError):
    exit_code = 2


def _ray(local: bool) -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local and "ray" not in sys.modules and not os.environ.get("RAY_AUTH_TOKEN"):
        # Ray's servers listen on every interface; its token is what keeps others out. A
        # fresh one per local cluster, in the environment (its workers inherit it), instead of
        # the file Ray would otherwise leave in ~/.ray. Set before Ray is imported.
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--executor ray needs Ray: pip install 'atlas-agents[ray]'") from None
    return ray


class RayExecutor:
    def __init__(self, batch: Batch, address: str | None = None, workers: int | None = None):
        ray = self.ray = _ray(local=not address)
        self.batch = batch
        self._owned = not ray.is_initialized()
        if self._owned:
            try:
                if address:
                    ray.init(
                        address=address,
                        log_to_driver=False,
                        configure_logging=False,
                    )
                else:
                    ray.init(
                        # "local": a new cluster for this batch, even where a cluster runs
                        # (ray.init() alone would join the one `ray start` left running)
                        address="local",
                        num_cpus=workers or os.cpu_count() or 1,
                        # Runs pass a few kilobytes through it: not 30% of the memory.
                        object_store_memory=256 * 2**20,
                        include_dashboard=False,
                        log_to_driver=False,
                        configure_logging=False,
                        _node_ip_address="127.0.0.1",
                    )
            except Exception as exc:
                where = address or "a local cluster"
                text = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise RayUnavailable(f"Ray: cannot start or reach {where}: {text}") from None
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.slots = max(1, cpus)
        self.machines = len({n.get("NodeManagerAddress") for n in nodes})
        if self.machines > 1:
            refuse_embedded(batch)
        self._task = ray.remote(num_cpus=1, max_retries=0)(run_item)
        self._pending: set[Any] = set()

    def submit(self, item: Item) -> Any:
        ref = self._task.remote(item_payload(item), asdict(self.batch.options), self.batch.batch_id)
        self._pending.add(ref)
        return ref

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, Any]]:
        if not handles:
            return []
        ray = self.ray
        ready, _ = ray.wait(handles, num_returns=1, timeout=timeout)
        out: list[tuple[Any, Any]] = []
        for ref in ready:
            self._pending.discard(ref)
            try:
                out.append((ref, ray.get(ref)))
            except ray.exceptions.RayError as exc:
                lost = isinstance(
                    exc,
                    ray.exceptions.WorkerCrashedError
                    | ray.exceptions.NodeDiedError
                    | ray.exceptions.LocalRayletDiedError,
                )
                reason = "a Ray worker process died" if lost else "the Ray task failed"
                text = " ".join(str(exc).split())[:200]
                out.append((ref, WorkerLost(f"{reason}: {text}")))
        return out

    def shutdown(self, cancel: bool = False) -> None:
        if cancel:
            # KeyboardInterrupt in each running task: the run saves its state, is recorded
            # `interrupted`, and `atlas batch --resume` continues it.
            for ref in list(self._pending):
                with contextlib.suppress(Exception):
                    self.ray.cancel(ref)
            with contextlib.suppress(Exception):
                self.ray.wait(list(self._pending), num_returns=len(self._pending), timeout=30)
        if self._owned:
            self.ray.shutdown()


def refuse_embedded(batch: Batch) -> None:
    """On a cluster of several machines every run must reach the same stores."""
    from atlas.models.cache import cache_enabled, cache_url
    from atlas.spec import load_task

    opts = batch.options
    missing: list[str] = []
    if not opts.state_url:
        missing.append("ATLAS_STATE_URL (state in Postgres)")
    seen: set[str] = set()
    for item in batch.items:
        spec = load_task(item.task_file, overrides=item.overrides or None)
        uri = (
            opts.tracking_uri or spec.tracing.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        )
        if spec.tracing.enabled and not (uri and uri.startswith(("http://", "https://"))):
            seen.add("--tracking-uri http://... (an MLflow server)")
        if spec.memory.enabled and not spec.memory.vector_url:
            seen.add("memory.vector_url (a Chroma server)")
        if spec.memory.enabled and not spec.memory.graph_uri:
            seen.add("memory.graph_uri (a graph server)")
        if cache_enabled(spec) and not cache_url(spec):
            seen.add("cache.url (Redis)")
    missing += sorted(seen)
    if missing:
        raise SpecError(
            "the Ray cluster spans machines, so every run must share its stores: set "
            + ", ".join(missing),
            field="--executor ray",
        )
