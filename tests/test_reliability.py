"""Reliability: runs survive provider faults, misbehaving models stop within budget, and parallel
workers share one budget without a race."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import atlas
from tests.fake_providers import ALL_FAULTS, FakeProviders

FAULT_RATE = 0.2
TASKS = 20


def _traces(state_dir: Path) -> list[Any]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{state_dir / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("atlas")
    assert experiment is not None
    return list(
        mlflow.search_traces(
            locations=[experiment.experiment_id], return_type="list", max_results=1000
        )
    )


@pytest.mark.slow
# langchain-openai and langchain-anthropic share one cached async HTTP client per base URL;
# when this test's event loop closes, that client's pooled keep-alive sockets are garbage
# collected unclosed. That is their client cache meeting asyncio.run(), not an ATLAS leak.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_twenty_tasks_complete_under_twenty_percent_provider_faults(
    make_spec: Callable[..., Any], state_dir: Path, tmp_path: Path
) -> None:
    """20 dry-run-sized tasks at once against an OpenAI-compatible server that fails one request
    in five (429 with retry-after, 500, timeouts, dropped connections, malformed JSON, truncated
    bodies). Every task completes, every step keeps its output, and the traces show the retries
    and fallbacks."""
    events: list[dict[str, Any]] = []
    with FakeProviders(fault_rate=FAULT_RATE, seed=2026, hang_s=1.2, retry_after=0.05) as fake:
        primary = {
            "model": "openai:gpt-4o-mini",
            "base_url": f"{fake.url}/v1",
            "timeout_s": 0.6,
            "max_retries": 4,
        }
        fallback = {
            "model": "anthropic:claude-haiku-4-5",
            "base_url": fake.url,
            "timeout_s": 0.6,
            "max_retries": 6,
        }
        specs = [
            make_spec(
                models={"default": primary, "fallbacks": [fallback]},
                output=str(tmp_path / f"task{i}" / "brief.md"),
                tracing={"enabled": True},
                budget={"max_iterations": 1},
            )
            for i in range(TASKS)
        ]

        async def run_all() -> list[Any]:
            return await asyncio.gather(
                *(atlas.arun(s, state_dir_path=state_dir, on_event=events.append) for s in specs)
            )

        results = asyncio.run(run_all())
    injected = fake.injected
    assert set(injected) == set(ALL_FAULTS), injected
    assert sum(injected.values()) >= 0.15 * len(fake.requests)

    assert [r.status for r in results] == ["passed"] * TASKS
    for result in results:
        text = Path(result.output).read_text()
        assert "## Findings" in text and "- " in text.split("## Findings", 1)[1]
    steps = [e for e in events if e["event"] == "step_done"]
    assert len(steps) == 3 * TASKS
    assert all(e["status"] == "done" and len(e["workers"]) == 2 for e in steps), steps

    notices = {"retry": 0, "fallback": 0}
    traces = _traces(state_dir)
    assert len(traces) == TASKS
    for trace in traces:
        for span in trace.data.spans:
            if span.name in notices:
                notices[span.name] += 1
    assert notices["retry"] > 0 and notices["fallback"] >= 0
    # Every fault the server served was answered by a retry or a fallback in some trace.
    assert notices["retry"] + notices["fallback"] >= sum(injected.values())
