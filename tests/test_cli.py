"""The command line as a user meets it: dry runs of every example, the JSON summary, run listing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, ROOT, atlas_cli

SUMMARY_FIELDS = {
    "run_id",
    "status",
    "output",
    "iterations",
    "tokens",
    "cost_usd",
    "wall_s",
    "trace_id",
    "tracking_uri",
}


@pytest.fixture
def examples_copy(tmp_path: Path) -> Path:
    """A private copy of examples/, so outputs never land in the repository."""
    target = tmp_path / "examples"
    shutil.copytree(EXAMPLES, target, ignore=shutil.ignore_patterns("output", ".atlas"))
    return target


@pytest.mark.e2e
@pytest.mark.parametrize(
    "task", sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.glob("*/task.yaml"))
)
def test_every_example_runs_in_dry_run_mode(task: str, examples_copy: Path, tmp_path: Path) -> None:
    """As CI runs them: `--approve-all` lets the approvals example through (without it, and
    without a terminal, it exits 4, paused: tests/test_approval.py)."""
    proc = atlas_cli(
        "run",
        str(examples_copy / task),
        "--model",
        "scripted",
        "--json",
        "--approve-all",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["status"] == "passed"
    output = Path(summary["output"])
    assert output.is_file() and output.is_relative_to(examples_copy)
    assert summary["tokens"] > 0 and summary["iterations"] == 1
    assert summary["trace_id"] and summary["tracking_uri"].startswith("sqlite:///")
    assert (tmp_path / ".atlas" / "mlflow.db").exists()
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_embed_example_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    shutil.copytree(
        EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("output", ".atlas")
    )
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "examples" / "embed_app.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "arun: passed" in proc.stdout
    assert "subgraph: ATLAS finished with passed" in proc.stdout


@pytest.mark.e2e
def test_runs_lists_runs_with_status(examples_copy: Path, tmp_path: Path) -> None:
    task = examples_copy / "quickstart" / "task.yaml"
    atlas_cli("run", str(task), "--model", "scripted?fail_iterations=9", "--json", cwd=tmp_path)
    atlas_cli("run", str(task), "--model", "scripted", "--json", cwd=tmp_path)
    proc = atlas_cli("runs", "--json", cwd=tmp_path)
    newest, oldest = json.loads(proc.stdout)
    assert (oldest["status"], newest["status"]) == ("failed", "passed")
    assert oldest["name"] == "Bike-share pilot brief"
    assert oldest["iterations"] == 1 and newest["score"] == 0.9
    assert newest["trace_id"].startswith("tr-")
    table = atlas_cli("runs", cwd=tmp_path).stdout
    assert newest["run_id"][:9] in table and "failed" in table


def test_not_passing_exits_1_and_keeps_the_output(examples_copy: Path, tmp_path: Path) -> None:
    task = examples_copy / "quickstart" / "task.yaml"
    proc = atlas_cli(
        "run", str(task), "--model", "scripted?behaviour=always_fail", "--json", cwd=tmp_path
    )
    assert proc.returncode == 1
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "failed"
    assert Path(summary["output"]).is_file()


def test_no_model_configured_says_what_is_missing(examples_copy: Path, tmp_path: Path) -> None:
    proc = atlas_cli(
        "run",
        str(examples_copy / "quickstart" / "task.yaml"),
        "--model",
        "openai:gpt-4o-mini",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "OPENAI_API_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_of_unknown_run_is_bad_input(tmp_path: Path) -> None:
    proc = atlas_cli("resume", "nope", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no run 'nope'" in proc.stderr


def test_bad_model_flag_is_bad_input(tmp_path: Path) -> None:
    proc = atlas_cli(
        "run", str(ROOT / "examples" / "quickstart" / "task.yaml"), "--model", "gpt 4", cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "malformed model spec" in proc.stderr
