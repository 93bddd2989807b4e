"""The run graph's behaviour, driven by the scripted model (no network, no cost)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import atlas
from atlas.graph import build_graph
from atlas.graph.planner import repair_plan
from tests.conftest import check_snapshot


def _run(
    spec: Any, state_dir: Path, model: str = "scripted", **kw: Any
) -> tuple[Any, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    result = atlas.run(spec, model=model, state_dir_path=state_dir, on_event=events.append, **kw)
    return result, events


def test_graph_topology_snapshot(make_spec: Callable[..., Any]) -> None:
    mermaid = build_graph(make_spec()).get_graph().draw_mermaid()
    check_snapshot("run_graph.mmd", mermaid)
    for name in (
        "plan",
        "dispatch",
        "team.research",
        "team.analysis",
        "team.writing",
        "judge",
        "finalize",
    ):
        assert name in mermaid


def test_quick_run_passes_writes_output_and_reports_usage(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    spec = make_spec()
    result, events = _run(spec, state_dir)
    assert result.status == "passed" and result.passed
    assert Path(result.output).read_text().startswith("# ")
    assert result.iterations == 1
    assert result.tokens == result.input_tokens + result.output_tokens > 0
    assert result.cost_usd == 0.0
    assert set(result.by_team) == {"research", "analysis", "writing"}
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    for kind in ("plan", "dispatch", "handoff", "step_done", "verdict", "finalize"):
        assert kind in kinds


def test_research_and_analysis_overlap_in_time(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    _, events = _run(make_spec(), state_dir, model="scripted?latency_ms=150")
    first_wave = next(e for e in events if e["event"] == "dispatch")
    assert sorted(first_wave["steps"]) == ["1.analysis", "1.research"]
    spans: dict[str, list[float]] = {}
    for e in events:
        if e["event"] in ("step_start", "step_done") and e["id"] in first_wave["steps"]:
            spans.setdefault(e["id"], []).append(e["ts"])
    (r_start, r_end), (a_start, a_end) = spans["1.research"], spans["1.analysis"]
    assert r_start < a_end and a_start < r_end  # the intervals intersect
    overlap = min(r_end, a_end) - max(r_start, a_start)
    assert overlap > 0.5 * min(r_end - r_start, a_end - a_start)


def test_a_one_worker_team_skips_the_supervisor_call(
    make_spec: Callable[..., Any], state_dir: Path, tmp_path: Path
) -> None:
    """Routing with one choice would be a wasted model call: a one-worker team's step goes
    straight to the worker, whose answer is the step's report."""
    agents = tmp_path / "agents"
    agents.mkdir()
    (agents / "research.yaml").write_text(
        "description: Searches the task's documents.\n"
        "supervisor: {persona: research_lead}\n"
        "workers:\n"
        "  - {name: searcher, persona: researcher, description: Searches.,"
        " tools: [search_documents]}\n"
    )
    spec = make_spec(agents_dir=str(agents), memory={"enabled": False})
    log = tmp_path / "calls.jsonl"
    result, events = _run(spec, state_dir, model=f"scripted?call_log={log}")
    assert result.status == "passed"
    (research,) = [e for e in events if e["event"] == "step_done" and e["team"] == "research"]
    assert research["workers"] == ["searcher"] and research["status"] == "done"
    assert not [e for e in events if e["event"] == "handoff" and e["team"] == "research"]
    roles = [json.loads(line)["role"] for line in log.read_text().splitlines()]
    # Two teams with two workers route (3 supervisor calls each); research makes none.
    assert roles.count("supervisor") == 2 * 3
    assert result.by_team["research"]["calls"] == 2  # its one worker: a search, then the answer


def test_writing_waits_for_its_dependencies(make_spec: Callable[..., Any], state_dir: Path) -> None:
    _, events = _run(make_spec(), state_dir)
    done = {e["id"]: e["ts"] for e in events if e["event"] == "step_done"}
    started = {e["id"]: e["ts"] for e in events if e["event"] == "step_start"}
    assert started["1.writing"] >= max(done["1.research"], done["1.analysis"])


