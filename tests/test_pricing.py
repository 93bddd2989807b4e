"""Cost accounting: known models are priced, unknown ones are left absent, never 0."""

from __future__ import annotations

import pytest

from atlas.models.pricing import cost_usd, price_for
from atlas.models.usage import call_usage, merge_usage, totals


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("openai:gpt-4o-mini", (0.15, 0.60)),
        ("openai:gpt-4o-2024-08-06", (2.50, 10.0)),
        ("openai:gpt-4o-mini-2024-07-18", (0.15, 0.60)),
        ("anthropic:claude-sonnet-4-5-20250929", (3.0, 15.0)),
        ("local:smollm2-135m", (0.0, 0.0)),
        ("scripted?latency_ms=5", (0.0, 0.0)),
    ],
)
def test_price_table(model: str, expected: tuple[float, float]) -> None:
    assert price_for(model) == expected


def test_unknown_model_has_no_price() -> None:
    assert price_for("openai:my-finetune") is None
    assert cost_usd("openai:my-finetune", 1000, 1000) is None


def test_unknown_cost_stays_absent_in_totals() -> None:
    known = call_usage(
        model="openai:gpt-4o-mini",
        team="research",
        input_tokens=1_000_000,
        output_tokens=0,
        cost=cost_usd("openai:gpt-4o-mini", 1_000_000, 0),
    )
    unknown = call_usage(
        model="openai:custom", team="analysis", input_tokens=10, output_tokens=5, cost=None
    )
    usage = merge_usage(known, unknown)
    assert totals(usage, "team:research")["cost_usd"] == pytest.approx(0.15)
    assert "cost_usd" not in totals(usage, "team:analysis")
    assert totals(usage)["cost_unknown_calls"] == 1
    assert totals(usage)["tokens"] == 1_000_015
