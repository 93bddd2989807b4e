"""What MLflow's GenAI dashboard shows of a run: spans in the tracking store (span search, the
Overview's charts), every iteration's verdict, iterations and team totals in the tree, cost on
model spans, agent versions worth comparing, status at a glance."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import atlas
from tests.fake_providers import FakeProviders


def _replanning(make_spec: Callable[..., Any], **overrides: Any) -> Any:
    return make_spec(
        tracing={"enabled": True, "experiment": "atlas-dashboard"},
        budget={"max_iterations": 2},
        **overrides,
    )


@pytest.fixture(scope="module")
def replanned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """One replanning dry run (iteration 1 fails, 2 passes), shared by the checks below."""
    from tests.conftest import quickstart_spec

    tmp = tmp_path_factory.mktemp("replanned")
    spec = quickstart_spec(
        tmp,
        budget={"max_iterations": 2},
        tracing={"enabled": True, "experiment": "atlas-dashboard"},
    )
    result = atlas.run(spec, model="scripted?fail_iterations=1", state_dir_path=tmp / "state")
    assert result.status == "passed" and result.iterations == 2, result
    import mlflow

    client = mlflow.MlflowClient(result.tracking_uri)
    yield result, client


def _experiment(client: Any) -> str:
    return str(client.get_experiment_by_name("atlas-dashboard").experiment_id)


def test_span_search_finds_the_run_in_the_store(replanned: tuple[Any, Any]) -> None:
    result, client = replanned
    where = [_experiment(client)]
    for query in (
        "span.name = 'judge'",
        "span.type = 'TOOL'",
        "span.name = 'search_documents'",
        "trace.text LIKE '%Riverside%'",
    ):
        found = client.search_traces(locations=where, filter_string=query)
        assert [t.info.trace_id for t in found] == [result.trace_id], query
    info = client.get_trace(result.trace_id).info
    assert info.tags["mlflow.trace.spansLocation"] == "TRACKING_STORE"


def test_every_iteration_verdict_is_feedback_on_its_judge_span(
    replanned: tuple[Any, Any],
) -> None:
    result, client = replanned
    trace = client.get_trace(result.trace_id)
    judges = {
        s.attributes["atlas.iteration"]: s.span_id
        for s in trace.data.spans
        if s.name == "judge" and s.span_type == "EVALUATOR"
    }
    assert set(judges) == {1, 2}
    verdicts = [a for a in trace.info.assessments if a.name == "judge"]
    on_spans = {a.metadata["iteration"]: a for a in verdicts if a.span_id}
    assert on_spans["1"].feedback.value is False and on_spans["1"].span_id == judges[1]
    assert on_spans["2"].feedback.value is True and on_spans["2"].span_id == judges[2]
    assert on_spans["1"].rationale  # the feedback the planner got
    final = [a for a in verdicts if not a.span_id]
    assert len(final) == 1 and final[0].feedback.value is True
    assert final[0].source.source_type == "LLM_JUDGE"
    assert final[0].source.source_id == "scripted?fail_iterations=1"
    # Criteria: named by their text, in the task's order, the text itself present.
    names = [
        a.name
        for a in trace.info.assessments
        if a.name.startswith("criterion.") and a.metadata["iteration"] == "1" and a.span_id
    ]
    assert names == ["criterion.states_total_number_trips", "criterion.cites_notes"]
    first = next(a for a in trace.info.assessments if a.name == names[0])
    assert "States the total number of trips." in (first.rationale or "")
    expectation = next(a for a in trace.info.assessments if a.name == "acceptance_criteria")
    assert expectation.source.source_type == "HUMAN"
    # A run that failed any iteration is found by its judge feedback.
    failed_any = client.search_traces(
        locations=[_experiment(client)], filter_string="feedback.judge = 'false'"
    )
    assert result.trace_id in [t.info.trace_id for t in failed_any]


def test_rounds_sit_under_iteration_spans_with_team_totals(replanned: tuple[Any, Any]) -> None:
    result, client = replanned
    trace = client.get_trace(result.trace_id)
    by_id = {s.span_id: s for s in trace.data.spans}
    iterations = {s.name: s for s in trace.data.spans if s.name.startswith("iteration ")}
    assert set(iterations) == {"iteration 1", "iteration 2"}
    for span in trace.data.spans:
        if span.name in ("plan", "judge") and span.span_type in ("AGENT", "EVALUATOR"):
            parent = by_id[span.parent_id]
            assert parent.name == f"iteration {span.attributes['atlas.iteration']}"
    teams = [s for s in trace.data.spans if s.name.startswith("team.")]
    assert sorted(s.name for s in teams) == sorted(
        f"team.{t} · {i}.{t}" for t in ("research", "analysis", "writing") for i in (1, 2)
    )
    for team in teams:
        assert by_id[team.parent_id].name == f"iteration {team.attributes['atlas.iteration']}"
        assert team.attributes["atlas.step"] == team.name.split(" · ")[1]
        assert team.attributes["atlas.cost_usd"] == 0.0  # the scripted model is free
    per_team: dict[str, int] = {}
    for team in teams:
        name = team.attributes["atlas.team"]
        per_team[name] = per_team.get(name, 0) + team.attributes["atlas.tokens"]
    assert per_team == {name: usage["tokens"] for name, usage in result.by_team.items()}
    wrappers = [s.name for s in trace.data.spans if s.name in ("LangGraph", "RunnableCallable")]
    assert not wrappers
    nested_twice = [
        s.name
        for s in trace.data.spans
        if s.parent_id and by_id[s.parent_id].name == s.name and s.span_type != "CHAT_MODEL"
    ]
    assert not nested_twice, f"wrapper duplicates: {nested_twice}"


def test_model_spans_have_usage_and_the_agent_version_is_ready(
    replanned: tuple[Any, Any],
) -> None:
    result, client = replanned
    trace = client.get_trace(result.trace_id)
    models = [s for s in trace.data.spans if s.span_type == "CHAT_MODEL"]
    assert len(models) == result.model_calls
    assert all(s.attributes["mlflow.chat.tokenUsage"]["input_tokens"] > 0 for s in models)
    assert all(s.attributes["mlflow.llm.cost"]["total_cost"] == 0.0 for s in models)
    model = client.get_logged_model(trace.info.request_metadata["mlflow.modelId"])
    assert str(model.status) in ("READY", "LoggedModelStatus.READY")
    assert model.params["teams"] == "research,analysis,writing"
    assert model.params["model.judge"] == "scripted?fail_iterations=1"
    assert model.params["worker.research.searcher.tools"]
    assert len(model.params["persona.researcher"]) == 12  # a content hash
    run_id = trace.info.request_metadata["mlflow.sourceRun"]
    metrics = {m.key: m.value for m in model.metrics or [] if m.run_id == run_id}
    assert metrics["judge_score"] == pytest.approx(0.9) and metrics["passed"] == 1.0
    assert model.source_run_id


def test_a_version_label_names_the_agent_version(
    make_spec: Callable[..., Any], state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATLAS_VERSION", "brief-writer-v2")
    result = atlas.run(
        make_spec(tracing={"enabled": True}), model="scripted", state_dir_path=state_dir
    )
    import mlflow

    client = mlflow.MlflowClient(result.tracking_uri)
    trace = client.get_trace(result.trace_id)
    model = client.get_logged_model(trace.info.request_metadata["mlflow.modelId"])
    assert model.name == "brief-writer-v2"
    assert model.tags["atlas.config_hash"]


def test_a_failed_run_is_tagged_and_named_by_its_title(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    spec = make_spec(name="Pilot brief", tracing={"enabled": True, "experiment": "atlas-fail"})
    result = atlas.run(spec, model="scripted?behaviour=always_fail", state_dir_path=state_dir)
    assert result.status == "failed"
    import mlflow

    client = mlflow.MlflowClient(result.tracking_uri)
    info = client.get_trace(result.trace_id).info
    assert info.tags["mlflow.traceName"] == "Pilot brief"
    assert info.tags["atlas.outcome"] == "failed"
    run = client.get_run(info.request_metadata["mlflow.sourceRun"])
    assert run.data.tags["atlas.outcome"] == "failed"
    assert run.data.metrics["passed"] == 0.0
    where = [str(client.get_experiment_by_name("atlas-fail").experiment_id)]
    tagged = client.search_traces(locations=where, filter_string="tag.`atlas.outcome` = 'failed'")
    assert [t.info.trace_id for t in tagged] == [result.trace_id]


@pytest.fixture
def fake() -> Iterator[FakeProviders]:
    with FakeProviders() as server:
        yield server


def test_priced_model_spans_carry_cost_and_unpriced_leave_it_absent(
    fake: FakeProviders, make_spec: Callable[..., Any], state_dir: Path
) -> None:
    import mlflow

    fake.model = fake.model.model_copy(update={"prompt_tokens": 1000, "completion_tokens": 100})
    costs: dict[str, list[Any]] = {}
    for name in ("openai:gpt-4o-mini", "openai:my-finetune"):
        model = {"model": name, "base_url": f"{fake.url}/v1"}
        spec = make_spec(models={"default": model}, tracing={"enabled": True})
        result = atlas.run(spec, state_dir_path=state_dir)
        trace = mlflow.MlflowClient(result.tracking_uri).get_trace(result.trace_id)
        spans = [s for s in trace.data.spans if s.span_type == "CHAT_MODEL"]
        costs[name] = [s.attributes.get("mlflow.llm.cost") for s in spans]
        if name == "openai:gpt-4o-mini":
            total = sum(c["total_cost"] for c in costs[name])
            assert total == pytest.approx(result.cost_usd)
            assert costs[name][0]["input_cost"] == pytest.approx(1000 * 0.15 / 1_000_000)
    assert costs["openai:my-finetune"] and all(c is None for c in costs["openai:my-finetune"])


def test_async_runs_log_no_autolog_errors_and_no_anonymous_spans(
    make_spec: Callable[..., Any],
    state_dir: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    import mlflow

    spec = _replanning(make_spec)
    result = asyncio.run(
        atlas.arun(spec, model="scripted?fail_iterations=1", state_dir_path=state_dir)
    )
    assert result.status == "passed"
    errors = [r.getMessage() for r in caplog.records if "error during autolog" in r.getMessage()]
    assert not errors
    assert "error during autolog" not in capfd.readouterr().err
    trace = mlflow.MlflowClient(result.tracking_uri).get_trace(result.trace_id)
    assert not [s for s in trace.data.spans if s.name in (None, "", "None")]
    assert {s.name for s in trace.data.spans} >= {"iteration 1", "iteration 2"}


def test_personas_are_prompts_linked_to_the_trace_and_versioned_by_content(
    make_spec: Callable[..., Any], state_dir: Path, tmp_path: Path
) -> None:
    import json

    import mlflow

    from tests.conftest import ROOT

    def linked(result: Any) -> dict[str, str]:
        tags = mlflow.MlflowClient(result.tracking_uri).get_trace(result.trace_id).info.tags
        return {p["name"]: p["version"] for p in json.loads(tags["mlflow.linkedPrompts"])}

    traced = {"enabled": True, "experiment": "atlas-prompts"}
    first = atlas.run(make_spec(tracing=traced), model="scripted", state_dir_path=state_dir)
    again = atlas.run(make_spec(tracing=traced), model="scripted", state_dir_path=state_dir)
    assert linked(first)["atlas.persona.writer"] == "1"
    assert linked(again) == linked(first)  # unchanged personas: no new versions
    # An edited persona is a new version of its prompt; the others stay as they were.
    own = tmp_path / "my_personas"
    own.mkdir()
    text = (ROOT / "personas" / "writer.md").read_text() + "\nAlways end with a one-line summary.\n"
    (own / "writer.md").write_text(text)
    edited = atlas.run(
        make_spec(tracing=traced, personas_dir=str(own)), model="scripted", state_dir_path=state_dir
    )
    now = linked(edited)
    assert now["atlas.persona.writer"] == "2"
    assert {k: v for k, v in now.items() if k != "atlas.persona.writer"} == {
        k: v for k, v in linked(first).items() if k != "atlas.persona.writer"
    }
    client = mlflow.MlflowClient(edited.tracking_uri)
    version = client.get_prompt_version("atlas.persona.writer", 2)
    assert version.template.endswith("Always end with a one-line summary.")
