"""Real OpenAI and Anthropic SDKs against a local server speaking their wire formats:
chat, tool calls, streaming, usage; retries on 429/500/timeouts; fallbacks; cost accounting."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import atlas
from atlas.graph.effects import ModelCall, run_model
from atlas.models.resilience import ProviderError, backoff, classify
from tests.fake_providers import FakeProviders


@pytest.fixture
def fake() -> Iterator[FakeProviders]:
    with FakeProviders() as server:
        yield server


def _openai(fake: FakeProviders, **extra: Any) -> dict[str, Any]:
    return {"model": "openai:gpt-4o-mini", "base_url": f"{fake.url}/v1", **extra}


def _anthropic(fake: FakeProviders, **extra: Any) -> dict[str, Any]:
    return {"model": "anthropic:claude-haiku-4-5", "base_url": fake.url, **extra}


def _ctx(make_spec: Callable[..., Any], state_dir: Path, models: dict[str, Any]) -> Any:
    from atlas.context import RunContext

    return RunContext.create(make_spec(models=models), state_dir=state_dir)


def test_openai_sdk_chat_tools_and_usage(fake: FakeProviders) -> None:
    from openai import OpenAI

    with OpenAI(base_url=f"{fake.url}/v1", api_key="test", max_retries=0) as client:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.prompt_tokens > 0
        tool = {
            "type": "function",
            "function": {
                "name": "search_documents",
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string"}},
                    "required": ["query"],
                },
            },
        }
        reply = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Step: find brakes"}],
            tools=[tool],
        )  # type: ignore[list-item]
        call = reply.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert call.function.name == "search_documents" and "query" in call.function.arguments


def test_openai_streaming_with_usage_through_langchain(fake: FakeProviders) -> None:
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(
        model="gpt-4o-mini", base_url=f"{fake.url}/v1", api_key="t", stream_usage=True
    )  # type: ignore[arg-type]
    chunks = list(model.stream("Say something about the pilot"))
    text = "".join(str(c.content) for c in chunks)
    assert text
    total = sum((c for c in chunks[1:]), chunks[0])
    assert total.usage_metadata is not None and total.usage_metadata["input_tokens"] > 0


def test_anthropic_sdk_chat_tools_streaming_and_usage(fake: FakeProviders) -> None:
    from anthropic import Anthropic

    with Anthropic(base_url=fake.url, api_key="test", max_retries=0) as client:
        msg = client.messages.create(
            model="claude-haiku-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
        assert msg.content[0].type == "text" and msg.usage.input_tokens > 0
        tool = {
            "name": "query_data",
            "input_schema": {
                "type": "object",
                "properties": {"sql": {"type": "string"}},
                "required": ["sql"],
            },
        }
        msg = client.messages.create(
            model="claude-haiku-4-5",
            max_tokens=100,
            tools=[tool],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "Step: count rows"}],
        )
        assert msg.stop_reason == "tool_use"
        with client.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=100,
            messages=[{"role": "user", "content": "hello"}],
        ) as stream:
            final = stream.get_final_message()
        assert final.content[0].type == "text" and final.usage.output_tokens > 0


def test_a_whole_run_over_each_providers_wire(
    fake: FakeProviders, make_spec: Callable[..., Any], state_dir: Path
) -> None:
    for model in (_openai(fake), _anthropic(fake)):
        spec = make_spec(models={"default": model})
        result = atlas.run(spec, state_dir_path=state_dir)
        assert result.status == "passed", result
        assert result.tokens > 0
    apis = {r.api for r in fake.requests}
    assert apis == {"openai", "anthropic"}


def test_cost_is_computed_from_reported_usage(
    fake: FakeProviders, make_spec: Callable[..., Any], state_dir: Path
) -> None:
    fake.model = fake.model.model_copy(update={"prompt_tokens": 1000, "completion_tokens": 100})
    spec = make_spec(models={"default": _openai(fake)})
    result = atlas.run(spec, state_dir_path=state_dir)
    calls = result.model_calls
    assert calls == len(fake.requests)
    assert result.input_tokens == 1000 * calls and result.output_tokens == 100 * calls
    expected = calls * (1000 * 0.15 + 100 * 0.60) / 1_000_000  # gpt-4o-mini prices
    assert result.cost_usd == pytest.approx(expected)
    assert sum(t["cost_usd"] for t in result.by_team.values()) <= expected


def test_unknown_model_price_leaves_cost_absent(
    fake: FakeProviders, make_spec: Callable[..., Any], state_dir: Path
) -> None:
    spec = make_spec(models={"default": {**_openai(fake), "model": "openai:my-finetune"}})
    result = atlas.run(spec, state_dir_path=state_dir)
    assert result.status == "passed"
    assert result.cost_usd is None


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_429_is_retried_after_retry_after(
    api: str, fake: FakeProviders, make_spec: Callable[..., Any], state_dir: Path
) -> None:
    fake.retry_after = 0.4
    fake.faults.extend(["429"])
    ctx = _ctx(
        make_spec, state_dir, {"default": _openai(fake) if api == "openai" else _anthropic(fake)}
    )
    from langchain_core.messages import HumanMessage

    started = time.monotonic()
    result = run_model(ctx, ModelCall(role="judge", messages=[HumanMessage("hello")]))
    assert time.monotonic() - started >= 0.4
    assert result.message.content
    assert [r.fault for r in fake.requests] == ["429", None]


@pytest.mark.parametrize("fault", ["500", "timeout", "drop"])
def test_server_errors_timeouts_and_drops_are_retried(
    fault: str, fake: FakeProviders, make_spec: Callable[..., Any], state_dir: Path
) -> None:
    from langchain_core.messages import HumanMessage

    fake.hang_s = 2.0
    fake.faults.extend([fault, fault])
    ctx = _ctx(make_spec, state_dir, {"default": _openai(fake, timeout_s=0.5)})
    result = run_model(ctx, ModelCall(role="planner", messages=[HumanMessage("hello")]))
    assert result.message.content
    assert [r.fault for r in fake.requests] == [fault, fault, None]


def test_fallback_to_the_next_provider_is_reported(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    events: list[dict[str, Any]] = []
    with FakeProviders(always="500") as down, FakeProviders() as up:
        primary = {**_anthropic(down), "max_retries": 1, "fallbacks": [_openai(up)]}
        spec = make_spec(models={"default": primary})
        result = atlas.run(spec, state_dir_path=state_dir, on_event=events.append)
        assert result.status == "passed"
        assert all(r.api == "anthropic" for r in down.requests)
        assert up.requests and all(r.api == "openai" for r in up.requests)
    fallbacks = [e for e in events if e["event"] == "fallback"]
    retries = [e for e in events if e["event"] == "retry"]
    assert fallbacks and fallbacks[0]["from"] == "anthropic:claude-haiku-4-5"
    assert fallbacks[0]["to"] == "openai:gpt-4o-mini" and "HTTP 500" in fallbacks[0]["reason"]
    assert retries and retries[0]["attempt"] == 1
    # usage is charged to the model that answered
    assert list(result.by_model) == ["openai:gpt-4o-mini"]
    assert result.by_model["openai:gpt-4o-mini"]["calls"] == result.model_calls


def test_every_model_down_is_a_clear_provider_error(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    from langchain_core.messages import HumanMessage

    with FakeProviders(always="500") as down:
        ctx = _ctx(make_spec, state_dir, {"default": _openai(down, max_retries=1)})
        with pytest.raises(ProviderError, match="every model for judge failed"):
            run_model(ctx, ModelCall(role="judge", messages=[HumanMessage("x")]))
        assert len(down.requests) == 2


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff(n, None, rng) for n in range(6)]
    assert all(0.05 <= d <= 20.05 for d in delays)
    assert max(delays[3:]) > max(delays[:2])
    assert 2.0 <= backoff(0, 2.0, rng) <= 2.2
    assert backoff(0, 999, rng) <= 66


def test_classification() -> None:
    class Err(Exception):
        def __init__(self, status: int) -> None:
            self.status_code = status

    assert classify(Err(429)) and classify(Err(429)).retryable  # type: ignore[union-attr]
    assert classify(Err(503)).retryable  # type: ignore[union-attr]
    assert not classify(Err(401)).retryable  # type: ignore[union-attr]
    assert classify(ValueError("mine")) is None


def test_judge_outage_ends_the_run_unpassed_with_its_output(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    with FakeProviders(always="500") as down:
        spec = make_spec(
            models={"default": "scripted", "judge": _openai(down, max_retries=1)},
            budget={"max_iterations": 3},
        )
        events: list[dict[str, Any]] = []
        result = atlas.run(spec, state_dir_path=state_dir, on_event=events.append)
    assert result.status == "failed"
    assert result.iterations == 1  # no replanning into an outage
    assert "judge unavailable" in (result.stop_reason or "")
    assert Path(result.output).read_text().strip()
    verdict = next(e for e in events if e["event"] == "verdict")
    assert verdict["fallback"] is True and not verdict["passed"]


def test_worker_outage_is_noted_and_the_run_goes_on(
    make_spec: Callable[..., Any], state_dir: Path
) -> None:
    with FakeProviders(always="500") as down:
        spec = make_spec(
            models={"default": "scripted", "teams": {"analysis": _openai(down, max_retries=0)}}
        )
        events: list[dict[str, Any]] = []
        result = atlas.run(spec, state_dir_path=state_dir, on_event=events.append)
    assert result.status == "passed"
    notes = [e["note"] for e in events if e["event"] == "step_done" and e["team"] == "analysis"]
    assert notes and "model unavailable" in notes[0]
