"""`atlas eval SUITE.yaml`: run a suite's cases for each variant through `atlas batch`, then
`mlflow.genai.evaluate` over the runs' traces, one evaluation run per variant linked to its
agent version's LoggedModel; compare the variants case by case and overall, and gate.

The report is kept in the state directory (`evals/<eval id>.json`), so a later eval can name it
as its baseline (`--baseline EVAL_ID`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas.errors import AtlasError, SpecError
from atlas.eval.suite import Suite, expand_cases, variant_fields

MIN_PAIRS = 6
"""Paired cases needed before a p-value is given."""


class EvalNotFound(AtlasError):
    exit_code = 2


@dataclass
class VariantResult:
    name: str
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Case name -> run_id, trace_id, status, passed, score, cost_usd, tokens, wall_s."""
    evaluation_run_id: str | None = None
    model_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """What `mlflow.genai.evaluate` logged (`judge_score/mean`, ...)."""

    def overall(self) -> dict[str, Any]:
        scores = [c["score"] for c in self.cases.values() if c.get("score") is not None]
        passed = [bool(c.get("passed")) for c in self.cases.values()]
        costs = [c["cost_usd"] for c in self.cases.values() if c.get("cost_usd") is not None]
        return {
            "cases": len(self.cases),
            "pass_rate": round(sum(passed) / len(passed), 4) if passed else None,
            "mean_score": round(statistics.fmean(scores), 4) if scores else None,
            "cost_usd": round(sum(costs), 6) if costs else None,
            "tokens": sum(int(c.get("tokens") or 0) for c in self.cases.values()),
            "wall_s": round(sum(float(c.get("wall_s") or 0) for c in self.cases.values()), 2),
        }


def paired(baseline: list[float], other: list[float], rounds: int = 10_000) -> dict[str, Any]:
    """Mean paired difference and a two-sided sign-flip permutation p-value (exact up to 16
    pairs); no p-value under MIN_PAIRS pairs."""
    diffs = [b - a for a, b in zip(baseline, other, strict=True)]
    n = len(diffs)
    out: dict[str, Any] = {
        "pairs": n,
        "mean_diff": round(statistics.fmean(diffs), 4) if n else None,
    }
    if n < MIN_PAIRS:
        out["p_value"] = None
        out["note"] = f"fewer than {MIN_PAIRS} paired cases: no significance"
        return out
    observed = abs(sum(diffs))
    if n <= 16:
        hits = total = 0
        for mask in range(1 << n):
            flipped = sum(-d if mask >> i & 1 else d for i, d in enumerate(diffs))
            hits += abs(flipped) >= observed - 1e-12
            total += 1
    else:
        rng = random.Random(0)
        hits, total = 0, rounds
        for _ in range(rounds):
            flipped = sum(d if rng.random() < 0.5 else -d for d in diffs)
            hits += abs(flipped) >= observed - 1e-12
    out["p_value"] = round(hits / total, 4)
    return out


def _case_values(trace: Any, result: dict[str, Any]) -> dict[str, Any]:
    from atlas.eval.scorers import _final

    passed = _final(trace, "judge") if trace is not None else None
    score = _final(trace, "judge_score") if trace is not None else None
    return {
        "run_id": result.get("run_id"),
        "trace_id": result.get("trace_id"),
        "status": result.get("status"),
        "passed": bool(passed) if passed is not None else result.get("status") == "passed",
        "score": float(score) if score is not None else result.get("score"),
        "cost_usd": result.get("cost_usd"),
        "tokens": result.get("tokens"),
        "wall_s": result.get("wall_s"),
    }


@contextlib.contextmanager
def _experiment(experiment_id: str) -> Any:
    """`mlflow.genai.evaluate` runs in the active experiment: the traces' own, for the call
    only (the caller's active experiment is put back)."""
    import mlflow
    from mlflow.tracking import fluent

    before = getattr(fluent, "_active_experiment_id", None)
    env_before = os.environ.get("MLFLOW_EXPERIMENT_ID")
    mlflow.set_experiment(experiment_id=experiment_id)
    try:
        yield
    finally:
        fluent._active_experiment_id = before
        _put_env("MLFLOW_EXPERIMENT_ID", env_before)


