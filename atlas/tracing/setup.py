"""Choosing and starting the tracer for a run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlas.tracing import NullTracer, Tracer

if TYPE_CHECKING:
    from atlas.context import RunContext
    from atlas.spec import TaskSpec


class NullTrace:
    """The run-level half of tracing when tracing is off."""

    trace_id: str | None = None
    tracking_uri: str | None = None

    @contextmanager
    def root(self, ctx: RunContext, *, resumed: bool) -> Iterator[None]:
        yield

    def begin(self, ctx: RunContext, *, resumed: bool) -> None:
        pass

    def attach(self) -> Any:
        return None

    def detach(self, token: Any) -> None:
        pass

    def end(self, error: BaseException | None) -> None:
        pass

    def finish(self, ctx: RunContext, values: dict[str, Any]) -> None:
        pass

    def record_alerts(self, breaches: list[dict[str, Any]]) -> None:
        pass

    def close(self, status: str | None = None) -> None:
        pass


def start_tracing(
    spec: TaskSpec,
    state_dir: Path,
    *,
    tracking_uri: str | None = None,
    on_event: Any = None,
) -> tuple[Tracer, Any]:
    if not spec.tracing.enabled:
        return NullTracer(), NullTrace()
    from atlas.tracing.mlflow import MlflowTrace

    trace = MlflowTrace.start(spec, state_dir, tracking_uri=tracking_uri, on_event=on_event)
    if trace is None:
        return NullTracer(), NullTrace()
    return trace.tracer, trace
