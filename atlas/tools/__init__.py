"""Built-in tools, made per run over that run's `Workspace`.

A worker's tool set is fixed by its definition in `agents/*.yaml`; nothing a model reads can add a
tool. Tool errors (bad SQL, unknown source) go back to the model as text, not up the stack.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.tools import BaseTool, StructuredTool

from atlas.errors import MemoryStoreError, SpecError, ToolError
from atlas.tools.data import DataSource
from atlas.tools.documents import DocumentIndex
from atlas.tools.drafts import DraftStore

if TYPE_CHECKING:
    from atlas.memory import Memory
    from atlas.spec import TaskSpec
    from atlas.tracing import Tracer

MAX_TOOL_OUTPUT = 4000


@dataclass
class Workspace:
    """What a run's tools can see: its documents, its data, its drafts and memory."""

    documents: DocumentIndex
    data: DataSource
    drafts: DraftStore
    memory: Memory | None = None
    tracer: Tracer | None = None
    """Memory tools record what they retrieved as RETRIEVER spans here (see `make_tools`)."""
    _made: dict[tuple[str, int], BaseTool] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )
    """Tools already made for this run (building a tool's schema costs about a millisecond)."""

    @classmethod
    def for_spec(cls, spec: TaskSpec, run_dir: Path, *, memory: Memory | None = None) -> Workspace:
        return cls(
            documents=DocumentIndex.from_paths(spec.document_paths, spec.root),
            data=DataSource(spec.data_paths, root=spec.root),
            drafts=DraftStore(run_dir / "drafts"),
            memory=memory,
        )

    def close(self) -> None:
        self.data.close()


def _clip(text: str) -> str:
    if len(text) <= MAX_TOOL_OUTPUT:
        return text
    return text[:MAX_TOOL_OUTPUT] + f"\n... [{len(text) - MAX_TOOL_OUTPUT} more characters cut]"


def _guarded(fn: Callable[..., str]) -> Callable[..., str]:
    """Clip the output; a ToolError goes back to the model as text."""

    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> str:
        try:
            return _clip(fn(*args, **kwargs))
        except (ToolError, MemoryStoreError) as exc:
            return f"error: {exc}"

    return run


def _search_documents(ws: Workspace) -> BaseTool:
    def search_documents(query: str, k: int = 5) -> str:
        """Search the task's documents. Returns the best passages, each with its source id."""
        hits = ws.documents.search(query, max(1, min(int(k), 10)))
        if not hits:
            return "No matching passages."
        return "\n\n".join(f"[{c.source}] (score {s:.2f})\n{c.text}" for c, s in hits)

    return StructuredTool.from_function(_guarded(search_documents))


def _read_document(ws: Workspace) -> BaseTool:
    def read_document(source: str) -> str:
        """Read a document by source id (`file.md` for all of it, `file.md#3` for one passage)."""
        chunks = ws.documents.read(source)
        if not chunks:
            known = ", ".join(ws.documents.sources[:20]) or "none"
            raise ToolError(f"unknown source {source!r}; available: {known}")
        return "\n\n".join(f"[{c.source}]\n{c.text}" for c in chunks)

    return StructuredTool.from_function(_guarded(read_document))


def _describe_data(ws: Workspace) -> BaseTool:
    def describe_data() -> str:
        """List the data tables with their columns and row counts."""
        return ws.data.describe()

    return StructuredTool.from_function(_guarded(describe_data))


def _query_data(ws: Workspace) -> BaseTool:
    def query_data(sql: str) -> str:
        """Run one read-only SQL SELECT over the data tables (DuckDB dialect)."""
        return ws.data.query(sql)

    return StructuredTool.from_function(_guarded(query_data))


def _save_draft(ws: Workspace) -> BaseTool:
    def save_draft(content: str) -> str:
        """Save the complete text of the deliverable (Markdown). Replaces the current draft."""
        if not content.strip():
            raise ToolError("the draft is empty")
        path = ws.drafts.save(content)
        return f"saved draft {path.stem} ({len(content)} characters)"

    return StructuredTool.from_function(_guarded(save_draft))


