"""Token and cost counters that live in the graph state and are summed by its reducer."""

from __future__ import annotations

from typing import Any

Usage = dict[str, dict[str, Any]]
"""Scope ("run", "team:research", "model:openai:gpt-4o") -> counters.

Counters: `input_tokens`, `output_tokens`, `calls`, and `cost_usd` only when every priced call in
that scope had a known price (`cost_unknown_calls` counts the others). Calls answered from the
model-response cache also count `cache_hits` and `cache_saved_tokens` (what the original call
used); their own tokens are zero.
"""


def call_usage(
    *,
    model: str,
    team: str | None,
    input_tokens: int,
    output_tokens: int,
    cost: float | None,
    cached: dict[str, Any] | None = None,
) -> Usage:
    one: dict[str, Any] = {"input_tokens": input_tokens, "output_tokens": output_tokens, "calls": 1}
    if cached is not None:
        one["cache_hits"] = 1
        one["cache_saved_tokens"] = int(cached.get("saved_input_tokens", 0)) + int(
            cached.get("saved_output_tokens", 0)
        )
    if cost is None:
        one["cost_unknown_calls"] = 1
    else:
        one["cost_usd"] = cost
    scopes = ["run", f"model:{model}"]
    if team:
        scopes.append(f"team:{team}")
    return {scope: dict(one) for scope in scopes}


def merge_usage(left: Usage | None, right: Usage | None) -> Usage:
    """LangGraph reducer: add counters scope by scope."""
    out: Usage = {k: dict(v) for k, v in (left or {}).items()}
    for scope, counters in (right or {}).items():
        mine = out.setdefault(scope, {})
        for key, value in counters.items():
            mine[key] = mine.get(key, 0) + value
    return out


def totals(usage: Usage | None, scope: str = "run") -> dict[str, Any]:
    counters = dict((usage or {}).get(scope, {}))
    counters.setdefault("input_tokens", 0)
    counters.setdefault("output_tokens", 0)
    counters.setdefault("calls", 0)
    counters["tokens"] = counters["input_tokens"] + counters["output_tokens"]
    return counters
