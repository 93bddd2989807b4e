"""The `judge` node: scores the current output against the task's acceptance criteria.

The verdict is typed (`Verdict`). It is made consistent before use: one result per criterion, in
order; `passed` only when every criterion passed and the score reaches the pass threshold. An
unreadable answer counts as a failed verdict that says so (`fallback`), never as a crash.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import HumanMessage, SystemMessage

from atlas.context import RunContext
from atlas.errors import BudgetExhausted
from atlas.graph.effects import Body, CallResult, Io, ModelCall
from atlas.graph.events import emit
from atlas.graph.limits import clip, limits_for
from atlas.graph.state import Verdict
from atlas.models.resilience import ProviderError

JUDGE_PROMPT = """You are a strict, fair judge. Decide whether the output meets each acceptance
criterion of the task. For each criterion give passed true or false and one sentence of reason. Give
an overall score from 0 to 1. If anything fails, say in the feedback exactly what to change."""


def current_output(state: dict[str, Any], ctx: RunContext) -> str:
    """What the run would deliver now: the newest draft, else the latest iteration's results."""
    draft = ctx.workspace.drafts.latest()
    if draft:
        return draft
    results = state.get("results") or {}
    iteration = state.get("iteration", 1)
    latest = [r for r in results.values() if r.get("iteration") == iteration] or list(
        results.values()
    )
    return "\n\n".join(
        f"## {r.get('id')} ({r.get('team')})\n\n{r.get('output', '')}" for r in latest
    )


def normalize(verdict: dict[str, Any], criteria: list[str], threshold: float) -> dict[str, Any]:
    given = {str(c.get("criterion", "")).strip().lower(): c for c in verdict.get("criteria", [])}
    ordered = list(verdict.get("criteria", []))
    results = []
    for index, criterion in enumerate(criteria):
        found = given.get(criterion.strip().lower())
        if found is None and index < len(ordered):
            found = ordered[index]
        if found is None:
            found = {"passed": False, "reason": "the judge gave no finding for this criterion"}
        results.append(
            {
                "criterion": criterion,
                "passed": bool(found.get("passed")),
                "reason": str(found.get("reason", "")),
            }
        )
    score = min(1.0, max(0.0, float(verdict.get("score", 0.0))))
    passed = (
        bool(verdict.get("passed")) and all(r["passed"] for r in results) and score >= threshold
    )
    return {**verdict, "criteria": results, "score": round(score, 4), "passed": passed}


def judge_body(state: dict[str, Any], ctx: RunContext) -> Body:
    spec = ctx.spec
    iteration = int(state.get("iteration", 1))
    output = yield Io(current_output, (state, ctx))
    lines = [f"Task: {spec.task.strip()}", f"Iteration: {iteration}", "", "Acceptance criteria:"]
    lines += [f"{i}. {c}" for i, c in enumerate(spec.acceptance, 1)] or [
        "1. The output fully does the task."
    ]
    clipped = clip(output, limits_for(ctx, "judge").judged)
    lines += ["", "Output to judge:", clipped or "(empty)"]
    criteria = list(spec.acceptance) or ["The output fully does the task."]
    with ctx.tracer.span(
        "judge", span_type="EVALUATOR", attributes={"atlas.iteration": iteration}
    ) as span:
        try:
            result: CallResult = yield ModelCall(
                role="judge",
                messages=[SystemMessage(JUDGE_PROMPT), HumanMessage("\n".join(lines))],
                schema=Verdict,
                run_name="judge",
                max_tokens=80 * len(criteria) + 120,
            )
        except BudgetExhausted as exc:
            ctx.tracer.event("budget_stop", {"limit": exc.limit, "where": "judge"})
            return {"stop_reason": str(exc)}
        except ProviderError as exc:
            # No judge, no verdict: the run ends unpassed with its output, rather than failing
            # or replanning into an outage.
            reason = f"judge unavailable: {exc}"
            verdict = {
                "passed": False,
                "score": 0.0,
                "criteria": [{"criterion": c, "passed": False, "reason": reason} for c in criteria],
                "feedback": reason,
                "iteration": iteration,
                "fallback": True,
            }
            span.set_outputs(verdict)
            emit({"event": "verdict", **verdict})
            return {"verdict": verdict, "verdicts": [verdict], "stop_reason": reason}
        parsed = result.parsed.model_dump() if result.parsed is not None else _salvage(result)
        fallback = parsed is None
        raw = parsed or {
            "passed": False,
            "score": 0.0,
            "criteria": [],
            "feedback": "The judge's answer could not be read; judged as not passed.",
        }
        if result.parsed is None and parsed is not None:
            raw["repaired"] = True
        verdict = normalize(raw, criteria, spec.judge.pass_threshold)
        verdict.update({"iteration": iteration, "fallback": fallback})
        span.set_outputs(verdict)
        span.set_attributes(
            {"atlas.verdict.passed": verdict["passed"], "atlas.verdict.score": verdict["score"]}
        )
        emit({"event": "verdict", **verdict})
        return {"verdict": verdict, "verdicts": [verdict], "usage": result.usage}


def _salvage(result: CallResult) -> dict[str, Any] | None:
    """Repair a verdict that is well-formed JSON but out of range (a 0-10 or 0-100 score)."""
    for call in result.message.tool_calls:
        args = call.get("args")
        if not isinstance(args, dict) or "passed" not in args:
            continue
        try:
            score = float(args.get("score", 0))
        except (TypeError, ValueError):
            score = 0.0
        if score > 1:
            score = score / 10 if score <= 10 else score / 100
        fixed = {**args, "score": min(1.0, max(0.0, score))}
        fixed["criteria"] = [c for c in fixed.get("criteria") or [] if isinstance(c, dict)]
        fixed.setdefault("feedback", "")
        try:
            return Verdict.model_validate(fixed).model_dump()
        except ValueError:
            return None
    return None
