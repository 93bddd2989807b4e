"""What the run's nodes read from and write to memory, each as a span of the run's trace.

- `prelude` (the first plan): ingest the task's documents, recall findings of earlier runs and
  graph context for the task's entities.
- `recall` (each worker): passages from earlier runs relevant to the worker's assignment.
- `store_finding` / `store_entities` (each finished step) and `store_output` (finalize): written
  pending, so that other runs do not recall them while this one may still change course.
- `settle_run` (finalize): what the run stored becomes recallable by other runs.

Memory is an aid, never a reason to fail: a store error becomes a `memory_error` span and a
progress event, and the run goes on without memory.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from atlas.context import RunContext
from atlas.graph.events import emit
from atlas.memory.entities import Entities
from atlas.memory.store import finding_records, output_records
from atlas.memory.vector import Hit, Record

log = logging.getLogger(__name__)
RECALL_KINDS = ("finding", "output")


def _docs(hits: list[Hit]) -> list[dict[str, Any]]:
    """Hits in the shape MLflow's UI renders for RETRIEVER spans."""
    return [
        {
            "page_content": h.text[:1000],
            "metadata": {"source": h.source, "score": h.score, "kind": h.kind},
            "id": h.id,
        }
        for h in hits
    ]


def _failed(ctx: RunContext, what: str, exc: BaseException) -> None:
    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    log.warning("memory %s failed: %s", what, text)
    ctx.tracer.event("memory_error", {"operation": what, "error": text})
    emit({"event": "memory_error", "operation": what, "error": text})


INGEST_SHARE = 0.5
"""At most this share of the run's remaining time goes to ingesting documents, so the run keeps
time for its model calls; what is left is ingested by later runs."""


def ingest_deadline(ctx: RunContext) -> float | None:
    """When the prelude's ingest stops (monotonic), or None when the run has no time limit."""
    limit = ctx.spec.budget.timeout_s
    if limit is None:
        return None
    now = time.monotonic()
    remaining = max(0.0, ctx.budget.started + limit - now)
    return now + INGEST_SHARE * remaining


def prelude(ctx: RunContext) -> dict[str, list[str]]:
    """First plan of a run: store the task's documents, then recall what earlier runs found."""
    memory = ctx.memory
    if memory is None:
        return {"recalled": [], "graph": []}
    spec = ctx.spec
    try:
        if spec.document_paths:
            with ctx.tracer.span(
                "memory.ingest",
                span_type="MEMORY",
                inputs={"documents": [str(p) for p in spec.document_paths[:50]]},
            ) as span:
                counts = memory.ingest(
                    spec.document_paths,
                    spec.root,
                    deadline=ingest_deadline(ctx),
                    on_progress=emit,
                )
                span.set_outputs(counts)
            if counts.get("stopped"):
                done = counts["chunks"] - counts["skipped"]
                message = (
                    f"memory ingest stopped after {done} of {counts['chunks']} chunks "
                    f"({counts['stopped']}); the rest is ingested by later runs or "
                    "`atlas memory ingest`"
                )
                emit({"event": "warning", "message": message})
        recalled = recall(ctx, spec.task, name="memory.recall:planner")
        with ctx.tracer.span(
            "memory.graph_context", span_type="RETRIEVER", inputs={"text": spec.task[:500]}
        ) as span:
            graph = memory.graph_context(spec.task)
            span.set_outputs(graph)
    except Exception as exc:
        _failed(ctx, "prelude", exc)
        return {"recalled": [], "graph": []}
    return {"recalled": recalled, "graph": graph}


def recall(ctx: RunContext, query: str, *, name: str) -> list[str]:
    """Up to `memory.recall` passages from earlier runs, as `[source] text` lines."""
    memory = ctx.memory
    k = ctx.spec.memory.recall
    if memory is None or k <= 0 or not query.strip():
        return []
    try:
        with ctx.tracer.span(name, span_type="RETRIEVER", inputs={"query": query[:500]}) as span:
            hits = memory.search([query], k, kinds=RECALL_KINDS, exclude_run=ctx.run_id)[0]
            hits = [h for h in hits if h.score >= 0.2]
            span.set_outputs(_docs(hits))
    except Exception as exc:
        _failed(ctx, "recall", exc)
        return []
    return [f"[memory:{h.source}] {' '.join(h.text.split())}" for h in hits]


def store_finding(ctx: RunContext, result: dict[str, Any]) -> Record | None:
    memory = ctx.memory
    text = str(result.get("output") or "").strip()
    if memory is None or not text or text == "(no reports)":
        return None
    records = finding_records(
        run_id=ctx.run_id,
        step_id=str(result["id"]),
        team=str(result["team"]),
        iteration=int(result.get("iteration") or 1),
        text=text,
        pending=True,
    )
    try:
        with ctx.tracer.span(
            "memory.write",
            span_type="MEMORY",
            inputs={"ids": [r.id for r in records], "source": records[0].source},
            attributes={"atlas.memory.kind": "finding", "atlas.step": records[0].step_id},
        ) as span:
            span.set_outputs({"written": memory.remember(records)})
    except Exception as exc:
        _failed(ctx, "write", exc)
        return None
    return records[0]


def store_entities(ctx: RunContext, extraction: Entities, record: Record) -> None:
    memory = ctx.memory
    if memory is None:
        return
    try:
        with ctx.tracer.span(
            "memory.graph_write",
            span_type="MEMORY",
            inputs=extraction.model_dump(),
            attributes={"atlas.memory.finding": record.id},
        ) as span:
            entities, relations = memory.remember_entities(extraction, record)
            span.set_outputs({"entities": entities, "relations": relations})
    except Exception as exc:
        _failed(ctx, "graph_write", exc)


def store_output(ctx: RunContext, text: str, path: str) -> None:
    memory = ctx.memory
    if memory is None or not text.strip():
        return
    records = output_records(run_id=ctx.run_id, path=path, text=text, pending=True)
    try:
        with ctx.tracer.span(
            "memory.write",
            span_type="MEMORY",
            inputs={"ids": [r.id for r in records], "source": path},
            attributes={"atlas.memory.kind": "output"},
        ) as span:
            span.set_outputs({"written": memory.remember(records)})
    except Exception as exc:
        _failed(ctx, "write", exc)


def settle_run(ctx: RunContext) -> None:
    """The run finished (finalize): what it stored becomes recallable by other runs. A run
    that stops before (interrupted, or an error) is resumed later, and settles then."""
    memory = ctx.memory
    if memory is None:
        return
    try:
        with ctx.tracer.span(
            "memory.settle", span_type="MEMORY", inputs={"run_id": ctx.run_id}
        ) as span:
            span.set_outputs(memory.settle(ctx.run_id))
    except Exception as exc:
        _failed(ctx, "settle", exc)
