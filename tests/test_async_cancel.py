"""An async run that its caller cancels (a client hanging up, `task.cancel()`) is recorded as
interrupted, not as an error, and keeps its partial output."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import atlas
from atlas.runs import RunStore
from tests.test_resume import _write_task


def _cancel_when(spec: Any, model: str, state: Path, when: Any) -> str:
    """Start `arun`, cancel it at the first event `when` accepts; return the run id."""
    seen: dict[str, Any] = {}

    async def main() -> None:
        hit = asyncio.Event()

        def on_event(event: dict[str, Any]) -> None:
            if event["type"] == "start":
                seen["run_id"] = event["run_id"]
            if when(event):
                hit.set()

        task = asyncio.create_task(
            atlas.arun(spec, model=model, state_dir_path=state, on_event=on_event)
        )
        waiter = asyncio.create_task(hit.wait())
        done, _ = await asyncio.wait({task, waiter}, timeout=120, return_when="FIRST_COMPLETED")
        assert waiter in done, "the cancel point was never reached"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    return str(seen["run_id"])


def test_a_run_cancelled_after_a_step_finished_keeps_a_partial_output(tmp_path: Path) -> None:
    spec = atlas.load_task(_write_task(tmp_path))
    state = tmp_path / "state"
    run_id = _cancel_when(
        spec,
        "scripted?latency_ms=150",
        state,
        lambda e: e["type"] == "step_start" and e.get("team") == "writing",
    )
    record = RunStore(state).get(run_id)
    assert record.status == "interrupted"
    partial = spec.output_path.with_name(spec.output_path.stem + ".partial.md")
    assert partial.is_file() and partial.read_text().strip()
