"""Built-in tools, made per run over that run's `Workspace`.

A worker's tool set is fixed by its definition in `agents/*.yaml`; nothing a model reads can add a
tool. Tool errors (bad SQL, unknown source) go back to the model as text, not up the stack.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from langchain_core.tools import BaseTool, StructuredTool

from atlas.errors import SpecError, ToolError
from atlas.tools.data import DataSource
from atlas.tools.documents import DocumentIndex
from atlas.tools.drafts import DraftStore

if TYPE_CHECKING:
    from atlas.spec import TaskSpec

MAX_TOOL_OUTPUT = 4000


@dataclass
class Workspace:
    """What a run's tools can see: its documents, its data and its drafts."""

    documents: DocumentIndex
    data: DataSource
    drafts: DraftStore

    @classmethod
    def for_spec(cls, spec: TaskSpec, run_dir: Path) -> Workspace:
        return cls(
            documents=DocumentIndex.from_paths(spec.document_paths, spec.root),
            data=DataSource(spec.data_paths),
            drafts=DraftStore(run_dir / "drafts"),
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
        except ToolError as exc:
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


BUILTIN_TOOLS: dict[str, Callable[[Workspace], BaseTool]] = {
    "search_documents": _search_documents,
    "read_document": _read_document,
    "describe_data": _describe_data,
    "query_data": _query_data,
    "save_draft": _save_draft,
    "read_draft": _read_draft,
}


def make_tools(names: list[str], ws: Workspace) -> list[BaseTool]:
    """The tools named by a worker definition, bound to this run's workspace."""
    factories = BUILTIN_TOOLS
    tools = []
    for name in names:
        factory = factories.get(name)
        if factory is None:
            raise SpecError(f"unknown tool {name!r} (known: {', '.join(sorted(factories))})")
        tools.append(factory(ws))
    return tools


__all__ = ["BUILTIN_TOOLS", "DataSource", "DocumentIndex", "DraftStore", "Workspace", "make_tools"]