def _read_draft(ws: Workspace) -> BaseTool:
    def read_draft() -> str:
        """Read the current draft of the deliverable."""
        return ws.drafts.latest() or "No draft has been saved yet."

    return StructuredTool.from_function(_guarded(read_draft))


def _memory(ws: Workspace) -> Memory:
    if ws.memory is None:
        raise ToolError("memory is turned off for this task (memory.enabled: false)")
    return ws.memory


def _span(ws: Workspace, name: str, span_type: str, inputs: dict[str, object]) -> Any:
    from atlas.tracing import NullTracer

    return (ws.tracer or NullTracer()).span(name, span_type=span_type, inputs=inputs)


def _search_memory(ws: Workspace) -> BaseTool:
    def search_memory(query: str, k: int = 5) -> str:
        """Search long-term memory: documents ingested earlier, findings and outputs of earlier
        runs. Returns passages, each with the source id to cite."""
        k = max(1, min(int(k), 10))
        with _span(ws, "memory.search", "RETRIEVER", {"query": query, "k": k}) as span:
            hits = _memory(ws).search([query], k)[0]
            span.set_outputs(
                [
                    {"page_content": h.text[:1000], "metadata": {"source": h.source}, "id": h.id}
                    for h in hits
                ]
            )
        if not hits:
            return "Nothing in memory matches."
        return "\n\n".join(f"[{h.source}] ({h.kind}, score {h.score:.2f})\n{h.text}" for h in hits)

    return StructuredTool.from_function(_guarded(search_memory))


def _query_graph(ws: Workspace) -> BaseTool:
    def query_graph(entity: str, other: str = "") -> str:
        """Look up an entity in the knowledge graph: what it is related to (and where that was
        found). With `other`, the paths that connect the two entities."""
        memory = _memory(ws)
        inputs: dict[str, object] = {"entity": entity, "other": other}
        with _span(ws, "memory.graph", "RETRIEVER", inputs) as span:
            if other.strip():
                paths = memory.graph.paths(entity, other)
                lines = [
                    " ".join([steps[0][0]] + [f"-[{rel}]- {b}" for _, rel, b in steps])
                    for steps in paths
                ]
                text = "\n".join(lines) or f"No path between {entity!r} and {other!r} in memory."
            else:
                info = memory.entity(entity)
                if not info["known"]:
                    text = f"{entity!r} is not in the knowledge graph."
                else:
                    lines = [
                        f"{info['entity']} -[{r['relation']}]-> {r['other']} [{r['source']}]"
                        if r["direction"] == "out"
                        else f"{r['other']} -[{r['relation']}]-> {info['entity']} [{r['source']}]"
                        for r in info["relations"]
                    ]
                    text = "\n".join(lines) or f"{info['entity']}: known, with no relations yet."
            span.set_outputs(text)
        return text

    return StructuredTool.from_function(_guarded(query_graph))


BUILTIN_TOOLS: dict[str, Callable[[Workspace], BaseTool]] = {
    "search_documents": _search_documents,
    "read_document": _read_document,
    "describe_data": _describe_data,
    "query_data": _query_data,
    "save_draft": _save_draft,
    "read_draft": _read_draft,
    "search_memory": _search_memory,
    "query_graph": _query_graph,
}


def make_tools(names: list[str], ws: Workspace, tracer: Tracer | None = None) -> list[BaseTool]:
    """The tools named by a worker definition, bound to this run's workspace (and tracer)."""
    factories = BUILTIN_TOOLS
    tools = []
    for name in names:
        factory = factories.get(name)
        if factory is None:
            raise SpecError(f"unknown tool {name!r} (known: {', '.join(sorted(factories))})")
        key = (name, id(tracer))
        tool = ws._made.get(key)
        if tool is None:
            bound = ws if tracer is None else dataclasses.replace(ws, tracer=tracer, _made={})
            tool = ws._made[key] = factory(bound)
        tools.append(tool)
    return tools


__all__ = ["BUILTIN_TOOLS", "DataSource", "DocumentIndex", "DraftStore", "Workspace", "make_tools"]
