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


def _calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.parametrize("point", ["dispatch", "writing step"])
def test_a_cancelled_arun_resumes_without_repeating_a_finished_call(
    point: str, tmp_path: Path
) -> None:
    """The sync `resume` of a run whose async caller cancelled it: passes, and makes exactly
    the calls an uninterrupted run makes (none twice)."""
    when = {
        "dispatch": lambda e: e["type"] == "dispatch",
        "writing step": lambda e: e["type"] == "step_start" and e.get("team") == "writing",
    }[point]
    (tmp_path / "cut").mkdir()
    spec = atlas.load_task(_write_task(tmp_path / "cut"))
    log = tmp_path / "cut" / "calls.jsonl"
    state = tmp_path / "cut" / "state"
    run_id = _cancel_when(spec, f"scripted?latency_ms=100&call_log={log}", state, when)
    assert RunStore(state).get(run_id).status == "interrupted"
    before = _calls(log)
    resumed = atlas.resume(run_id, state_dir_path=state)
    assert resumed.status == "passed" and resumed.resumed
    (tmp_path / "whole").mkdir()
    whole_spec = atlas.load_task(_write_task(tmp_path / "whole"))
    whole_log = tmp_path / "whole" / "calls.jsonl"
    whole = atlas.run(
        whole_spec, model=f"scripted?call_log={whole_log}", state_dir_path=tmp_path / "whole" / "s"
    )
    assert whole.status == "passed"
    assert 0 < before < _calls(log)
    assert _calls(log) == _calls(whole_log), "a finished model call was made again"
