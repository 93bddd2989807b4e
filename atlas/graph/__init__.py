"""The LangGraph graphs: the run graph and the team subgraphs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from atlas.graph.build import build_run_graph
from atlas.graph.team import build_team

if TYPE_CHECKING:
    from langgraph.graph.state import CompiledStateGraph

    from atlas.context import RunContext
    from atlas.spec import TaskSpec


def build_graph(
    spec: TaskSpec,
    *,
    checkpointer: Any = None,
    context: RunContext | None = None,
    model: str | None = None,
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Compile the run graph for a task.

    The graph takes `RunContext` as LangGraph runtime context (`graph.invoke(state, context=ctx)`).
    When a caller invokes it without one (for example as a subgraph of their own graph), a context
    is made for each thread id on first use, with run id = thread id and state under `.atlas/`.
    """
    from atlas.context import RunContext

    made: dict[str, RunContext] = {}

    def fallback() -> RunContext:
        if context is not None:
            return context
        from langgraph.config import get_config

        thread = str(get_config().get("configurable", {}).get("thread_id") or "default")
        if thread not in made:
            made[thread] = RunContext.create(spec, run_id=thread, model=model)
        return made[thread]

    graph = build_run_graph(context or spec, fallback=fallback)
    return graph.compile(checkpointer=checkpointer, name="atlas")


__all__ = ["build_graph", "build_run_graph", "build_team"]
