"""Task files: validation, one-line errors, the JSON Schema, the CLI's bad-input contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atlas.errors import SpecError
from atlas.spec import TaskSpec, load_task, parse_model_string
from tests.conftest import QUICKSTART, atlas_cli

BAD_FILES: dict[str, bytes] = {
    "empty": b"",
    "broken_yaml": b"task: [unclosed\nacceptance: {\n",
    "list_root": b"- task: one\n- task: two\n",
    "missing_task": b"acceptance: [be good]\n",
    "unknown_team": b"task: t\nteams: [research, marketing]\n",
    "negative_budget": b"task: t\nbudget:\n  max_tokens: -5\n",
    "mistyped_field": b"task: t\nacceptence: [typo]\n",
    "missing_documents": b"task: t\ninputs:\n  documents: [nowhere/*.md]\n",
    "malformed_model": b"task: t\nmodels:\n  default: 'gpt 4 please'\n",
    "wrong_types": b"task: t\nbudget:\n  max_iterations: lots\n",
    "binary_junk": bytes(range(256)) * 4,
}

EXPECTED_FIELD = {
    "missing_task": "task",
    "unknown_team": "teams[1]",
    "negative_budget": "budget.max_tokens",
    "mistyped_field": "acceptence",
    "missing_documents": "inputs.documents[0]",
    "malformed_model": "models.default",
    "wrong_types": "budget.max_iterations",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_task_file_gets_a_short_clear_error(case: str, tmp_path: Path) -> None:
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(BAD_FILES[case])
    proc = atlas_cli("run", str(path), "--model", "scripted", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    output = (proc.stdout + proc.stderr).strip()
    assert "Traceback" not in output
    assert 1 <= len(output.splitlines()) <= 6
    assert str(path) in output
    if case in EXPECTED_FIELD:
        assert EXPECTED_FIELD[case] in output


def test_unknown_field_suggests_the_right_name(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("task: t\nbudget:\n  max_token: 10\n")
    with pytest.raises(SpecError) as err:
        load_task(path)
    assert "budget.max_token" in str(err.value)
    assert "did you mean 'max_tokens'" in str(err.value)


def test_missing_file_is_bad_input(tmp_path: Path) -> None:
    proc = atlas_cli("validate", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_paths_resolve_relative_to_the_task_file(tmp_path: Path) -> None:
    (tmp_path / "sub" / "docs").mkdir(parents=True)
    (tmp_path / "sub" / "docs" / "a.md").write_text("hello")
    path = tmp_path / "sub" / "task.yaml"
    path.write_text("task: t\ninputs:\n  documents: [docs/*.md]\noutput: out/r.md\n")
    spec = load_task(path)
    assert spec.document_paths == [(tmp_path / "sub" / "docs" / "a.md").resolve()]
    assert spec.output_path == (tmp_path / "sub" / "out" / "r.md").resolve()


def test_validate_accepts_the_quickstart() -> None:
    proc = atlas_cli("validate", str(QUICKSTART))
    assert proc.returncode == 0, proc.stderr
    assert "ok (3 teams, 8 tools, 3 documents, 2 data files)" in proc.stdout


def test_schema_is_valid_json_schema_that_describes_the_fields() -> None:
    proc = atlas_cli("schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert schema["required"] == ["task"]
    for name in (
        "task",
        "acceptance",
        "teams",
        "inputs",
        "output",
        "budget",
        "models",
        "tracing",
        "memory",
    ):
        assert name in schema["properties"]
    assert "base_dir" not in schema["properties"]
    budget = schema["$defs"]["Budget"]["properties"]
    assert {"max_iterations", "max_steps", "max_tokens", "max_cost_usd", "timeout_s"} <= set(budget)


def test_model_strings() -> None:
    assert parse_model_string("openai:gpt-4o-mini") == ("openai", "gpt-4o-mini", {})
    assert parse_model_string("claude-sonnet-4-5")[0] == "anthropic"
    assert parse_model_string("scripted?latency_ms=100&behaviour=ping_pong") == (
        "scripted",
        "",
        {"latency_ms": 100, "behaviour": "ping_pong"},
    )
    for bad in ("gpt 4", "nosuch:model", "openai:", "scripted?oops"):
        with pytest.raises(ValueError):
            parse_model_string(bad)


def test_models_accept_strings_and_mappings(tmp_path: Path) -> None:
    spec = TaskSpec.from_dict(
        {
            "task": "t",
            "models": {
                "default": "scripted",
                "judge": {"model": "openai:gpt-4o", "base_url": "http://127.0.0.1:1/v1"},
                "teams": {"research": "anthropic:claude-haiku-4-5"},
            },
        },
        base_dir=tmp_path,
    )
    assert spec.models.default is not None and spec.models.default.model == "scripted"
    assert spec.models.judge is not None and spec.models.judge.base_url == "http://127.0.0.1:1/v1"
    assert spec.models.teams["research"].provider == "anthropic"
