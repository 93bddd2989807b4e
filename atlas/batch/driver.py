"""The batch's driver: submits items to an executor as slots and per-provider caps allow,
records every outcome in the manifest, and retries an item whose worker died by resuming its
run. Executors (`local.py`, `ray.py`) only start `run_item` calls and report how they ended."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from atlas.batch import Batch, Item

MAX_ATTEMPTS = 3
"""Attempts per item when its worker dies (each after the first resumes the run)."""


class WorkerLost(Exception):
    """The process running an item died (killed, out of memory) before it reported."""


class Executor(Protocol):
    slots: int
    """How many items may run at once (pool size, or the cluster's CPUs)."""

    def submit(self, item: Item) -> Any: ...

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, Any]]:
        """Handles that finished, each with `run_item`'s outcome or a WorkerLost."""
        ...

    def shutdown(self, cancel: bool = False) -> None: ...


Listener = Callable[[str, Batch, Item | None], None]
"""Called on the driver's thread: ("start"|"finish"|"retry"|"tick", batch, item)."""


def drive(
    batch: Batch,
    executor: Executor,
    directory: Path,
    *,
    max_concurrency: int | None = None,
    caps: dict[str, int] | None = None,
    listener: Listener | None = None,
) -> Batch:
    """Run every unfinished item of `batch`. KeyboardInterrupt stops the executor, marks the
    items that were running `interrupted` (the manifest says so) and is raised again."""
    notify = listener or (lambda kind, b, i: None)
    limit = max(1, min(max_concurrency or executor.slots, executor.slots))
    caps = dict(caps or {})
    queue = [item for item in batch.items if not item.done]
    for item in queue:
        item.status = "pending"
    running: dict[Any, Item] = {}
    busy: dict[str, int] = {}
    batch.save(directory)
    try:
        while queue or running:
            while len(running) < limit:
                chosen = _next(queue, busy, caps)
                if chosen is None:
                    break
                item = chosen
                queue.remove(item)
                item.status, item.attempts = "running", item.attempts + 1
                busy[item.provider] = busy.get(item.provider, 0) + 1
                running[executor.submit(item)] = item
                batch.save(directory)
                notify("start", batch, item)
            for handle, outcome in executor.wait(list(running), timeout=0.5):
                item = running.pop(handle)
                busy[item.provider] -= 1
                if isinstance(outcome, BaseException):
                    if item.attempts < MAX_ATTEMPTS:
                        item.status, item.error = "pending", _line(outcome)
                        queue.insert(0, item)
                        batch.save(directory)
                        notify("retry", batch, item)
                        continue
                    item.status, item.error = "error", _line(outcome)
                else:
                    item.status = str(outcome.get("status") or "error")
                    item.result = outcome.get("result") or item.result
                    item.error = outcome.get("error")
                batch.save(directory)
                notify("finish", batch, item)
            notify("tick", batch, None)
    except BaseException:
        executor.shutdown(cancel=True)
        for item in running.values():
            item.status = "interrupted"
        batch.save(directory)
        raise
    executor.shutdown()
    return batch


def _next(queue: list[Item], busy: dict[str, int], caps: dict[str, int]) -> Item | None:
    for item in queue:
        cap = caps.get(item.provider)
        if cap is None or busy.get(item.provider, 0) < cap:
            return item
    return None


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def item_payload(item: Item) -> dict[str, Any]:
    """What a worker needs of an item (a plain dict: it crosses process boundaries)."""
    data = asdict(item)
    data.pop("result", None)
    return data
