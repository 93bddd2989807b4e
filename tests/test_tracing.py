"""Tracing: one MLflow run and one trace per task, coordination spans nested under graph nodes
(sync and async), judge assessments, usage, safe fallback when the server is down, no secrets."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import atlas
from tests.conftest import check_snapshot, free_port

# LangGraph's edge writers show up as anonymous chain spans whose names differ between sync and
# async; ATLAS folds them away, so a tree that still has one fails.
_NOISE = {None, "None", "RunnableCallable", "RunnableSequence", "RunnableLambda", "LangGraph"}


def _traced(make_spec: Callable[..., Any], **overrides: Any) -> Any:
    return make_spec(tracing={"enabled": True, "experiment": "atlas-tests"}, **overrides)


def _trace(result: Any) -> Any:
    import mlflow

    return mlflow.MlflowClient(result.tracking_uri).get_trace(result.trace_id)


def span_tree(trace: Any) -> str:
    """Names and types, children sorted (parallel branches finish in any order); a wrapper span
    left in the trace fails."""
    spans = trace.data.spans
    kids: dict[str | None, list[Any]] = {}
    for span in spans:
        kids.setdefault(span.parent_id, []).append(span)

    noise = [s.name for s in spans if s.name in _NOISE]
    assert not noise, f"wrapper spans left in the trace: {noise}"

    def render(span: Any, depth: int) -> list[str]:
        below = [render(child, depth + 1) for child in kids.get(span.span_id, [])]
        lines = [f"{'  ' * depth}{span.name} [{span.span_type}]"]
        for block in sorted(below):
            lines += block
        return lines

    roots = kids.get(None, [])
    assert len(roots) == 1, f"expected one root span, got {[r.name for r in roots]}"
    return "\n".join(render(roots[0], 0)) + "\n"


def test_a_run_is_one_trace_with_the_whole_story(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    result = atlas.run(_traced(make_spec), model="scripted", state_dir_path=state_dir)
    assert result.trace_id and result.tracking_uri == f"sqlite:///{state_dir / 'mlflow.db'}"
    trace = _trace(result)
    names = [s.name for s in trace.data.spans]
    for name in (
        "atlas.task",
        "plan",
        "dispatch",
        "team.research · 1.research",
        "team.analysis · 1.analysis",
        "team.writing · 1.writing",
        "iteration 1",
        "judge",
        "worker:searcher",
        "handoff:research->searcher",
        "search_documents",
    ):
        assert name in names, name
    by_name = {s.name: s for s in trace.data.spans}
    plan_spans = [s for s in trace.data.spans if s.name == "plan" and s.span_type == "AGENT"]
    assert plan_spans[0].outputs["steps"][2]["depends_on"] == ["1.research", "1.analysis"]
    dispatch = [
        s for s in trace.data.spans if s.name == "dispatch" and s.attributes.get("atlas.wave")
    ]
    assert sorted(dispatch[0].attributes["atlas.wave"]) == ["1.analysis", "1.research"]
    handoff = by_name["handoff:research->searcher"]
    assert handoff.attributes["atlas.handoff.reason"]
    judge = next(s for s in trace.data.spans if s.name == "judge" and s.span_type == "EVALUATOR")
    assert judge.outputs["passed"] is True
    root = by_name["atlas.task"]
    assert root.attributes["atlas.usage.tokens"] == result.tokens
    assert root.attributes["atlas.team.research.tokens"] > 0
    usage = [
        s.attributes.get("mlflow.chat.tokenUsage")
        for s in trace.data.spans
        if s.span_type == "CHAT_MODEL"
    ]
    assert len(usage) == result.model_calls and all(u["input_tokens"] > 0 for u in usage)
    assert trace.info.request_metadata.get("mlflow.trace.session") == result.run_id


def test_judge_verdict_is_an_llm_judge_assessment(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    import mlflow

    result = atlas.run(
        _traced(make_spec), model="scripted?fail_iterations=1", state_dir_path=state_dir
    )
    mlflow.set_tracking_uri(result.tracking_uri)
    trace = mlflow.get_trace(result.trace_id)
    found = {a.name: a for a in trace.info.assessments}
    judge = found["judge"]
    assert judge.value is True
    assert judge.source.source_type == "LLM_JUDGE"
    assert judge.rationale == "Meets the criteria."
    assert found["judge_score"].value == pytest.approx(0.9)
    assert {"criterion.states_total_number_trips", "criterion.cites_notes"} <= set(found)
    assert found["acceptance_criteria"].value == [
        "States the total number of trips.",
        "Cites the notes.",
    ]


def test_run_metrics_artifacts_and_agent_version(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    import mlflow

    result = atlas.run(_traced(make_spec), model="scripted", state_dir_path=state_dir)
    client = mlflow.MlflowClient(result.tracking_uri)
    trace = client.get_trace(result.trace_id)
    run_id = trace.info.request_metadata["mlflow.sourceRun"]
    run = client.get_run(run_id)
    metrics = run.data.metrics
    assert metrics["tokens"] == result.tokens and metrics["iterations"] == 1
    assert metrics["judge_score"] == pytest.approx(0.9) and metrics["cost_usd"] == 0.0
    assert metrics["wall_s"] > 0
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"plan.json", "brief.md"} <= artifacts
    model_id = trace.info.request_metadata.get("mlflow.modelId")
    assert model_id and client.get_logged_model(model_id).name.startswith("atlas-")
    # one experiment, reused by the next run (get-or-create, never a duplicate)
    atlas.run(_traced(make_spec), model="scripted", state_dir_path=state_dir)
    names = [e.name for e in client.search_experiments()]
    assert names.count("atlas-tests") == 1


def test_sync_span_tree_snapshot(make_spec: Callable[..., Any], state_dir: Path) -> None:
    result = atlas.run(_traced(make_spec), model="scripted", state_dir_path=state_dir)
    check_snapshot("trace_tree.txt", span_tree(_trace(result)))


def test_async_span_tree_with_parallel_teams(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    """MLflow detaches custom spans in async nodes by default; ATLAS's must nest like in sync."""
    result = asyncio.run(
        atlas.arun(_traced(make_spec), model="scripted?latency_ms=30", state_dir_path=state_dir)
    )
    trace = _trace(result)
    tree = span_tree(trace)
    check_snapshot("trace_tree.txt", tree)  # the same tree as the sync run
    by_id = {s.span_id: s for s in trace.data.spans}
    for span in trace.data.spans:
        if (span.name or "").startswith("worker:") and span.span_type == "AGENT":
            parent = by_id[span.parent_id]
            assert parent.name == span.name.removeprefix("worker:"), (
                "worker span not under its node"
            )


