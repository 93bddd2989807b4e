"""`atlas eval`: a suite's cases run for each variant, evaluated with `mlflow.genai.evaluate`
over the traces (one evaluation run per variant, linked to its LoggedModel), compared, and
gated: equal variants exit 0, one whose judge fails exits 1; a user's scorer by import string;
an earlier eval as the baseline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLES, ROOT, atlas_cli

pytestmark = pytest.mark.e2e


def _suite(tmp_path: Path, variants: dict[str, Any] | None = None) -> Path:
    for n in (1, 2):
        folder = tmp_path / f"case{n}"
        shutil.copytree(EXAMPLES / "quickstart", folder)
        task = folder / "task.yaml"
        data = yaml.safe_load(task.read_text())
        data["models"] = {"default": {"model": "scripted"}}
        data["budget"] = {**data.get("budget", {}), "max_iterations": 1}
        data["memory"] = {"enabled": False}
        task.write_text(yaml.safe_dump(data))
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "name": "briefs",
                "cases": [
                    {"task": "case1/task.yaml", "expect": {"passed": True}},
                    {"task": "case2/task.yaml", "expect": {"min_score": 0.5}},
                ],
                "variants": variants or {"a": {}, "b": {}},
                "scorers": ["eval_scorers:mentions_trips"],
            }
        )
    )
    return suite


def _eval(suite: Path, state: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    env = {"PYTHONPATH": str(ROOT / "tests" / "fixtures")}
    out = atlas_cli("eval", str(suite), "--json", "--state-dir", str(state), *extra, env=env)
    report = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}
    return out.returncode, report, out.stderr


def test_equal_variants_pass_the_gate_and_each_is_an_evaluation_run(tmp_path: Path) -> None:
    import mlflow

    state = tmp_path / "state"
    code, report, err = _eval(_suite(tmp_path), state)
    assert code == 0, err[-3000:]
    assert list(report["variants"]) == ["a", "b"]
    (comparison,) = report["comparisons"]
    assert comparison["variant"] == "b" and not comparison["regressed"]
    assert comparison["paired"]["pairs"] == 2 and comparison["paired"]["mean_diff"] == 0
    uri = f"sqlite:///{state / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    for name, variant in report["variants"].items():
        assert variant["overall"]["pass_rate"] == 1.0 and variant["overall"]["mean_score"] == 0.9
        # ATLAS's judge, read from the original traces, and the user's own scorer.
        assert variant["metrics"]["judge_score/mean"] == pytest.approx(0.9)
        assert variant["metrics"]["judge/mean"] == 1.0
        assert variant["metrics"]["expectation/mean"] == 1.0
        assert variant["metrics"]["mentions_trips/mean"] == 1.0
        run = client.get_run(variant["evaluation_run_id"])
        assert run.data.tags["atlas.variant"] == name
        assert run.data.tags["atlas.eval_id"] == report["eval_id"]
        # Linked to the agent version's LoggedModel, which holds the evaluation's metrics.
        model = client.get_logged_model(variant["model_id"])
        assert any(m.run_id == run.info.run_id for m in model.metrics or [])
    assert (state / "evals" / f"{report['eval_id']}.json").is_file()

    # The same suite against that eval as its baseline: nothing regressed.
    code, again, err = _eval(_suite(tmp_path / "second"), state, "--baseline", report["eval_id"])
    assert code == 0, err[-3000:]
    assert again["baseline"] == report["eval_id"]


def test_a_variant_whose_judge_fails_exits_non_zero(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code, report, err = _eval(
        _suite(tmp_path, {"base": {}}),
        state,
        "--variant",
        "harsh=models.judge.model=scripted?behaviour=always_fail",
    )
    assert code == 1, err[-3000:]
    (comparison,) = report["comparisons"]
    assert comparison["variant"] == "harsh" and comparison["regressed"]
    assert report["variants"]["harsh"]["overall"]["pass_rate"] == 0.0
    assert report["variants"]["harsh"]["metrics"]["expectation/mean"] == 0.0
    assert comparison["paired"]["mean_diff"] == pytest.approx(-0.5)


def test_bad_suites_are_one_line_before_any_run(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cases: []\n")
    out = atlas_cli("eval", str(bad), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    missing = tmp_path / "missing.yaml"
    missing.write_text("cases: [{task: nope.yaml}]\n")
    out = atlas_cli("eval", str(missing), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "nope.yaml" in out.stderr
    out = atlas_cli(
        "eval", str(_suite(tmp_path)), "--variant", "x", "--state-dir", str(tmp_path / "s")
    )
    assert out.returncode == 2 and "--variant" in out.stderr
    assert not (tmp_path / "s" / "batches").exists()
