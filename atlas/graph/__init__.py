"""The LangGraph graphs: the run graph and the team subgraphs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlas.graph.build import build_run_graph
from atlas.graph.team import build_team

if TYPE_CHECKING:
    from atlas.embed import AtlasGraph
    from atlas.spec import TaskSpec

PLACEHOLDER_TASK = "(each invocation gives its own task)"


def build_graph(
    spec: TaskSpec | None = None,
    *,
    checkpointer: Any = None,
    model: str | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
) -> AtlasGraph:
    """Compile the graph to embed: in an app, as a node of a parent graph, or in LangGraph's
    server. One graph serves many tasks: `graph.invoke({"task": "..."}, config)`.

    `spec` gives the defaults every invocation starts from (teams, models, memory, tracing,
    budget); without one, ATLAS's defaults. Its `task` is not used. Each invocation is a run
    with its own record, output folder and trace, under `state_dir` (else `$ATLAS_STATE_DIR`,
    else `~/.local/state/atlas`). `checkpointer` makes runs resumable: invoke the thread with
    `None` to resume. As a node of a parent graph it uses the parent's checkpointer.
    """
    from atlas.embed import AtlasGraph, Defaults
    from atlas.spec import TaskSpec

    if spec is None:
        spec = TaskSpec.from_dict({"task": PLACEHOLDER_TASK}, base_dir=Path.cwd())
    graph = build_run_graph(spec, public=True)
    compiled = graph.compile(checkpointer=checkpointer, name="atlas")
    attrs = {k: v for k, v in compiled.__dict__.items() if k != "__orig_class__"}
    defaults = Defaults(
        spec=spec,
        model=model,
        state_dir=str(state_dir) if state_dir is not None else None,
        tracking_uri=tracking_uri,
    )
    return AtlasGraph(atlas_defaults=defaults, **attrs)


__all__ = ["build_graph", "build_run_graph", "build_team"]
