"""The graph LangGraph's own server loads: `langgraph dev`, LangGraph Studio, LangGraph Platform.

The repository's `langgraph.json` points at `atlas.langgraph_app:graph`. Every request gives
its task as the run's input (`{"task": "...", "acceptance": [...]}`) and may set `model`,
`namespace`, `state_dir` or `tracking_uri` in its context. The defaults every request starts
from come from the server's environment, read once at start:

- `ATLAS_TASK`: a task.yaml whose teams, models, memory, tracing and budget are the defaults
  (its own `task` is not used); without it, ATLAS's defaults;
- `ATLAS_MODEL`: the model for every role (e.g. `scripted` for a dry run);
- `ATLAS_STATE_DIR`: where run records and outputs go (else `~/.local/state/atlas`);
- `MLFLOW_TRACKING_URI`: where traces go (else the state directory's own store).

The graph is compiled without a checkpointer: the server brings its own.
"""

from __future__ import annotations

import os

from atlas.graph import build_graph
from atlas.spec import load_task

TASK_ENV = "ATLAS_TASK"
MODEL_ENV = "ATLAS_MODEL"

graph = build_graph(
    load_task(os.environ[TASK_ENV]) if os.environ.get(TASK_ENV) else None,
    model=os.environ.get(MODEL_ENV) or None,
)