@pytest.fixture
def hung_server() -> Iterator[str]:
    """Accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


@pytest.mark.parametrize("kind", ["refused", "hung"])
def test_unreachable_tracking_server_falls_back_with_one_warning(
    kind: str,
    hung_server: str,
    make_spec: Callable[..., Any],
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    uri = f"http://127.0.0.1:{free_port()}" if kind == "refused" else hung_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    events: list[dict[str, Any]] = []
    started = time.monotonic()
    result = atlas.run(
        _traced(make_spec), model="scripted", state_dir_path=state_dir, on_event=events.append
    )
    elapsed = time.monotonic() - started
    assert result.status == "passed"
    assert result.tracking_uri == f"sqlite:///{state_dir / 'mlflow.db'}"
    warnings = [e for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and uri in warnings[0]["message"]
    assert _trace(result) is not None
    assert elapsed < 60  # MLflow's own defaults block for minutes here


def test_tracing_failure_never_fails_a_run(
    make_spec: Callable[..., Any], state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("tracing backend exploded")

    monkeypatch.setattr(mlflow, "start_span_no_context", broken)
    monkeypatch.setattr(mlflow, "log_feedback", broken)
    result = atlas.run(_traced(make_spec), model="scripted", state_dir_path=state_dir)
    assert result.status == "passed"
    assert Path(result.output).exists()


def test_no_secret_reaches_traces_logs_checkpoints_or_outputs(
    make_spec: Callable[..., Any], state_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.fake_providers import FakeProviders

    secrets = ["sk-proj-ATLASTESTSECRET0123456789abcdef", "anthropic-ATLASTESTSECRET-987654321"]
    monkeypatch.setenv("OPENAI_API_KEY", secrets[0])
    monkeypatch.setenv("ANTHROPIC_API_KEY", secrets[1])
    monkeypatch.setenv("MY_GATEWAY_TOKEN", "gateway-ATLASTESTSECRET-5555")
    with FakeProviders() as fake:
        model = {
            "model": "openai:gpt-4o-mini",
            "base_url": f"{fake.url}/v1",
            # Secrets written into the task file itself, as provider options.
            "params": {"default_headers": {"X-Gateway-Token": "gw-ATLASTESTSECRET-7777"}},
        }
        spec = _traced(make_spec, models={"default": model})
        result = atlas.run(spec, state_dir_path=state_dir)
        # the key really was used on the wire, so there was something to leak
        assert result.status == "passed" and fake.requests
        assert any("ATLASTESTSECRET" in r.headers.get("x-gateway-token", "") for r in fake.requests)
    scanned: list[str] = []
    for path in [*state_dir.rglob("*"), *tmp_path.rglob("*.md")]:
        if path.is_file():
            data = path.read_bytes()
            scanned.append(path.relative_to(tmp_path).as_posix())
            assert b"ATLASTESTSECRET" not in data, f"secret found in {path}"
    # What was scanned: the trace store, the checkpoints, both memory stores, the output.
    joined = " ".join(scanned)
    for part in ("mlflow.db", "checkpoints", "memory/chroma", "memory/graph", ".md"):
        assert part in joined, (part, scanned)


def test_a_run_leaves_the_callers_active_experiment_and_run_alone(
    make_spec: Any, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app that uses MLflow itself and calls ATLAS keeps its experiment and its run."""
    import mlflow

    uri = f"sqlite:///{state_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("my-app")
    with mlflow.start_run() as mine:
        result = atlas.run(
            make_spec(tracing={"enabled": True}), model="scripted", state_dir_path=state_dir
        )
        assert mlflow.active_run().info.run_id == mine.info.run_id
        assert mlflow.get_experiment(mine.info.experiment_id).name == "my-app"
        mlflow.log_metric("app_metric", 1.0)
    from mlflow.tracking.fluent import _get_experiment_id

    assert mlflow.get_experiment(_get_experiment_id()).name == "my-app"
    client = mlflow.MlflowClient(uri)
    trace = client.get_trace(result.trace_id)
    assert client.get_experiment(trace.info.experiment_id).name == "atlas"
    # The trace's response is the work itself, not only where it was written.
    import json

    assert json.loads(trace.data.response)["text"] == Path(result.output).read_text()
    assert client.get_run(mine.info.run_id).data.metrics == {"app_metric": 1.0}