def _put_env(name: str, value: str | None) -> None:
    """Put an environment variable back as it was (MLflow's setters export theirs, and worker
    processes started later would inherit them)."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def evaluate_variant(
    name: str,
    suite: Suite,
    results: list[tuple[str, dict[str, Any], Any]],
    *,
    eval_id: str,
    scorers: list[Any],
) -> VariantResult:
    """`mlflow.genai.evaluate` over one variant's traces: (case name, run summary, expect)."""
    import mlflow

    out = VariantResult(name)
    uri = next((r.get("tracking_uri") for _, r, _ in results if r.get("tracking_uri")), None)
    if uri is None:
        out.cases = {case: _case_values(None, result) for case, result, _ in results}
        return out
    # Expectations and the evaluation go through MLflow's process-wide URI: the traces'
    # store, for this call only.
    from mlflow.tracking import _tracking_service

    before = getattr(_tracking_service.utils, "_tracking_uri", None)
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        return _evaluate(out, suite, results, uri, eval_id=eval_id, scorers=scorers)
    finally:
        # Put back exactly what was there, the exported environment variable too: the next
        # variant's worker processes would inherit it.
        if before is None:
            _tracking_service.utils._tracking_uri = None
        else:
            mlflow.set_tracking_uri(before)
        _put_env("MLFLOW_TRACKING_URI", env_before)


def _evaluate(
    out: VariantResult,
    suite: Suite,
    results: list[tuple[str, dict[str, Any], Any]],
    uri: str,
    *,
    eval_id: str,
    scorers: list[Any],
) -> VariantResult:
    import mlflow
    from mlflow.tracing.constant import TraceMetadataKey

    name = out.name
    traces: list[Any] = []
    client: Any = mlflow.MlflowClient(uri)
    for case, result, expect in results:
        trace = None
        if result.get("trace_id"):
            with contextlib.suppress(Exception):
                trace = client.get_trace(result["trace_id"])
        out.cases[case] = _case_values(trace, result)
        if trace is None:
            continue
        expected = expect.model_dump()
        if any(v is not None for v in expected.values()):
            mlflow.log_expectation(
                trace_id=trace.info.trace_id, name="atlas_expect", value=json.dumps(expected)
            )
            trace = client.get_trace(trace.info.trace_id)
        traces.append(trace)
        out.model_id = out.model_id or (trace.info.trace_metadata or {}).get(
            TraceMetadataKey.MODEL_ID
        )
    if not traces:
        return out
    os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_WORKERS", "2")
    with _experiment(traces[0].info.experiment_id):
        evaluation = mlflow.genai.evaluate(data=traces, scorers=scorers, model_id=out.model_id)
    out.evaluation_run_id = evaluation.run_id
    out.metrics = {k: float(v) for k, v in (evaluation.metrics or {}).items()}
    with contextlib.suppress(Exception):
        client.set_tag(evaluation.run_id, "atlas.eval_id", eval_id)
        client.set_tag(evaluation.run_id, "atlas.variant", name)
        client.set_tag(evaluation.run_id, "atlas.suite", suite.name)
        client.set_tag(evaluation.run_id, "mlflow.runName", f"{eval_id}/{name}")
    return out


def compare(
    baseline: VariantResult | dict[str, Any], other: VariantResult, suite: Suite
) -> dict[str, Any]:
    """The other variant against the baseline: per case, overall, paired test, the gate."""
    base_cases = baseline.cases if isinstance(baseline, VariantResult) else baseline["cases"]
    base_overall = (
        baseline.overall() if isinstance(baseline, VariantResult) else baseline["overall"]
    )
    mine = other.overall()
    shared = [c for c in other.cases if c in base_cases]
    pairs = [
        (float(base_cases[c]["score"]), float(other.cases[c]["score"]))
        for c in shared
        if base_cases[c].get("score") is not None and other.cases[c].get("score") is not None
    ]
    test = paired([a for a, _ in pairs], [b for _, b in pairs])
    reasons = []
    if base_overall.get("mean_score") is not None and mine.get("mean_score") is not None:
        drop = base_overall["mean_score"] - mine["mean_score"]
        if drop > suite.gate.max_score_drop + 1e-9:
            reasons.append(
                f"mean judge score {mine['mean_score']:.3f} vs {base_overall['mean_score']:.3f} "
                f"(drop {drop:.3f} > {suite.gate.max_score_drop})"
            )
    if base_overall.get("pass_rate") is not None and mine.get("pass_rate") is not None:
        drop = base_overall["pass_rate"] - mine["pass_rate"]
        if drop > suite.gate.max_pass_rate_drop + 1e-9:
            reasons.append(
                f"pass rate {mine['pass_rate']:.2f} vs {base_overall['pass_rate']:.2f} "
                f"(drop {drop:.2f} > {suite.gate.max_pass_rate_drop})"
            )
    return {"variant": other.name, "paired": test, "regressed": bool(reasons), "why": reasons}


