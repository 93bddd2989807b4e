"""Embedding for real: one `atlas.build_graph()` serves many tasks, each invocation is a run with
its own record, output and trace, and a cancelled invocation resumes without repeating calls."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver

import atlas
from atlas.errors import OutputBusy, SpecError
from atlas.runs import RunStore

TASK_A = "Count the bike-share trips in the pilot data."
TASK_B = "Summarise what the managers' notes say about weekend demand."


def _calls(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _plan_text(output_path: str) -> str:
    return (Path(output_path).parent / "plan.json").read_text()


def test_one_graph_serves_two_tasks_on_two_threads(
    make_spec: Callable[..., Any], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    spec = make_spec(tracing={"enabled": True}, memory={"enabled": False})
    graph = atlas.build_graph(spec, state_dir=state, model="scripted")
    outs: dict[str, dict[str, Any]] = {}

    def go(name: str, task: str) -> None:
        outs[name] = graph.invoke({"task": task}, {"configurable": {"thread_id": name}})

    threads = [threading.Thread(target=go, args=a) for a in (("a", TASK_A), ("b", TASK_B))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = outs["a"], outs["b"]
    assert a["status"] == b["status"] == "passed"
    # Each run planned and wrote its own task, into its own folder.
    assert TASK_A in _plan_text(a["output_path"]) and TASK_B not in _plan_text(a["output_path"])
    assert TASK_B in _plan_text(b["output_path"]) and TASK_A not in _plan_text(b["output_path"])
    assert a["output"].startswith(f"# {TASK_A}") and b["output"].startswith(f"# {TASK_B}")
    assert a["output_path"] != b["output_path"]
    assert Path(a["output_path"]).read_text().rstrip() == a["output"].rstrip()
    # Two runs, two records, two traces.
    records = {r.run_id: r for r in RunStore(state).list()}
    assert set(records) == {a["run_id"], b["run_id"]}
    assert {r.status for r in records.values()} == {"passed"}
    assert a["trace_id"] and b["trace_id"] and a["trace_id"] != b["trace_id"]
    import mlflow

    mlflow.set_tracking_uri(records[a["run_id"]].tracking_uri)
    for out, task, thread in ((a, TASK_A, "a"), (b, TASK_B, "b")):
        trace = mlflow.get_trace(out["trace_id"])
        assert trace.info.tags.get("atlas.run_id") == out["run_id"]
        assert trace.info.trace_metadata.get("mlflow.trace.session") == thread  # the conversation
        assert task in json.dumps(trace.data.spans[0].inputs)


def test_a_thread_invoked_again_after_its_time_limit_runs_normally(
    make_spec: Callable[..., Any], tmp_path: Path
) -> None:
    graph = atlas.build_graph(
        make_spec(memory={"enabled": False}),
        state_dir=tmp_path / "state",
        model="scripted",
        checkpointer=InMemorySaver(),
    )
    config: Any = {"configurable": {"thread_id": "t"}}
    started = time.monotonic()
    first = graph.invoke({"task": TASK_A, "budget": {"timeout_s": 3}}, config)
    assert first["status"] == "passed"
    time.sleep(max(0.0, 3.5 - (time.monotonic() - started)))
    second = graph.invoke({"task": TASK_B, "budget": {"timeout_s": 3}}, config)
    assert second["status"] == "passed", second.get("stop_reason")
    assert second["run_id"] != first["run_id"]
    # The thread now holds the second run only: none of the first run's results or usage.
    values = graph.get_state(config).values
    assert values["run_id"] == second["run_id"]
    assert all(r["instruction"] for r in values["results"].values())
    assert TASK_A not in json.dumps(values["results"])
    assert second["model_calls"] == first["model_calls"]


def test_build_graph_without_a_spec_runs_with_defaults(tmp_path: Path) -> None:
    graph = atlas.build_graph(state_dir=tmp_path / "state")
    out = graph.invoke(
        {"task": "Write three lines on why ferries run late.", "acceptance": ["Has a title."]},
        context={"model": "scripted"},
    )
    assert out["status"] == "passed"
    assert out["verdict"]["criteria"][0]["criterion"] == "Has a title."
    assert Path(out["output_path"]).is_relative_to(tmp_path / "state" / "runs")


@pytest.mark.parametrize(
    ("graph_input", "context", "message"),
    [
        ({"task": "  "}, None, "needs a 'task'"),
        ({"tsak": "typo"}, None, "needs a 'task'"),
        ({"task": "ok", "budget": {"max_steps": 0}}, None, "max_steps"),
        ({"task": "ok"}, {"modle": "scripted"}, "unknown context field(s) modle"),
    ],
)
def test_bad_input_is_a_one_line_error_and_costs_no_call(
    make_spec: Callable[..., Any],
    tmp_path: Path,
    graph_input: dict[str, Any],
    context: Any,
    message: str,
) -> None:
    log = tmp_path / "calls.jsonl"
    graph = atlas.build_graph(
        make_spec(), state_dir=tmp_path / "state", model=f"scripted?call_log={log}"
    )
    with pytest.raises(SpecError) as err:
        graph.invoke(graph_input, context=context)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert _calls(log) == []


def test_concurrent_async_invocations_stay_apart(
    make_spec: Callable[..., Any], tmp_path: Path
) -> None:
    graph = atlas.build_graph(
        make_spec(memory={"enabled": False}),
        state_dir=tmp_path / "state",
        model="scripted?latency_ms=20",
    )

    async def both() -> list[dict[str, Any]]:
        return list(
            await asyncio.gather(graph.ainvoke({"task": TASK_A}), graph.ainvoke({"task": TASK_B}))
        )

    a, b = asyncio.run(both())
    assert a["status"] == b["status"] == "passed"
    assert a["output"].startswith(f"# {TASK_A}") and b["output"].startswith(f"# {TASK_B}")
    assert a["output_path"] != b["output_path"] and a["run_id"] != b["run_id"]


def test_inside_a_traced_app_atlas_spans_join_the_callers_trace(
    make_spec: Callable[..., Any], tmp_path: Path
) -> None:
    import mlflow

    state = tmp_path / "state"
    graph = atlas.build_graph(
        make_spec(tracing={"enabled": True}, memory={"enabled": False}),
        state_dir=state,
        model="scripted",
    )
    graph.invoke({"task": "warm-up: set the store up"})  # the tracking store now exists
    mlflow.set_tracking_uri(RunStore(state).list()[0].tracking_uri)
    mlflow.set_experiment("atlas")
    with mlflow.start_span("app.request") as parent:
        out = graph.invoke({"task": TASK_A})
    assert out["status"] == "passed"
    assert out["trace_id"] == parent.trace_id
    trace = mlflow.get_trace(parent.trace_id)
    names = [s.name for s in trace.data.spans]
    assert names[0] == "app.request" and "atlas.task" in names and "plan" in names
    root = next(s for s in trace.data.spans if s.name == "atlas.task")
    assert root.parent_id == parent.span_id
    assert RunStore(state).get(out["run_id"]).trace_id == parent.trace_id


def _memory_spans(tracking_uri: str, trace_id: str) -> tuple[list[tuple[int, set[str]]], int]:
    """A run's recalls, each (start ns, the runs whose findings or outputs it returned), and when
    its memory settled (end ns of `memory.settle`; what it stored was pending until then)."""
    import mlflow

    spans = mlflow.MlflowClient(tracking_uri).get_trace(trace_id).data.spans
    recalls = []
    for span in spans:
        if span.name.startswith("memory.recall"):
            runs = set()
            for doc in span.outputs or []:
                kind, _, rest = str(doc["id"]).partition(":")
                if kind in ("finding", "output"):
                    runs.add(rest.split(":")[0].split("#")[0])
            recalls.append((span.start_time_ns, runs))
    (settle,) = [s.end_time_ns for s in spans if s.name == "memory.settle"]
    return recalls, settle


def test_concurrent_runs_recall_only_their_namespace_and_only_finished_runs(
    make_spec: Callable[..., Any], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    graph = atlas.build_graph(
        make_spec(tracing={"enabled": True}),
        state_dir=state,
        model="scripted?latency_ms=30",
    )

    async def runs() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        seed = await graph.ainvoke({"task": TASK_A, "namespace": "alpha"})
        together = await asyncio.gather(
            graph.ainvoke({"task": TASK_A, "namespace": "alpha"}),
            graph.ainvoke({"task": TASK_A, "namespace": "alpha"}),
            graph.ainvoke({"task": TASK_A, "namespace": "beta"}),
        )
        return seed, list(together)

    seed, (a1, a2, b) = asyncio.run(runs())
    assert {o["status"] for o in (seed, a1, a2, b)} == {"passed"}
    uri = RunStore(state).get(seed["run_id"]).tracking_uri
    assert uri is not None
    spans = {o["run_id"]: _memory_spans(uri, o["trace_id"]) for o in (seed, a1, a2, b)}
    settled = {run: settle for run, (_, settle) in spans.items()}
    # Beta never sees alpha's passages (the same task, so they would match well).
    assert all(runs == set() for _, runs in spans[b["run_id"]][0])
    for out in (a1, a2):
        recalls = spans[out["run_id"]][0]
        alpha = {seed["run_id"], a1["run_id"], a2["run_id"]}
        assert recalls and all(runs <= alpha for _, runs in recalls)
        # The earlier alpha run is recalled; the concurrent one only once it had finished.
        assert any(seed["run_id"] in runs for _, runs in recalls)
        for started, runs in recalls:
            assert all(settled[run] < started for run in runs), (started, runs, settled)


def _cancel_and_resume(
    make_spec: Callable[..., Any], tmp_path: Path, when: Callable[[dict[str, Any]], bool]
) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    """Stream an embedded run, cancel it at the first event `when` accepts, resume it with
    `None` on the same thread; return (calls, the resumed output, calls before the cancel)."""
    log = tmp_path / "calls.jsonl"
    graph = atlas.build_graph(
        make_spec(memory={"enabled": False}),
        state_dir=tmp_path / "state",
        model=f"scripted?latency_ms=100&call_log={log}",
        checkpointer=InMemorySaver(),
    )
    config: Any = {"configurable": {"thread_id": "cancelled"}}

    async def main() -> tuple[dict[str, Any], int]:
        hit = asyncio.Event()

        async def consume() -> None:
            async for part in graph.astream({"task": TASK_A}, config, stream_mode="custom"):
                if isinstance(part, dict) and when(part):
                    hit.set()

        task = asyncio.create_task(consume())
        waiter = asyncio.create_task(hit.wait())
        done, _ = await asyncio.wait({task, waiter}, timeout=120, return_when="FIRST_COMPLETED")
        assert waiter in done, "the cancel point was never reached"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        before = len(_calls(log))
        return await graph.ainvoke(None, config), before

    out, before = asyncio.run(main())
    return _calls(log), out, before


@pytest.mark.parametrize(
    "point",
    ["dispatch", "writing step"],
)
def test_a_cancelled_invocation_resumes_without_repeating_a_call(
    point: str, make_spec: Callable[..., Any], tmp_path: Path
) -> None:
    when = {
        "dispatch": lambda e: e.get("type") == "dispatch",
        "writing step": lambda e: e.get("type") == "step_start" and e.get("team") == "writing",
    }[point]
    calls, out, before = _cancel_and_resume(make_spec, tmp_path / "cut", when)
    assert out["status"] == "passed"
    records = RunStore(tmp_path / "cut" / "state").list()
    assert [r.run_id for r in records] == [out["run_id"]]  # the same run, resumed
    assert records[0].status == "passed"
    # The uninterrupted run of the same task, for the count.
    (tmp_path / "whole").mkdir()
    log = tmp_path / "whole" / "calls.jsonl"
    whole = atlas.build_graph(
        make_spec(memory={"enabled": False}),
        state_dir=tmp_path / "whole" / "state",
        model=f"scripted?call_log={log}",
    ).invoke({"task": TASK_A})
    assert whole["status"] == "passed"
    assert 0 < before < len(calls)
    assert len(calls) == len(_calls(log)), "a finished model call was made again"


def test_two_runs_of_one_spec_at_once_never_overwrite_one_output(
    make_spec: Callable[..., Any], tmp_path: Path
) -> None:
    spec = make_spec(memory={"enabled": False})
    started = threading.Event()
    results: list[Any] = []

    def first() -> None:
        results.append(
            atlas.run(
                spec,
                model="scripted?latency_ms=100",
                state_dir_path=tmp_path / "state",
                on_event=lambda e: started.set(),
            )
        )

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(120)
    with pytest.raises(OutputBusy, match="being written by another run of this task"):
        atlas.run(spec, model="scripted", state_dir_path=tmp_path / "state")
    thread.join()
    assert results[0].status == "passed"
    assert Path(results[0].output).read_text().strip()
