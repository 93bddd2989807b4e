"""Vector and graph memory: retrieval quality offline, merging, provenance, concurrency, runs."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from atlas.memory.entities import Entities, candidate_names, normalize
from atlas.memory.store import Memory, finding_records

HELDOUT = Path(__file__).parent / "fixtures" / "recall_heldout"


@pytest.fixture
def memory(tmp_path: Path) -> Any:
    mem = Memory(tmp_path / "memory")
    yield mem
    mem.close()


def _extraction(entities: list[str], relations: list[tuple[str, str, str]]) -> Entities:
    return Entities.model_validate(
        {
            "entities": [{"name": n, "type": "org"} for n in entities],
            "relations": [{"source": a, "relation": r, "target": b} for a, r, b in relations],
        }
    )


def test_heldout_paraphrased_questions_find_their_document_offline(memory: Memory) -> None:
    """The issue's bar: 30 short documents, 15 paraphrased questions, the right document in the
    top 5 for at least 14. This set was never used to tune anything."""
    docs = sorted((HELDOUT / "docs").glob("*.md"))
    assert len(docs) == 30
    counts = memory.ingest(docs, HELDOUT)
    assert counts["files"] == 30 and counts["written"] == counts["chunks"]
    questions = yaml.safe_load((HELDOUT / "questions.yaml").read_text())
    results = memory.search([q["question"] for q in questions], 5, kinds=["document"])
    found = [
        q["answer"] in {Path(h.source.split("#")[0]).name for h in hits}
        for q, hits in zip(questions, results, strict=True)
    ]
    missed = [q["question"] for q, ok in zip(questions, found, strict=True) if not ok]
    assert sum(found) >= 14, f"recall@5 {sum(found)}/15; missed: {missed}"


def test_reingest_skips_unchanged_chunks_and_drops_stale_ones(
    memory: Memory, tmp_path: Path
) -> None:
    doc = tmp_path / "notes.md"
    doc.write_text("First paragraph about ferries.\n\n" + ("Second part. " * 120), "utf-8")
    first = memory.ingest([doc], tmp_path)
    assert first["chunks"] >= 2 and first["written"] == first["chunks"]
    again = memory.ingest([doc], tmp_path)
    assert again["written"] == 0, "unchanged chunks were embedded and written again"
    doc.write_text("Only a short note about ferries now.", "utf-8")
    shrunk = memory.ingest([doc], tmp_path)
    assert shrunk["written"] == 1 and shrunk["removed"] == first["chunks"] - 1
    assert memory.vector.count("document") == 1
    hit = memory.search(["ferries"], 1)[0][0]
    assert hit.source == "notes.md#1" and "short note" in hit.text


def test_entity_names_merge_across_findings_with_provenance(memory: Memory) -> None:
    assert normalize("  The ACME Corp. ") == normalize("acme corp") == "acme corp"
    assert normalize("Café  Nord") == normalize("CAFÉ NORD")
    first = finding_records(
        run_id="r1",
        step_id="1.research",
        team="research",
        iteration=1,
        text="ACME Corp supplies Northwind Bikes.",
    )[0]
    second = finding_records(
        run_id="r2",
        step_id="1.analysis",
        team="analysis",
        iteration=1,
        text="The ACME Corp. is based in Oslo.",
    )[0]
    memory.remember_entities(
        _extraction(
            ["ACME Corp", "Northwind Bikes"], [("ACME Corp", "supplies", "Northwind Bikes")]
        ),
        first,
    )
    memory.remember_entities(
        _extraction(["The ACME Corp.", "Oslo"], [("the acme corp", "is based in", "Oslo")]),
        second,
    )
    # Writing the same finding again (a resumed step) adds nothing.
    memory.remember_entities(
        _extraction(["The ACME Corp.", "Oslo"], [("the acme corp", "is based in", "Oslo")]),
        second,
    )
    stats = memory.graph.stats()
    assert stats == {**stats, "entities": 3, "relations": 2, "findings": 2}
    info = memory.entity("acme CORP")
    assert info["entity"] == "ACME Corp"
    facts = {(r["relation"], r["other"], r["direction"], r["run_id"]) for r in info["relations"]}
    assert facts == {
        ("supplies", "Northwind Bikes", "out", "r1"),
        ("is based in", "Oslo", "out", "r2"),
    }
    provenance = {(m["run_id"], m["step_id"], m["team"], m["source"]) for m in info["mentioned_in"]}
    assert provenance == {
        ("r1", "1.research", "research", "r1/1.research"),
        ("r2", "1.analysis", "analysis", "r2/1.analysis"),
    }
    assert memory.graph.paths("Northwind Bikes", "Oslo") == [
        [("ACME Corp", "supplies", "Northwind Bikes"), ("ACME Corp", "is based in", "Oslo")]
    ]
    assert memory.graph.two_hop("Northwind Bikes") == ["Oslo"]
    context = memory.graph_context("Plan the deliveries from ACME Corp this winter")
    assert "ACME Corp -[supplies]-> Northwind Bikes (from r1/1.research)" in context
    assert "acme corp" in candidate_names("deliveries from ACME Corp")


def test_parallel_writers_lose_nothing(memory: Memory) -> None:
    """Eight threads write findings and entities at the same moment, as parallel steps do."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def writer(n: int) -> None:
        try:
            barrier.wait()
            for i in range(5):
                records = finding_records(
                    run_id="r",
                    step_id=f"s{n}-{i}",
                    team="research",
                    iteration=1,
                    text=f"Worker {n} found fact {i}: Depot{n} ships to Town{i}.",
                )
                memory.remember(records)
                memory.remember_entities(
                    _extraction(
                        [f"Depot{n}", f"Town{i}", "Hub"],
                        [(f"Depot{n}", "ships to", f"Town{i}"), (f"Town{i}", "uses", "Hub")],
                    ),
                    records[0],
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert memory.vector.count("finding") == 40
    stats = memory.graph.stats()
    # 8 depots + 5 towns + the hub; 40 "ships to" + 5 "uses" per distinct finding.
    assert stats["entities"] == 14 and stats["findings"] == 40
    assert stats["relations"] == 40 + 40


_WRITER = """
import sys
from pathlib import Path
from atlas.memory.store import Memory, finding_records

memory = Memory(Path(sys.argv[1]))
n = int(sys.argv[2])
for step in range(25):
    text = f"Process {n} step {step}: the pilot logged {n * 100 + step} trips at dock {step}."
    memory.remember(finding_records(
        run_id=f"run{n}", step_id=f"s{step}", team="research", iteration=1, text=text
    ))
    memory.search([f"trips at dock {step}"], k=3, kinds=["finding"])
print("ok")
"""


def test_processes_writing_one_embedded_store_lose_nothing(tmp_path: Path) -> None:
    """Eight processes write and query one embedded Chroma store at once. Unguarded, Chroma's
    per-process index went stale ("Error finding id") and the store lost vectors."""
    import subprocess
    import sys

    store = tmp_path / "m"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(store), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(8)
    ]
    outcomes = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, outcomes
    memory = Memory(store)
    try:
        got = memory.vector.collection.get(include=["embeddings", "metadatas"])
        assert len(got["ids"]) == 8 * 25
        # Every finding is found by meaning, by its own text, with its provenance.
        for n in (0, 5):
            hits = memory.search([f"Process {n} step 7: the pilot logged {n * 100 + 7} trips"])[0]
            assert hits[0].metadata["run_id"] == f"run{n}"
    finally:
        memory.close()


