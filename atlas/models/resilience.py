"""Retries and fallbacks for model calls.

A call goes to the role's model; a rate limit (429), a server error (5xx), a timeout or a dropped
connection is retried with exponential backoff and full jitter, honouring `retry-after`. When a
model keeps failing (or fails in a way retrying cannot fix, such as a 401), the next model of the
role's fallback chain is tried. Every retry and fallback is reported (trace event and progress
event). The plan of attempts is a generator, so the sync and the async paths share it.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from atlas.errors import AtlasError, ModelConfigError
from atlas.tracing.redact import public_model

BASE_DELAY_S = 0.5
MAX_DELAY_S = 20.0
MAX_RETRY_AFTER_S = 60.0


class ProviderError(AtlasError):
    """Every model of a role's chain failed (after retries)."""

    exit_code = 3


@dataclass
class Failure:
    retryable: bool
    retry_after: float | None
    reason: str


def classify(exc: BaseException) -> Failure | None:
    """A provider failure, or None for errors that are not the provider's (let those raise)."""
    name = type(exc).__name__
    status = getattr(exc, "status_code", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        retry_after = _retry_after(getattr(getattr(exc, "response", None), "headers", None))
        retryable = status in (408, 409, 429) or status >= 500
        return Failure(retryable, retry_after, f"HTTP {status}")
    if "Timeout" in name or "Connection" in name or "RemoteProtocol" in name:
        return Failure(True, None, name)
    if isinstance(exc, json.JSONDecodeError):
        # The SDKs let a body that is not JSON (a proxy's error page, a cut response) through.
        return Failure(True, None, "malformed response")
    module = type(exc).__module__.split(".", 1)[0]
    if module in ("openai", "anthropic", "httpx", "httpcore"):
        return Failure(True, None, name)
    return None


def _retry_after(headers: Any) -> float | None:
    if not headers:
        return None
    try:
        millis = headers.get("retry-after-ms")
        if millis is not None:
            return max(0.0, float(millis) / 1000)
        value = headers.get("retry-after")
    except (AttributeError, TypeError, ValueError):
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is None:
            return None
        return max(0.0, parsed.timestamp() - time.time())


def backoff(attempt: int, retry_after: float | None, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (0-based)."""
    rand = rng or random
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER_S) * (1 + rand.uniform(0, 0.1))
    return rand.uniform(0, min(MAX_DELAY_S, BASE_DELAY_S * 2**attempt)) + 0.05


@dataclass
class Attempt:
    """Call `spec`'s model now."""

    spec: Any
    number: int


@dataclass
class Sleep:
    seconds: float


@dataclass
class Notice:
    """A retry or a fallback, to be reported."""

    kind: str
    attributes: dict[str, Any]


Step = Attempt | Sleep | Notice


def attempts(
    role: str, chain: list[Any], deadline: float | None
) -> Generator[Step, BaseException | None, None]:
    """Yields what to do next; is sent the error of each attempt (None when it succeeded)."""
    last = "no model configured"
    for index, spec in enumerate(chain):
        for number in range(spec.max_retries + 1):
            error = yield Attempt(spec, number)
            if error is None:
                return
            if isinstance(error, ModelConfigError):
                last = str(error)
                break
            failure = classify(error)
            if failure is None:
                raise error
            last = f"{public_model(spec.model)}: {failure.reason}: {_short(error)}"
            if not failure.retryable or number >= spec.max_retries:
                break
            delay = backoff(number, failure.retry_after)
            if deadline is not None and time.monotonic() + delay > deadline:
                break
            yield Notice(
                "retry",
                {
                    "role": role,
                    "model": public_model(spec.model),
                    "attempt": number + 1,
                    "reason": failure.reason,
                    "delay_s": round(delay, 3),
                },
            )
            yield Sleep(delay)
        if index + 1 < len(chain):
            yield Notice(
                "fallback",
                {
                    "role": role,
                    "from": public_model(spec.model),
                    "to": public_model(chain[index + 1].model),
                    "reason": last,
                },
            )
    raise ProviderError(f"every model for {role} failed; last: {last}")


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