def test_failing_verdict_causes_a_replan_with_feedback(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    result, events = _run(make_spec(), state_dir, model="scripted?fail_iterations=1")
    assert result.status == "passed"
    assert result.iterations == 2
    plans = [e for e in events if e["event"] == "plan"]
    verdicts = [e for e in events if e["event"] == "verdict"]
    assert [p["iteration"] for p in plans] == [1, 2]
    assert [v["passed"] for v in verdicts] == [False, True]
    assert all(s["id"].startswith("2.") for s in plans[1]["steps"])


def test_always_failing_judge_stops_at_max_iterations(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    spec = make_spec(budget={"max_iterations": 2})
    result, _ = _run(spec, state_dir, model="scripted?behaviour=always_fail")
    assert result.status == "failed"
    assert result.iterations == 2
    assert "max_iterations" in (result.stop_reason or "")
    assert Path(result.output).exists()  # the output is still written


def test_token_budget_stops_the_run_gracefully(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    spec = make_spec(budget={"max_tokens": 3000})
    result, events = _run(spec, state_dir, model="scripted?prompt_tokens=400&completion_tokens=100")
    assert result.status == "budget_exhausted"
    assert "max_tokens" in (result.stop_reason or "")
    # at most one call's worth of overshoot
    assert result.tokens <= 3000 + 500
    assert Path(result.output).exists()
    assert any(e["event"] == "finalize" and e["status"] == "budget_exhausted" for e in events)


def test_step_budget_cuts_the_plan(make_spec: Callable[..., Any], state_dir: Path) -> None:
    spec = make_spec(budget={"max_steps": 2, "max_iterations": 3})
    result, events = _run(spec, state_dir, model="scripted?behaviour=always_fail")
    ran = [e for e in events if e["event"] == "step_done"]
    assert len(ran) <= 2
    assert result.status in ("budget_exhausted", "failed")


@pytest.mark.parametrize("behaviour", ["ping_pong", "always_delegate"])
def test_supervisor_loops_are_bounded(
    behaviour: str, make_spec: Callable[..., Any], state_dir: Path
) -> None:
    spec = make_spec(budget={"max_handoffs": 5, "max_iterations": 1})
    result, events = _run(spec, state_dir, model=f"scripted?behaviour={behaviour}")
    handoffs = [e for e in events if e["event"] == "handoff"]
    per_step: dict[str, int] = {}
    for h in handoffs:
        per_step[h["step"]] = per_step.get(h["step"], 0) + 1
    assert per_step and max(per_step.values()) <= 5
    notes = [e["note"] for e in events if e["event"] == "step_done"]
    # with two workers, endless delegation is also a ping-pong; either guard stops it
    assert notes and all("ping-pong" in n or "handoff limit" in n for n in notes)
    assert result.status in ("passed", "failed")


def test_repeated_tool_calls_are_refused(make_spec: Callable[..., Any], state_dir: Path) -> None:
    spec = make_spec(budget={"max_iterations": 1})
    result, _ = _run(spec, state_dir, model="scripted?behaviour=repeat_tool")
    assert result.status in ("passed", "failed")
    # each worker: first call runs, the repeat is refused, then it must answer
    assert result.model_calls < 60


def test_plan_repair() -> None:
    raw = [
        {"id": "a", "team": "research", "instruction": "x", "depends_on": ["b"]},
        {"id": "b", "team": "analysis", "instruction": "y", "depends_on": ["a"]},
        {"id": "a", "team": "marketing", "instruction": "z", "depends_on": []},
        {"id": "a", "team": "analysis", "instruction": "", "depends_on": ["ghost"]},
    ]
    steps, notes = repair_plan(raw, ["research", "analysis", "writing"], "task", max_steps=10)
    ids = [s["id"] for s in steps]
    assert ids == ["a", "b", "a_2", "writing"]
    assert steps[0]["depends_on"] == []  # cycle broken
    assert steps[1]["depends_on"] == ["a"]
    assert steps[3]["depends_on"] == ["a", "b", "a_2"]
    assert any("unknown team" in n for n in notes)
    empty, notes = repair_plan([], ["research", "writing"], "task", max_steps=10)
    assert [s["team"] for s in empty] == ["research", "writing"]
    assert "default plan" in notes[0]


def test_async_run_matches_sync(make_spec: Callable[..., Any], state_dir: Path) -> None:
    result = asyncio.run(
        atlas.arun(make_spec(), model="scripted?latency_ms=20", state_dir_path=state_dir)
    )
    assert result.status == "passed"
    assert Path(result.output).exists()
    assert set(result.by_team) == {"research", "analysis", "writing"}


def test_runs_starting_together_on_a_new_state_dir_share_its_databases(tmp_path: Path) -> None:
    """The first runs on a new state directory race to create its SQLite files; one in six
    pairs of runs failed with "database is locked" while switching the new file to WAL. Here
    pairs of threads open 40 new databases at the same moment, as two starting runs do."""
    import threading

    from atlas.runs import connect

    errors: list[BaseException] = []

    def open_db(path: Path, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            con = connect(path)
            con.execute("CREATE TABLE IF NOT EXISTS t (x)")
            con.close()
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    for n in range(40):
        barrier = threading.Barrier(3)
        threads = [
            threading.Thread(target=open_db, args=(tmp_path / f"db{n}.sqlite", barrier))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_compiled_graph_embeds_as_a_subgraph(
    make_spec: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph

    monkeypatch.chdir(tmp_path)
    spec = make_spec(models={"default": "scripted"})
    inner = build_graph(spec, state_dir=tmp_path / "state")

    class Outer(TypedDict, total=False):
        task: str
        status: str
        output_path: str

    outer = StateGraph(Outer)
    outer.add_node("atlas", inner)
    outer.add_edge(START, "atlas")
    outer.add_edge("atlas", END)
    final = outer.compile().invoke({"task": spec.task}, {"configurable": {"thread_id": "embed-1"}})
    assert final["status"] == "passed"
    # Written in the run's own folder under the state directory, not in the working directory.
    assert Path(final["output_path"]).is_relative_to(tmp_path / "state" / "runs")
    assert Path(final["output_path"]).read_text().strip()
    assert not (tmp_path / ".atlas").exists()


def test_iter_events_streams_progress_then_the_summary(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    events = list(atlas.iter_events(make_spec(), model="scripted", state_dir_path=state_dir))
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.index("plan") < kinds.index("verdict") < kinds.index("finalize")
    assert events[-1]["status"] == "passed"


def test_resuming_a_finished_run_changes_nothing(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    first, _ = _run(make_spec(), state_dir)
    again = atlas.resume(first.run_id, state_dir_path=state_dir)
    assert again.status == "passed" and again.resumed
    assert again.model_calls == first.model_calls  # nothing was run again