def test_store_built_with_another_embedder_is_refused(tmp_path: Path) -> None:
    from atlas.errors import MemoryStoreError
    from atlas.memory.vector import VectorMemory

    class Other:
        name = "openai:text-embedding-3-small"

        def embed(self, texts: list[str]) -> Any:
            raise AssertionError("not reached")

    Memory(tmp_path / "m").ingest([], tmp_path)  # creates the store with the local embedder
    first = Memory(tmp_path / "m")
    first.open()
    first.close()
    with pytest.raises(MemoryStoreError, match="built with embedder local:all-MiniLM-L6-v2"):
        _ = VectorMemory(Other(), path=tmp_path / "m" / "chroma").collection


# -- in runs ------------------------------------------------------------------------------------


def _spans(trace: Any) -> list[Any]:
    return list(trace.data.spans)


def _trace(state_dir: Path, trace_id: str) -> Any:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{state_dir / 'mlflow.db'}")
    return mlflow.get_trace(trace_id)


def test_dry_run_traces_memory_and_fills_the_graph(make_spec: Any, state_dir: Path) -> None:
    from atlas.runner import run

    spec = make_spec(tracing={"enabled": True})
    result = run(spec, model="scripted", state_dir_path=state_dir)
    assert result.status == "passed"
    trace = _trace(state_dir, result.trace_id)
    by_name: dict[str, list[Any]] = {}
    for span in _spans(trace):
        by_name.setdefault(span.name, []).append(span)
    ingest = by_name["memory.ingest"][0]
    assert ingest.span_type == "MEMORY" and ingest.outputs["files"] == 3
    searches = by_name["memory.search"]  # the searcher's search_memory tool call
    assert all(s.span_type == "RETRIEVER" for s in searches)
    cited = [doc["metadata"]["source"] for s in searches for doc in s.outputs]
    assert any(source.endswith((".md#1", ".md#2")) for source in cited), cited
    writes = by_name["memory.write"]
    assert {s.attributes["atlas.memory.kind"] for s in writes} == {"finding", "output"}
    assert by_name["memory.graph_write"][0].outputs["entities"] > 0
    assert "memory.recall:planner" in by_name and "memory.graph_context" in by_name

    memory = Memory(state_dir / "memory")
    try:
        stats = memory.stats()
        assert stats["vector"]["documents"] >= 3 and stats["vector"]["findings"] >= 3
        assert stats["graph"]["entities"] > 0 and stats["graph"]["findings"] == 3
        rows = memory.graph.backend.run(
            "MATCH (f:Finding)-[:MENTIONS]->(e:Entity) RETURN f.run_id AS run, f.team AS team"
        )
        assert rows and {r["run"] for r in rows} == {result.run_id}
        assert {r["team"] for r in rows} == {"research", "analysis", "writing"}
    finally:
        memory.close()


