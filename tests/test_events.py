"""Progress events as an embedding app sees them: every event typed and documented, `on_event`
called only on the caller's thread or event loop, and the two iterators (`astream`,
`iter_events`) streaming a run as it happens and stopping it when the caller leaves early."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest

import atlas
from atlas.errors import ModelConfigError, RunLocked
from atlas.events import EVENT_TYPES
from atlas.runs import RunStore
from tests.conftest import free_port


def _check(event: dict[str, Any]) -> str:
    """The event's type, after checking it is documented and has exactly its kind's fields."""
    kind = EVENT_TYPES.get(event.get("type"))  # type: ignore[arg-type]
    assert kind is not None, f"undocumented event: {event}"
    assert event["event"] == event["type"]
    missing = kind.__required_keys__ - event.keys()
    assert not missing, f"{event['type']} lacks {sorted(missing)}: {event}"
    extra = event.keys() - kind.__required_keys__ - kind.__optional_keys__
    assert not extra, f"{event['type']} has undocumented {sorted(extra)}: {event}"
    for key, hint in get_type_hints(kind).items():
        if get_origin(hint) is Literal and key in event:
            assert event[key] in get_args(hint), (key, event)
    return str(event["type"])


def _flaky_analysis(make_spec: Callable[..., Any]) -> Any:
    """Research and analysis run in parallel; analysis's model refuses connections, so its calls
    are retried (in a worker thread) and fall back to the scripted model. Tracing is on, to a
    server that is not there: its warning comes from set-up, outside the graph."""
    down = {
        "model": "openai:gpt-4o-mini",
        "base_url": f"http://127.0.0.1:{free_port()}/v1",
        "max_retries": 1,
        "fallbacks": ["scripted"],
    }
    return make_spec(
        models={"default": "scripted", "teams": {"analysis": down}},
        memory={"enabled": False},
        tracing={"enabled": True, "experiment": "atlas-events"},
    )


_SEEN_IN_A_FLAKY_RUN = {
    "warning",
    "start",
    "plan",
    "dispatch",
    "step_start",
    "handoff",
    "retry",
    "fallback",
    "step_done",
    "verdict",
    "finalize",
    "end",
}


def _assert_flaky_run(events: list[dict[str, Any]]) -> None:
    kinds = [_check(e) for e in events]
    assert _SEEN_IN_A_FLAKY_RUN <= set(kinds), kinds
    assert any(len(e["steps"]) >= 2 for e in events if e["type"] == "dispatch")
    warning = next(e for e in events if e["type"] == "warning")
    assert "MLflow tracking server" in warning["message"]
    assert kinds[-1] == "end" and events[-1]["status"] == "passed"


def test_run_calls_on_event_on_the_callers_thread_with_typed_events(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    caller = threading.get_ident()
    events: list[dict[str, Any]] = []
    threads: set[int] = set()

    def on_event(event: atlas.Event) -> None:
        threads.add(threading.get_ident())
        events.append(dict(event))

    result = atlas.run(
        _flaky_analysis(make_spec),
        state_dir_path=state_dir,
        on_event=on_event,
        tracking_uri=f"http://127.0.0.1:{free_port()}",
    )
    assert result.passed
    assert threads == {caller}
    _assert_flaky_run(events)


async def test_arun_calls_on_event_on_the_callers_loop_with_typed_events(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    """`arun` sends its set-up (tracing's warning) to worker threads; the warning still comes on
    the loop."""
    loop = asyncio.get_running_loop()
    caller = threading.get_ident()
    events: list[dict[str, Any]] = []
    where: set[tuple[int, asyncio.AbstractEventLoop | None]] = set()

    def on_event(event: atlas.Event) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        where.add((threading.get_ident(), running))
        events.append(dict(event))

    result = await atlas.arun(
        _flaky_analysis(make_spec),
        state_dir_path=state_dir,
        on_event=on_event,
        tracking_uri=f"http://127.0.0.1:{free_port()}",
    )
    assert result.passed
    assert where == {(caller, loop)}
    _assert_flaky_run(events)


def test_the_end_event_is_the_run_result() -> None:
    fields = {f.name for f in dataclasses.fields(atlas.RunResult)}
    assert atlas.EndEvent.__required_keys__ == fields | {"type", "event", "ts"}


def test_a_budget_stop_is_a_typed_event(make_spec: Callable[..., Any], state_dir: Path) -> None:
    spec = make_spec(budget={"max_steps": 2}, memory={"enabled": False})
    events = list(atlas.iter_events(spec, model="scripted", state_dir_path=state_dir))
    kinds = [_check(dict(e)) for e in events]
    assert kinds.index("budget_stop") < kinds.index("finalize") < kinds.index("end")
    assert events[-1]["type"] == "end" and events[-1]["status"] == "budget_exhausted"


async def test_astream_yields_the_run_as_it_happens_on_the_callers_loop(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    loop = asyncio.get_running_loop()
    spec = make_spec(memory={"enabled": False})
    kinds: list[str] = []
    output_at_plan: bool | None = None
    async for event in atlas.astream(
        spec, model="scripted?latency_ms=20", state_dir_path=state_dir
    ):
        assert asyncio.get_running_loop() is loop
        kinds.append(_check(dict(event)))
        if event["type"] == "plan" and output_at_plan is None:
            output_at_plan = spec.output_path.exists()
        if event["type"] == "end":
            assert event["status"] == "passed" and event["output"] == str(spec.output_path)
            assert spec.output_path.exists()
    assert output_at_plan is False  # the plan came while the run was still working
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("end") == 1
    order = [kinds.index(k) for k in ("plan", "dispatch", "step_start", "step_done", "verdict")]
    assert order == sorted(order) and order[-1] < kinds.index("finalize")


def _threads_left(before: set[threading.Thread]) -> list[str]:
    return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]


def test_leaving_astream_early_cancels_the_run(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    spec = make_spec(memory={"enabled": False})
    before = set(threading.enumerate())
    seen: list[str] = []
    tasks_after: list[set[asyncio.Task[Any]]] = []

    async def app() -> str:
        run_id = ""
        stream = atlas.astream(spec, model="scripted?latency_ms=20", state_dir_path=state_dir)
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                seen.append(event["type"])
                if event["type"] == "start":
                    run_id = event["run_id"]
                if event["type"] == "handoff":
                    break
        tasks_after.append({t for t in asyncio.all_tasks() if t is not asyncio.current_task()})
        return run_id

    run_id = asyncio.run(app())
    assert tasks_after == [set()]  # nothing of the run is left on the loop
    assert _threads_left(before) == []
    assert "end" not in seen and not spec.output_path.exists()
    record = RunStore(state_dir).get(run_id)
    # arun records a cancelled run as "error" today (it has no "interrupted" path).
    assert record.status in ("interrupted", "error") and record.finished_at is not None


def test_a_plain_break_out_of_astream_stops_the_run_too(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    spec = make_spec(memory={"enabled": False})
    before = set(threading.enumerate())

    async def app() -> str:
        async for event in atlas.astream(
            spec, model="scripted?latency_ms=20", state_dir_path=state_dir
        ):
            if event["type"] == "start":
                return event["run_id"]
        raise AssertionError("no start event")

    run_id = asyncio.run(app())
    assert _threads_left(before) == []
    assert not spec.output_path.exists()
    assert RunStore(state_dir).get(run_id).status != "running"


def test_leaving_iter_events_early_interrupts_the_run_which_resumes(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    spec = make_spec(memory={"enabled": False})
    before = set(threading.enumerate())
    run_id = ""
    for event in atlas.iter_events(spec, model="scripted?latency_ms=20", state_dir_path=state_dir):
        if event["type"] == "start":
            run_id = event["run_id"]
        if event["type"] == "handoff":
            break
    assert _threads_left(before) == []
    assert RunStore(state_dir).get(run_id).status == "interrupted"
    assert not spec.output_path.exists()
    resumed = atlas.resume(run_id, state_dir_path=state_dir)
    assert resumed.status == "passed" and spec.output_path.exists()


def test_iter_events_streams_on_the_callers_thread_and_still_lives_in_runner(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    import atlas.runner

    assert atlas.runner.iter_events is atlas.iter_events
    caller = threading.get_ident()
    threads: set[int] = set()
    kinds: list[str] = []
    for event in atlas.runner.iter_events(
        make_spec(memory={"enabled": False}), model="scripted", state_dir_path=state_dir
    ):
        threads.add(threading.get_ident())
        kinds.append(_check(dict(event)))
    assert threads == {caller}
    assert kinds[0] == "start" and kinds[-1] == "end"


async def test_a_run_that_cannot_start_ends_both_streams_with_error_then_raises(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    from atlas.runner import run_lock

    spec = make_spec(memory={"enabled": False})
    with run_lock(state_dir, "busy-run"):
        kinds: list[str] = []
        with pytest.raises(RunLocked):
            for event in atlas.iter_events(
                spec, model="scripted", state_dir_path=state_dir, run_id="busy-run"
            ):
                kinds.append(_check(dict(event)))
                assert event["type"] != "error" or "already running" in event["error"]
        assert kinds == ["error"]
    errors: list[dict[str, Any]] = []
    with pytest.raises(ModelConfigError):  # no OPENAI_API_KEY here
        async for event in atlas.astream(
            spec, model="openai:gpt-4o-mini", state_dir_path=state_dir
        ):
            errors.append(dict(event))
    assert [_check(e) for e in errors] == ["error"]
    assert "OPENAI_API_KEY" in errors[0]["error"]
