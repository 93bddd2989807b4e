"""`atlas batch`: many task files, one run each, on a pool of worker processes on this machine
(`local`) or on a Ray cluster (`ray`).

The unit of work is one run, with its own record, checkpoints and trace (tagged `atlas.batch_id`).
Each item's run id is fixed when the batch is made (`<batch id>-<n>`), so a retry, or
`atlas batch --resume BATCH_ID`, resumes the run from its checkpoint instead of starting it
over: finished steps are not run again and their model calls are not made again.

The batch itself is a manifest in the state directory (`batches/<id>.json`), written by the
driver (the process that runs `atlas batch`) after every change, atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atlas.errors import AtlasError, SpecError

TERMINAL = ("passed", "failed", "budget_exhausted")
"""Statuses a batch does not run again; the others (error, interrupted, pending, running,
awaiting_approval) are run again, by resuming, on `--resume`."""


@dataclass
class Item:
    index: int
    task_file: str
    run_id: str
    provider: str = ""
    """The provider of the run's model, for `--max-per-provider` caps."""
    status: str = "pending"
    attempts: int = 0
    result: dict[str, Any] | None = None
    """The run's summary: the same object as `atlas run --json` prints."""
    error: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    """Task fields changed for this run (an evaluation's variant, a template's row)."""
    label: str = ""
    """What the item is called in listings (default: its task file)."""

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


@dataclass
class Options:
    """What every run of the batch gets (`atlas run`'s options)."""

    model: str | None = None
    tracking_uri: str | None = None
    state_dir: str = ".atlas"
    state_url: str | None = None
    approve_all: bool = False

    def env(self, batch_id: str) -> dict[str, str]:
        from atlas.runs_postgres import STATE_URL_ENV
        from atlas.tracing.mlflow import BATCH_ENV

        env = {BATCH_ENV: batch_id}
        if self.state_url:
            env[STATE_URL_ENV] = self.state_url
        return env


@dataclass
class Batch:
    batch_id: str
    items: list[Item]
    options: Options
    executor: str = "local"
    created_at: float = field(default_factory=time.time)

    # -- the manifest ---------------------------------------------------------------------------
    @staticmethod
    def path(directory: Path, batch_id: str) -> Path:
        return directory / "batches" / f"{batch_id}.json"

    def save(self, directory: Path) -> None:
        target = self.path(directory, self.batch_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["options"].pop("state_url", None)  # it may hold a password: never written
        temporary = target.with_suffix(f".json.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data, indent=2, default=str))
        os.replace(temporary, target)

    @classmethod
    def load(cls, directory: Path, batch_id: str) -> Batch:
        path = cls.path(directory, batch_id)
        if not path.is_file():
            found = sorted(p.stem for p in path.parent.glob(f"{batch_id}*.json"))
            if len(found) != 1:
                raise BatchNotFound(f"no batch {batch_id!r} in {directory / 'batches'}")
            path = cls.path(directory, found[0])
        try:
            data = json.loads(path.read_text())
            items = [Item(**item) for item in data.pop("items")]
            options = Options(**data.pop("options"))
            return cls(items=items, options=options, **data)
        except (ValueError, TypeError, KeyError) as exc:
            raise BatchNotFound(f"batch manifest {path} is unreadable: {exc}") from None

    # -- figures ------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = {"done": 0, "passed": 0, "failed": 0, "running": 0, "pending": 0}
        for item in self.items:
            if item.done:
                out["done"] += 1
            if item.status == "passed":
                out["passed"] += 1
            elif item.status in ("failed", "budget_exhausted", "error", "interrupted"):
                out["failed"] += 1
            elif item.status == "running":
                out["running"] += 1
            elif item.status == "pending":
                out["pending"] += 1
        return out

    def cost(self) -> float | None:
        costs = [(i.result or {}).get("cost_usd") for i in self.items if i.result]
        if any(c is None for c in costs):
            return None
        return round(sum(float(c) for c in costs if c is not None), 6)


class BatchNotFound(AtlasError):
    exit_code = 2


def new_batch_id() -> str:
    from atlas.context import new_run_id

    return f"batch-{new_run_id()}"


def make_batch(
    task_files: Iterable[str | tuple[str, dict[str, Any], str]],
    options: Options,
    *,
    executor: str = "local",
    batch_id: str | None = None,
) -> Batch:
    """A new batch over these task files (or (file, overrides, label) triples), each checked
    first: a bad task file fails the whole command in one line, before any run starts or any
    model call is made."""
    from atlas.models import ModelRoles, check_override
    from atlas.spec import load_task

    if options.model:
        check_override(options.model)
    batch_id = batch_id or new_batch_id()
    items: list[Item] = []
    for index, entry in enumerate(task_files, start=1):
        name, overrides, label = entry if isinstance(entry, tuple) else (entry, {}, "")
        path = Path(name)
        spec = load_task(path, overrides=overrides)  # raises SpecError naming the file
        provider = ModelRoles(spec, override=options.model).provider("planner")
        items.append(
            Item(
                index,
                str(path.resolve()),
                f"{batch_id}-{index:03d}",
                provider=provider,
                overrides=dict(overrides),
                label=label,
            )
        )
    if not items:
        raise SpecError("give at least one task file", field="TASKS")
    return Batch(batch_id, items, options, executor=executor)


def run_item(item: dict[str, Any], options: dict[str, Any], batch_id: str) -> dict[str, Any]:
    """Run (or resume) one item of a batch; runs in a worker process. Never raises for a
    failure of the run itself: the outcome says what happened."""
    import atlas
    from atlas.errors import RunNotFound
    from atlas.runs import run_store, state_dir
    from atlas.session import one_line
    from atlas.spec import load_task

    opts = Options(**options)
    os.environ.update(opts.env(batch_id))
    directory = state_dir(opts.state_dir)
    run_id = str(item["run_id"])
    started = time.time()
    try:
        try:
            record = run_store(directory).get(run_id)
        except RunNotFound:
            record = None
        if record is not None and record.status in TERMINAL and record.run_id == run_id:
            return {"run_id": run_id, "status": record.status, "result": None, "error": None}
        if record is None:
            spec = load_task(item["task_file"], overrides=item.get("overrides") or None)
            result = atlas.run(
                spec,
                model=opts.model,
                state_dir_path=directory,
                run_id=run_id,
                tracking_uri=opts.tracking_uri,
                task_file=item["task_file"],
                approve_all=opts.approve_all,
            )
        else:
            result = atlas.resume(
                run_id, state_dir_path=directory, model=opts.model, approve_all=opts.approve_all
            )
        return {
            "run_id": run_id,
            "status": result.status,
            "result": result.to_dict(),
            "error": None,
        }
    except KeyboardInterrupt:
        return {"run_id": run_id, "status": "interrupted", "result": None, "error": "interrupted"}
    except Exception as exc:
        with contextlib.suppress(Exception):
            from atlas.runner import last_result

            last = last_result()
            if last is not None and last.run_id == run_id:
                return {
                    "run_id": run_id,
                    "status": last.status,
                    "result": last.to_dict(),
                    "error": one_line(exc),
                }
        return {
            "run_id": run_id,
            "status": "error",
            "result": None,
            "error": one_line(exc),
            "wall_s": round(time.time() - started, 3),
        }
