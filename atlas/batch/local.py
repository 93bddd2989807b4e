"""The `local` executor: a pool of worker processes on this machine (spawned, so each has its
own MLflow and LangGraph state), one run at a time each. A worker that dies breaks Python's
pool: the pool is made again and the items it was running are reported lost (the driver
resumes them)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
from dataclasses import asdict
from typing import Any

from atlas.batch import Batch, Item, run_item
from atlas.batch.driver import WorkerLost, item_payload


def _quiet_worker() -> None:
    # Ctrl-C goes to the driver, which stops the workers with SIGTERM (each run then saves
    # its state and is recorded `interrupted`, as `atlas run` does).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LocalExecutor:
    def __init__(self, batch: Batch, workers: int | None = None) -> None:
        self.batch = batch
        self.slots = max(1, workers or os.cpu_count() or 1)
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=self.slots,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_quiet_worker,
        )

    def submit(self, item: Item) -> Any:
        return self._pool.submit(
            run_item, item_payload(item), asdict(self.batch.options), self.batch.batch_id
        )

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, Any]]:
        if not handles:
            return []
        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        out: list[tuple[Any, Any]] = []
        broken = False
        for future in done:
            try:
                out.append((future, future.result()))
            except cf.process.BrokenProcessPool as exc:
                broken = True
                out.append((future, WorkerLost(f"a worker process died: {exc}")))
            except Exception as exc:
                out.append((future, WorkerLost(f"the worker failed: {exc}")))
        if broken:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
        return out

    def shutdown(self, cancel: bool = False) -> None:
        if cancel:
            for process in list(getattr(self._pool, "_processes", {}).values()):
                if process.is_alive():
                    process.terminate()  # SIGTERM: the run saves its state and stops
        self._pool.shutdown(wait=True, cancel_futures=cancel)
