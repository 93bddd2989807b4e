"""`python -m atlas trace RUN_ID`: a run's story told from its MLflow trace alone.

End to end on a real replanning run (scripted model, iteration 1 fails, 2 passes), the errors a
user can meet (each one line, non-zero exit), and `build_story` on hand-made spans of the
grouped trace shape (`iteration N` spans, team spans carrying their step's usage)."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from atlas.runs import RunRecord, RunStore
from atlas.tracing.story import build_story, render
from tests.conftest import EXAMPLES, atlas_cli, free_port


@pytest.fixture(scope="module")
def replanned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real run that replans: its state directory and `atlas run --json` summary."""
    root = tmp_path_factory.mktemp("trace_story")
    task_dir = root / "quickstart"
    shutil.copytree(
        EXAMPLES / "quickstart", task_dir, ignore=shutil.ignore_patterns("output", ".atlas")
    )
    task = task_dir / "task.yaml"
    text, n = re.subn(r"max_iterations: *\d+", "max_iterations: 2", task.read_text())
    assert n == 1
    task.write_text(text)
    state = root / "state"
    proc = atlas_cli(
        "run",
        str(task),
        "--model",
        "scripted?fail_iterations=1",
        "--json",
        "--quiet",
        "--state-dir",
        str(state),
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["iterations"] == 2 and summary["trace_id"]
    return {"root": root, "state": state, "summary": summary}


def _trace(replanned: dict[str, Any], *args: str) -> Any:
    return atlas_cli("trace", *args, "--state-dir", str(replanned["state"]), cwd=replanned["root"])


@pytest.fixture(scope="module")
def story(replanned: dict[str, Any]) -> dict[str, Any]:
    proc = _trace(replanned, replanned["summary"]["run_id"], "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.e2e
def test_trace_tells_both_rounds_of_a_replanning_run(replanned: dict[str, Any]) -> None:
    summary = replanned["summary"]
    proc = _trace(replanned, summary["run_id"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    first, second = out.split("\niteration 2\n")
    assert "\niteration 1\n" in first
    # Both plans, each with its three steps and the writing step's dependencies.
    for n, part in ((1, first), (2, second)):
        assert re.search(r"^  plan \(3 steps", part, re.M)
        for team in ("research", "analysis", "writing"):
            assert re.search(rf"^    {n}\.{team} +{team} ", part, re.M), part
        assert f"after {n}.research, {n}.analysis: Write the deliverable" in part
        assert f"    1. {n}.research + {n}.analysis\n    2. {n}.writing\n" in part
        assert re.search(rf"^  step {n}\.research \(research\): \d+ tokens \(\d+ in", part, re.M)
        assert "handoff supervisor -> searcher: searcher is the next worker" in part
    # Iteration 1 failed and its feedback went to the planner; iteration 2 passed.
    assert "  verdict: failed, score 0.40" in first
    assert "FAIL  States the total number of trips" in first
    assert "feedback to the planner: Add more detail and cite sources for each claim." in first
    assert "  verdict: passed, score 0.90" in second
    assert "pass  Ends with a clear recommendation" in second
    last = out.strip().splitlines()[-1]
    assert last.startswith("passed · 2 iterations · ")
    assert f"{summary['tokens']} tokens ({summary['input_tokens']} in" in last
    assert "$0.0000" in last and "wall " in last
    assert proc.stderr == ""


@pytest.mark.e2e
def test_trace_json_adds_up_to_what_the_run_reported(
    replanned: dict[str, Any], story: dict[str, Any]
) -> None:
    summary = replanned["summary"]
    assert (story["run_id"], story["trace_id"]) == (summary["run_id"], summary["trace_id"])
    assert story["status"] == "passed"
    rounds = story["iterations"]
    assert [r["iteration"] for r in rounds] == [1, 2]
    assert [(r["verdict"]["passed"], r["verdict"]["score"]) for r in rounds] == [
        (False, 0.4),
        (True, 0.9),
    ]
    assert rounds[0]["verdict"]["feedback"] == "Add more detail and cite sources for each claim."
    assert all(len(r["verdict"]["criteria"]) == 3 for r in rounds)
    assert [c["passed"] for c in rounds[0]["verdict"]["criteria"]] == [False] * 3
    for r in rounds:
        n = r["iteration"]
        assert [(s["id"], s["team"]) for s in r["plan"]] == [
            (f"{n}.research", "research"),
            (f"{n}.analysis", "analysis"),
            (f"{n}.writing", "writing"),
        ]
        assert r["plan"][2]["depends_on"] == [f"{n}.research", f"{n}.analysis"]
        assert r["waves"] == [[f"{n}.research", f"{n}.analysis"], [f"{n}.writing"]]
        assert [s["id"] for s in r["steps"]] == [s["id"] for s in r["plan"]]
        for step in r["steps"]:
            assert step["tokens"] == step["input_tokens"] + step["output_tokens"] > 0
            assert [h["from"] for h in step["handoffs"]] == ["supervisor", "supervisor"]
            assert all(h["to"] and h["reason"] for h in step["handoffs"])
            assert step["guards"] == [{"reason": "handoff limit reached (2)", "worker": None}]
        assert r["planner"]["model_calls"] == r["judge"]["model_calls"] == 1
        assert r["tokens"] == (
            r["planner"]["tokens"] + r["judge"]["tokens"] + sum(s["tokens"] for s in r["steps"])
        )
    steps = [s for r in rounds for s in r["steps"]]
    # Team steps add up to the teams' usage; with planner and judge, to the run's total.
    by_team = summary["by_team"]
    assert sum(s["tokens"] for s in steps) == sum(t["tokens"] for t in by_team.values())
    for team, usage in by_team.items():
        assert sum(s["tokens"] for s in steps if s["team"] == team) == usage["tokens"]
    totals = story["totals"]
    assert totals["unattributed_tokens"] == 0
    assert sum(r["tokens"] for r in rounds) == totals["tokens"] == summary["tokens"]
    assert totals["input_tokens"] == summary["input_tokens"]
    assert (totals["iterations"], totals["cost_usd"]) == (2, summary["cost_usd"])
    assert totals["model_calls"] == summary["model_calls"]
    assert 0 < totals["wall_s"] <= summary["wall_s"] + 1


@pytest.mark.e2e
def test_a_unique_prefix_finds_the_run(replanned: dict[str, Any], story: dict[str, Any]) -> None:
    run_id = replanned["summary"]["run_id"]
    proc = _trace(replanned, run_id[:10], "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == story
    assert proc.stderr.strip() == f"atlas: run {run_id} (matched prefix {run_id[:10]})"


@pytest.fixture
def broken_server() -> Iterator[str]:
    """A tracking server on 127.0.0.1 whose health check passes and whose API fails (503)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/health"):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
            elif "experiments/get-by-name" in self.path:
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no"}')
            else:
                self.send_response(503)
                self.end_headers()

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.e2e
def test_each_error_is_one_line_and_a_nonzero_exit(
    replanned: dict[str, Any], tmp_path: Path, broken_server: str
) -> None:
    state = tmp_path / "state"
    store = RunStore(state)
    real_store = replanned["summary"]["tracking_uri"]

    def record(run_id: str, **values: Any) -> None:
        store.start(
            RunRecord(
                run_id=run_id,
                name=None,
                task_file=None,
                spec_json="{}",
                model=None,
                status="passed",
                started_at=1.0,
                **values,
            )
        )

    record("untraced")
    record("gone", trace_id="tr-1", tracking_uri=f"sqlite:///{tmp_path}/nowhere/mlflow.db")
    record("dead-server", trace_id="tr-1", tracking_uri=f"http://127.0.0.1:{free_port()}")
    record("failing-server", trace_id="tr-1", tracking_uri=broken_server)
    record("lost", trace_id="tr-" + "0" * 32, tracking_uri=real_store)
    record("ambiguous-1")
    record("ambiguous-2")
    cases = {
        "nope": (2, "no run 'nope' in"),
        "ambig": (2, "run id prefix 'ambig' matches 2 runs: ambiguous-"),
        "untraced": (2, "run untraced has no trace (tracing was off"),
        "gone": (3, "the MLflow store sqlite:///"),
        "dead-server": (3, "is unreachable (cannot connect to 127.0.0.1:"),
        "failing-server": (3, f"cannot read trace tr-1 from the MLflow store {broken_server}"),
        "lost": (3, f"trace tr-{'0' * 32} is not in the MLflow store {real_store}"),
    }
    for run_id, (code, words) in cases.items():
        proc = atlas_cli("trace", run_id, "--state-dir", str(state), cwd=tmp_path, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code, (run_id, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("atlas: error: "), (run_id, proc.stderr)
        assert words in lines[0], (run_id, lines[0])
        assert proc.stdout == ""
    assert not (tmp_path / "nowhere").exists()  # a gone store is not created by looking


# --- spans -> story on plain data: the grouped shape -----------------------------------------

_clock = iter(range(1, 10_000))


def _span(
    span_id: str,
    parent: str | None,
    name: str,
    kind: str = "CHAIN",
    attributes: dict[str, Any] | None = None,
    outputs: Any = None,
    inputs: Any = None,
) -> dict[str, Any]:
    start = next(_clock) * 1_000_000
    return {
        "span_id": span_id,
        "parent_id": parent,
        "name": name,
        "type": kind,
        "start_ns": start,
        "end_ns": start + 500_000,
        "attributes": attributes or {},
        "inputs": inputs,
        "outputs": outputs,
    }


def _model(
    span_id: str, parent: str, tokens_in: int, tokens_out: int, cost: float | None = None
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "mlflow.chat.tokenUsage": {
            "input_tokens": tokens_in,
            "output_tokens": tokens_out,
            "total_tokens": tokens_in + tokens_out,
        }
    }
    if cost is not None:
        attributes["mlflow.llm.cost"] = {
            "input_cost": cost / 2,
            "output_cost": cost / 2,
            "total_cost": cost,
        }
    return _span(span_id, parent, "model", "CHAT_MODEL", attributes)


def _plan(n: int, teams: list[str]) -> dict[str, Any]:
    return {
        "iteration": n,
        "steps": [
            {"id": f"{n}.{t}", "team": t, "instruction": f"do {t}\nwell", "depends_on": []}
            for t in teams
        ],
        "repaired": [],
        "fallback": False,
    }


def test_story_of_the_grouped_trace_shape() -> None:
    verdict = {
        "passed": False,
        "score": 0.3,
        "criteria": [{"criterion": "Cites the notes.", "passed": False, "reason": "no cites"}],
        "feedback": "Cite the notes.",
        "iteration": 1,
    }
    spans = [
        _span("caller", None, "my app", "CHAIN"),  # ATLAS inside a caller's trace
        _model("caller-model", "caller", 1000, 1000),
        _span(
            "root",
            "caller",
            "Bike-share brief",
            "AGENT",
            {
                "atlas.run_id": "r1",
                "atlas.status": "failed",
                "atlas.usage.tokens": 1480,
                "atlas.usage.input_tokens": 1000,
                "atlas.usage.output_tokens": 480,
                "atlas.usage.model_calls": 7,
                "atlas.usage.iterations": 2,
            },
            inputs={"task": "Write a brief.\n"},
            outputs={"status": "failed", "stop_reason": "budget exhausted: max_tokens"},
        ),
        _span("it1", "root", "iteration 1", "CHAIN", {"atlas.iteration": 1}),
        # Folded wrappers: the plan span sits right in the iteration, with no atlas.iteration.
        _span("plan1", "it1", "plan", "AGENT", {"atlas.plan.steps": 1}, _plan(1, ["research"])),
        _model("m-plan1", "plan1", 100, 20, cost=0.001),
        _span("wave1", "it1", "dispatch", "CHAIN", {"atlas.wave": ["1.research"]}),
        _span(
            "team1",
            "it1",
            "team.research · 1.research",
            "CHAIN",
            {
                "atlas.team": "research",
                "atlas.step": "1.research",
                "atlas.iteration": 1,
                "atlas.tokens": 300,
                "atlas.input_tokens": 200,
                "atlas.output_tokens": 100,
                "atlas.cost_usd": 0.02,
            },
        ),
        _span(
            "h1",
            "team1",
            "handoff:research->searcher",
            "CHAIN",
            {
                "atlas.handoff.from": "supervisor",
                "atlas.handoff.to": "searcher",
                "atlas.handoff.reason": "needs\x1b[31m facts",
                "atlas.step": "1.research",
            },
        ),
        _span("w1", "team1", "worker:searcher", "AGENT", {"atlas.step": "1.research"}),
        _model("m-w1", "w1", 200, 100, cost=0.02),
        _span(
            "g1",
            "w1",
            "loop_guard",
            "CHAIN",
            {"atlas.worker": "searcher", "atlas.reason": "repeated tool call refused"},
        ),
        _span(
            "judge1",
            "it1",
            "judge",
            "EVALUATOR",
            {"atlas.iteration": 1, "atlas.verdict.passed": False, "atlas.verdict.score": 0.3},
            verdict,
        ),
        _model("m-judge1", "judge1", 50, 10, cost=0.0005),
        _span("it2", "root", "iteration 2", "CHAIN", {"atlas.iteration": 2}),
        _span(
            "plan2",
            "it2",
            "plan",
            "AGENT",
            {"atlas.iteration": 2},
            _plan(2, ["analysis", "writing"]),
        ),
        _model("m-plan2", "plan2", 100, 20, cost=0.001),
        _span("wave2", "it2", "dispatch", "CHAIN", {"atlas.wave": ["2.analysis", "2.writing"]}),
        # Unpriced: the team span has tokens but no atlas.cost_usd.
        _span(
            "team2a",
            "it2",
            "team.analysis · 2.analysis",
            "CHAIN",
            {"atlas.team": "analysis", "atlas.step": "2.analysis", "atlas.tokens": 150},
        ),
        _model("m-2a", "team2a", 100, 50),
        # No usage attributes: summed from the model spans below it, cost included.
        _span("team2w", "it2", "team.writing · 2.writing", "CHAIN"),
        _span("lg", "team2w", "LangGraph", "CHAIN"),
        _model("m-2w1", "lg", 200, 100, cost=0.01),
        _model("m-2w2", "lg", 50, 180, cost=0.02),
        _span("stop", "it2", "budget_stop", "CHAIN", {"atlas.limit": "max_tokens"}),
    ]
    story = build_story(spans, run_id="r1", trace_id="tr-x", status="error")
    assert (story["run_id"], story["status"], story["task"]) == ("r1", "failed", "Write a brief.")
    assert story["stop_reason"] == "budget exhausted: max_tokens"
    first, second = story["iterations"]
    assert first["plan"] == [
        {
            "id": "1.research",
            "team": "research",
            "instruction": "do research\nwell",
            "depends_on": [],
        }
    ]
    assert first["waves"] == [["1.research"]]
    (research,) = first["steps"]
    assert research == {
        "id": "1.research",
        "team": "research",
        "tokens": 300,
        "input_tokens": 200,
        "output_tokens": 100,
        "cost_usd": 0.02,
        "model_calls": 1,
        "handoffs": [{"from": "supervisor", "to": "searcher", "reason": "needs [31m facts"}],
        "guards": [{"reason": "repeated tool call refused", "worker": "searcher"}],
    }
    assert first["planner"]["tokens"] == 120 and first["planner"]["cost_usd"] == 0.001
    assert first["judge"]["tokens"] == 60
    assert first["verdict"]["passed"] is False and first["verdict"]["score"] == 0.3
    assert first["verdict"]["criteria"] == [
        {"criterion": "Cites the notes.", "passed": False, "reason": "no cites"}
    ]
    assert first["verdict"]["feedback"] == "Cite the notes."
    assert first["tokens"] == 120 + 300 + 60
    analysis, writing = second["steps"]
    assert (analysis["tokens"], analysis["cost_usd"], analysis["input_tokens"]) == (150, None, None)
    assert (writing["team"], writing["tokens"], writing["input_tokens"]) == ("writing", 530, 250)
    assert writing["cost_usd"] == pytest.approx(0.03)
    assert second["waves"] == [["2.analysis", "2.writing"]]
    assert second["verdict"] is None
    assert second["notes"] == ["budget stop: max_tokens"]
    totals = story["totals"]
    assert (totals["tokens"], totals["iterations"], totals["model_calls"]) == (1480, 2, 7)
    assert totals["cost_usd"] is None  # the root does not say: not every call was priced
    assert totals["unattributed_tokens"] == 0  # the caller's own model call is not the run's
    text = render(story)
    assert "\x1b" not in text
    assert "  step 1.research (research): 300 tokens (200 in, 100 out), $0.0200" in text
    assert "    handoff supervisor -> searcher: needs [31m facts" in text
    assert "    loop guard (searcher): repeated tool call refused" in text
    assert "    1.research  research  do research well" in text
    assert "  step 2.analysis (analysis): 150 tokens\n" in text
    assert "  note: budget stop: max_tokens" in text
    assert "  verdict: none (the run stopped before the judge)" in text
    assert "    feedback to the planner: Cite the notes." in text
    assert text.splitlines()[-1].startswith("failed (budget exhausted: max_tokens) · 2 iterations")


def test_spans_with_no_iteration_are_placed_by_time() -> None:
    spans = [
        _span("root", None, "atlas.task", "AGENT"),
        _span("p1", "root", "plan", "AGENT", outputs=_plan(1, ["research"])),
        _span("t1", "root", "team.research", "CHAIN"),
        _span("w1", "t1", "worker:reader", "AGENT", {"atlas.step": "1.research"}),
        _model("m1", "w1", 10, 5),
        _span("j1", "root", "judge", "EVALUATOR", outputs={"passed": False, "feedback": "more"}),
        _span("p2", "root", "plan", "AGENT", outputs="[list with 9 entries, cut: ...]"),
        _span("g", "root", "loop_guard", "CHAIN", {"atlas.reason": "ping-pong stopped"}),
        _span("j2", "root", "judge", "EVALUATOR", outputs={"passed": True, "score": 1}),
        _model("stray", "root", 7, 0),
    ]
    story = build_story(spans)
    first, second = story["iterations"]
    assert [s["id"] for s in first["steps"]] == ["1.research"]
    assert first["steps"][0]["tokens"] == 15
    assert first["verdict"]["feedback"] == "more"
    assert second["verdict"]["passed"] is True and second["verdict"]["score"] == 1.0
    assert second["notes"] == [
        "the plan's steps are not in the trace (cut for size)",
        "loop guard: ping-pong stopped",
    ]
    totals = story["totals"]  # no atlas.usage.* on the root: the model spans' sums
    assert (totals["tokens"], totals["unattributed_tokens"], totals["iterations"]) == (22, 7, 2)
    assert "feedback to the planner: more" in render(story)
