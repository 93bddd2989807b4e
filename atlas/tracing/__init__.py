"""Tracing: ATLAS's coordination spans, on top of MLflow's LangChain autolog.

`Tracer` is the narrow protocol the engine uses. `NullTracer` does nothing; the MLflow tracer lives
in `atlas.tracing.mlflow` and is only imported when tracing is on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class SpanHandle(Protocol):
    def set_outputs(self, outputs: Any) -> None: ...

    def set_attributes(self, attributes: dict[str, Any]) -> None: ...


class Tracer(Protocol):
    """Opens coordination spans (plan, dispatch, team, handoff, worker, judge, budget stop)."""

    def span(
        self,
        name: str,
        *,
        span_type: str = "CHAIN",
        inputs: Any = None,
        attributes: dict[str, Any] | None = None,
    ) -> Any: ...

    def event(self, name: str, attributes: dict[str, Any]) -> None: ...


class _NullSpan:
    def set_outputs(self, outputs: Any) -> None:
        pass

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        pass


class NullTracer:
    """The tracer used when tracing is off."""

    @contextmanager
    def span(
        self,
        name: str,
        *,
        span_type: str = "CHAIN",
        inputs: Any = None,
        attributes: dict[str, Any] | None = None,
    ) -> Iterator[_NullSpan]:
        yield _NullSpan()

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        pass


__all__ = ["NullTracer", "SpanHandle", "Tracer"]
