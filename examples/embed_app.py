"""Embedding ATLAS in your own app.

Three ways:
1. `atlas.run()` / `atlas.arun()` with a progress callback: the simplest.
2. `atlas.build_graph(spec)`: one compiled graph for many tasks, each invocation a run of its own
   (its record, output folder and trace).
3. The same graph as a node of your own LangGraph graph: ATLAS becomes one step of a bigger
   workflow, with your checkpointer and your streaming.

Run it (dry run, no network, no cost):
    python examples/embed_app.py
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import TypedDict

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

import atlas

HERE = Path(__file__).resolve().parent


def with_callback() -> None:
    spec = atlas.load_task(HERE / "quickstart" / "task.yaml")

    def on_event(event: dict) -> None:
        if event["event"] in ("plan", "dispatch", "verdict", "finalize"):
            print(
                "  event:",
                event["event"],
                {k: v for k, v in event.items() if k in ("steps", "score", "status")},
            )

    result = asyncio.run(atlas.arun(spec, model="scripted", on_event=on_event))
    print(
        f"arun: {result.status} in {result.wall_s:.2f}s, {result.tokens} tokens -> {result.output}"
    )


def many_tasks(state_dir: Path) -> None:
    graph = atlas.build_graph(
        atlas.load_task(HERE / "quickstart" / "task.yaml"), state_dir=state_dir
    )
    for task in ("Count the trips in the pilot data.", "List what the managers' notes praise."):
        out = graph.invoke({"task": task}, context={"model": "scripted"})
        print(f"graph: {out['status']} {out['run_id']} -> {out['output_path']}")


class AppState(TypedDict, total=False):
    task: str
    status: str
    output_path: str
    notified: bool


def as_subgraph(state_dir: Path) -> None:
    spec = atlas.TaskSpec.from_dict(
        {
            "task": "Summarise the café managers' notes for the owners.",
            "teams": ["research", "writing"],
            "inputs": {"documents": ["cafe-review/notes/*.md"]},
            "output": "cafe-review/output/notes-summary.md",
            "models": {"default": "scripted"},
            "tracing": {"enabled": False},
        },
        base_dir=HERE,
    )

    def notify(state: AppState) -> AppState:
        print(f"subgraph: ATLAS finished with {state['status']}; output at {state['output_path']}")
        return {"notified": True}

    app = StateGraph(AppState)
    app.add_node("atlas", atlas.build_graph(spec, state_dir=state_dir))
    app.add_node("notify", notify)
    app.add_edge(START, "atlas")
    app.add_edge("atlas", "notify")
    app.add_edge("notify", END)
    graph = app.compile(checkpointer=InMemorySaver())
    graph.invoke({"task": spec.task}, {"configurable": {"thread_id": "embed-demo"}})


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        with_callback()
        many_tasks(Path(tmp))
        as_subgraph(Path(tmp))