def test_second_run_recalls_the_first_runs_findings(make_spec: Any, state_dir: Path) -> None:
    from atlas.runner import run

    first = run(make_spec(), model="scripted", state_dir_path=state_dir)
    second = run(
        make_spec(
            task="Summarise what the bike-share pilot found about trips.",
            tracing={"enabled": True},
        ),
        model="scripted",
        state_dir_path=state_dir,
    )
    trace = _trace(state_dir, second.trace_id)
    recalled = [
        doc["metadata"]["source"]
        for span in _spans(trace)
        if span.name.startswith("memory.recall")
        for doc in span.outputs or []
    ]
    assert recalled, "the second run recalled nothing"
    assert all(not s.startswith(second.run_id) for s in recalled)
    assert any(s.startswith(first.run_id) for s in recalled), recalled
    planner = next(s for s in _spans(trace) if s.span_type == "CHAT_MODEL" and s.name == "planner")
    assert f"[memory:{first.run_id}/" in json.dumps(planner.inputs)


def test_memory_can_be_turned_off(make_spec: Any, state_dir: Path) -> None:
    from atlas.runner import run

    result = run(make_spec(memory={"enabled": False}), model="scripted", state_dir_path=state_dir)
    assert result.status == "passed"
    assert not (state_dir / "memory").exists()


def test_extraction_keeps_only_names_found_in_the_finding() -> None:
    """A small model copies names from the prompt or answers with sentences; neither reaches the
    graph."""
    from atlas.memory.entities import grounded

    raw = _extraction(
        ["Harbour Café", "Northwind Bikes", "The council approved a new plan for all the stations"],
        [("Harbour Café", "sells", "oat milk"), ("Northwind Bikes", "supplies", "Harbour Café")],
    )
    kept = grounded(raw, "Sales at the harbour café rose; oat milk sold out in August.")
    assert [e.name for e in kept.entities] == ["Harbour Café"]
    assert [(r.source, r.target) for r in kept.relations] == [("Harbour Café", "oat milk")]
