"""Alerts: a run that breaches the task's `alerts:` thresholds warns, and its trace says so (a tag
to search by and a failed assessment), while its status stays what the judge decided."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import atlas
from atlas.alerts import check_alerts
from atlas.session import RunResult
from atlas.spec import Alerts
from tests.conftest import EXAMPLES, atlas_cli


def _result(**fields: Any) -> RunResult:
    base: dict[str, Any] = {
        "run_id": "r",
        "status": "passed",
        "output": None,
        "iterations": 1,
        "tokens": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "model_calls": 0,
        "cost_usd": None,
        "wall_s": 1.0,
        "trace_id": None,
        "tracking_uri": None,
    }
    return RunResult(**{**base, **fields})


def test_each_threshold_breaches_only_past_its_limit() -> None:
    alerts = Alerts(max_wall_s=10, max_cost_usd=0.5, min_score=0.8, max_tool_error_rate=0.25)
    quiet = _result(wall_s=10, cost_usd=0.5, score=0.8, tool_calls=4, tool_errors=1)
    assert check_alerts(alerts, quiet) == []
    loud = _result(wall_s=12.5, cost_usd=0.75, score=0.6, tool_calls=4, tool_errors=2)
    found = check_alerts(alerts, loud)
    assert [a.name for a in found] == [
        "max_wall_s",
        "max_cost_usd",
        "min_score",
        "max_tool_error_rate",
    ]
    assert found[0].message == "wall time 12.5 s is over 10 s"
    assert found[3].message == "2 of 4 tool calls failed (50%, over 25%)"


def test_a_measure_the_run_lacks_breaches_nothing() -> None:
    """An unpriced model has no cost, a run stopped before judging has no score, a run with no
    tool calls has no error rate: none of them is an alert."""
    alerts = Alerts(max_cost_usd=0.0, min_score=1.0, max_tool_error_rate=0.0)
    assert check_alerts(alerts, _result(cost_usd=None, score=None, tool_calls=0)) == []


def test_a_breach_is_a_tag_and_an_assessment_and_the_status_stands(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    spec = make_spec(
        tracing={"enabled": True, "experiment": "atlas-alerts"},
        alerts={"min_score": 0.95, "max_wall_s": 3600},
    )
    result = atlas.run(spec, model="scripted", state_dir_path=state_dir)
    assert result.status == "passed"
    assert [a["name"] for a in result.alerts] == ["min_score"]
    import mlflow

    client = mlflow.MlflowClient(result.tracking_uri)
    trace = client.get_trace(result.trace_id)
    assert trace.info.tags["atlas.alert.min_score"] == "judge score 0.90 is under 0.95"
    assert "atlas.alert.max_wall_s" not in trace.info.tags
    feedback = [a for a in trace.info.assessments if a.name == "alert.min_score"]
    assert len(feedback) == 1 and feedback[0].feedback.value is False
    assert feedback[0].source.source_id == "atlas.alerts"
    # The README's search for runs that alerted.
    where = [str(client.get_experiment_by_name("atlas-alerts").experiment_id)]
    found = client.search_traces(
        locations=where, filter_string="tag.`atlas.alert.min_score` LIKE '%'"
    )
    assert [t.info.trace_id for t in found] == [result.trace_id]


def _task(where: Path, **extra: Any) -> Path:
    src = EXAMPLES / "quickstart"
    data = yaml.safe_load((src / "task.yaml").read_text())
    data["inputs"] = {
        "documents": [str(src / "docs" / "*.md")],
        "data": [str(src / "data" / "*.csv")],
    }
    data.update(extra)
    task = where / "task.yaml"
    task.write_text(yaml.safe_dump(data))
    return task


@pytest.mark.e2e
def test_the_cli_prints_one_warning_line_per_alert(tmp_path: Path) -> None:
    task = _task(tmp_path, alerts={"min_score": 0.95})
    proc = atlas_cli("run", str(task), "--model", "scripted", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]  # passed: an alert is not a failure
    lines = [line for line in proc.stderr.splitlines() if "alert" in line]
    assert lines == ["warning: alert min_score: judge score 0.90 is under 0.95"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"alerts": {"min_score": 2}}, "alerts.min_score"),
        ({"alerts": {"max_wal_s": 10}}, "alerts.max_wal_s"),
        ({"version": "has space"}, "version"),
    ],
)
def test_a_bad_alerts_block_or_version_is_one_line(
    tmp_path: Path, extra: dict[str, Any], expected: str
) -> None:
    proc = atlas_cli("validate", str(_task(tmp_path, **extra)), cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and expected in proc.stderr


def test_a_bad_atlas_version_fails_before_any_model_call(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    proc = atlas_cli(
        "run",
        str(_task(tmp_path)),
        "--model",
        f"scripted?call_log={log}",
        "--quiet",
        cwd=tmp_path,
        env={"ATLAS_VERSION": "no/slashes"},
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "ATLAS_VERSION" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not log.exists()
