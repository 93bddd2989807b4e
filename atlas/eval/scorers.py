"""The scorers `atlas eval` hands to `mlflow.genai.evaluate`, each reading ATLAS's trace:

- `judge` (passed, 0/1) and `judge_score`, and `criteria_passed` (the share of acceptance
  criteria the final verdict passed): from the judge's feedback on the trace, the final
  verdict's (ATLAS logs every iteration's; `metadata.final == "True"` marks the last);
- `cost_usd`, `tokens`, `wall_s`, `tool_errors`, `budget_stop`: from the root span;
- `expectation`: whether the case's `expect:` (passed, min_score) held;
- the user's own, by import string (`package.module:function`), decorated with MLflow's
  `@scorer` or plain functions of (inputs, outputs, expectations, trace).

The traces are read where ATLAS wrote them (the evaluation runs in the traces' experiment), so
the scorers see the original traces with their feedback, not copies without it.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from atlas.errors import SpecError


def _final(trace: Any, name: str) -> Any:
    found = [
        a
        for a in getattr(trace.info, "assessments", None) or []
        if getattr(a, "name", None) == name and getattr(a, "feedback", None) is not None
    ]
    if not found:
        return None
    finals = [a for a in found if (a.metadata or {}).get("final") == "True"]
    return (finals or found)[-1].feedback.value


def _root(trace: Any) -> Any:
    spans = list(getattr(trace.data, "spans", None) or [])
    return next((s for s in spans if s.parent_id is None), spans[0] if spans else None)


def _attr(trace: Any, key: str) -> Any:
    root = _root(trace)
    return None if root is None else (root.attributes or {}).get(key)


def builtin_scorers() -> list[Any]:
    from mlflow.genai.scorers import scorer

    @scorer(name="judge", aggregations=["mean"])
    def judge(trace: Any) -> float | None:
        value = _final(trace, "judge")
        return None if value is None else float(bool(value))

    @scorer(name="judge_score", aggregations=["mean", "min"])
    def judge_score(trace: Any) -> float | None:
        value = _final(trace, "judge_score")
        return None if value is None else float(value)

    @scorer(name="criteria_passed", aggregations=["mean"])
    def criteria_passed(trace: Any) -> float | None:
        names = {
            a.name
            for a in getattr(trace.info, "assessments", None) or []
            if str(getattr(a, "name", "")).startswith("criterion.")
        }
        if not names:
            return None
        values = [_final(trace, n) for n in sorted(names)]
        return sum(1.0 for v in values if v) / len(values)

    @scorer(name="cost_usd", aggregations=["mean", "max"])
    def cost_usd(trace: Any) -> float | None:
        value = _attr(trace, "atlas.usage.cost_usd")
        return None if value is None else float(value)

    @scorer(name="tokens", aggregations=["mean", "max"])
    def tokens(trace: Any) -> float | None:
        value = _attr(trace, "atlas.usage.tokens")
        return None if value is None else float(value)

    @scorer(name="wall_s", aggregations=["mean", "p90"])
    def wall_s(trace: Any) -> float | None:
        duration = getattr(trace.info, "execution_duration", None)
        return None if duration is None else duration / 1000.0

    @scorer(name="tool_errors", aggregations=["mean", "max"])
    def tool_errors(trace: Any) -> float:
        spans = list(getattr(trace.data, "spans", None) or [])
        return float(
            sum(
                1
                for s in spans
                if str(getattr(s, "span_type", "")) == "TOOL"
                and str(getattr(getattr(s, "status", None), "status_code", "")).endswith("ERROR")
            )
        )

    @scorer(name="budget_stop", aggregations=["mean"])
    def budget_stop(trace: Any) -> float:
        return float(_attr(trace, "atlas.status") == "budget_exhausted")

    @scorer(name="expectation", aggregations=["mean"])
    def expectation(trace: Any, expectations: dict[str, Any] | None) -> float | None:
        expect = (expectations or {}).get("atlas_expect")
        if isinstance(expect, str):
            expect = json.loads(expect)
        if not isinstance(expect, dict) or not any(v is not None for v in expect.values()):
            return None
        passed = _final(trace, "judge")
        score = _final(trace, "judge_score")
        ok = True
        if expect.get("passed") is not None:
            ok = ok and bool(passed) == bool(expect["passed"])
        if expect.get("min_score") is not None:
            ok = ok and score is not None and float(score) >= float(expect["min_score"])
        return float(ok)

    return [
        judge,
        judge_score,
        criteria_passed,
        cost_usd,
        tokens,
        wall_s,
        tool_errors,
        budget_stop,
        expectation,
    ]


def user_scorer(reference: str) -> Any:
    """`package.module:function` (or `package.module.function`): an MLflow scorer, or a plain
    function wrapped as one under its own name."""
    module_name, sep, attribute = reference.partition(":")
    if not sep:
        module_name, _, attribute = reference.rpartition(".")
    if not module_name or not attribute:
        raise SpecError(f"{reference!r}: write package.module:function", field="scorers")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"{reference!r}: {exc}", field="scorers") from None
    from mlflow.genai.scorers import Scorer, scorer

    if isinstance(found, Scorer):
        return found
    if not callable(found):
        raise SpecError(f"{reference!r} is not a function", field="scorers")
    return scorer(found, name=attribute)