Listener = Callable[[str], None]


def run_eval(
    suite: Suite,
    variants: dict[str, dict[str, Any]],
    *,
    directory: Path,
    executor: str = "local",
    max_concurrency: int | None = None,
    address: str | None = None,
    model: str | None = None,
    tracking_uri: str | None = None,
    baseline: str | None = None,
    say: Listener | None = None,
) -> dict[str, Any]:
    """Run every case for every variant and evaluate them; returns the report."""
    from atlas.batch import Options, make_batch
    from atlas.batch.driver import drive
    from atlas.context import new_run_id
    from atlas.eval.scorers import builtin_scorers, user_scorer
    from atlas.runs_postgres import state_url
    from atlas.spec import merge_fields

    tell = say or (lambda text: None)
    scorers = [*builtin_scorers(), *(user_scorer(ref) for ref in suite.scorers)]
    earlier = load_report(directory, baseline) if baseline else None
    cases = expand_cases(suite)
    eval_id = f"eval-{new_run_id()}"
    batches = []
    for name, fields in variants.items():
        overrides, variant_model = variant_fields(suite, fields)
        entries = [
            (file, merge_fields(case_fields, overrides), f"{name}/{case}")
            for case, file, case_fields, _ in cases
        ]
        options = Options(
            model=variant_model or model,
            tracking_uri=tracking_uri,
            state_dir=str(directory),
            state_url=state_url(),
        )
        # Every case of every variant checked before anything runs.
        batches.append(
            (name, make_batch(entries, options, executor=executor, batch_id=f"{eval_id}-{name}"))
        )
    report: dict[str, Any] = {
        "eval_id": eval_id,
        "suite": suite.name,
        "started_at": time.time(),
        "variants": {},
        "comparisons": [],
    }
    finished: list[VariantResult] = []
    for name, batch in batches:
        tell(f"variant {name}: {len(batch.items)} cases")
        runner = _executor(batch, executor, max_concurrency, address)
        drive(batch, runner, directory, max_concurrency=max_concurrency)
        results = [
            (case, item.result or {"run_id": item.run_id, "status": item.status}, expect)
            for (case, _, _, expect), item in zip(cases, batch.items, strict=True)
        ]
        variant = evaluate_variant(name, suite, results, eval_id=eval_id, scorers=scorers)
        finished.append(variant)
        report["variants"][name] = {
            "cases": variant.cases,
            "overall": variant.overall(),
            "evaluation_run_id": variant.evaluation_run_id,
            "model_id": variant.model_id,
            "metrics": variant.metrics,
        }
    base: VariantResult | dict[str, Any] = finished[0]
    others = finished[1:]
    if earlier is not None:
        first = next(iter(earlier["variants"].values()))
        base = earlier["variants"].get(finished[0].name, first)
        report["baseline"] = earlier["eval_id"]
        others = finished
    else:
        report["baseline"] = f"{eval_id}/{finished[0].name}"
    report["comparisons"] = [compare(base, other, suite) for other in others]
    report["regressed"] = any(c["regressed"] for c in report["comparisons"])
    save_report(directory, report)
    return report


def _executor(batch: Any, executor: str, workers: int | None, address: str | None) -> Any:
    if executor == "ray":
        from atlas.batch.ray import RayExecutor

        return RayExecutor(batch, address=address, workers=workers)
    from atlas.batch.local import LocalExecutor

    return LocalExecutor(batch, workers=workers)


def save_report(directory: Path, report: dict[str, Any]) -> Path:
    path = directory / "evals" / f"{report['eval_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(report, indent=2, default=str))
    os.replace(temporary, path)
    return path


def load_report(directory: Path, eval_id: str) -> dict[str, Any]:
    path = directory / "evals" / f"{eval_id}.json"
    if not path.is_file():
        raise EvalNotFound(f"no eval {eval_id!r} in {directory / 'evals'} (--baseline)")
    try:
        return dict(json.loads(path.read_text()))
    except ValueError:
        raise SpecError(f"eval report {path} is unreadable", field="--baseline") from None
