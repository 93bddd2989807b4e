"""Memory namespaces and unfinished runs: what one run may recall of what others stored.

A namespace is a partition of both stores (its own Chroma collection, its own graph labels); a
run's findings stay pending, invisible to other runs, until the run finishes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from atlas.errors import MemoryStoreError
from atlas.memory.entities import Entities
from atlas.memory.store import Memory, finding_records

ROOT = Path(__file__).resolve().parents[1]


def _finding(run_id: str, text: str, *, pending: bool = False, step: str = "1.research") -> Any:
    return finding_records(
        run_id=run_id, step_id=step, team="research", iteration=1, text=text, pending=pending
    )


def _entities(a: str, relation: str, b: str) -> Entities:
    return Entities.model_validate(
        {
            "entities": [{"name": a, "type": "org"}, {"name": b, "type": "place"}],
            "relations": [{"source": a, "relation": relation, "target": b}],
        }
    )


def _ids(hits: list[Any]) -> set[str]:
    return {h.id for h in hits}


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "memory"


def test_a_namespace_never_sees_another_namespaces_passages_or_entities(directory: Path) -> None:
    alpha, beta = Memory(directory, namespace="alpha"), Memory(directory, namespace="beta")
    default = Memory(directory)
    try:
        a = _finding("run-a", "Northwind Bikes moved its frame supplier to Oslo in March.")
        b = _finding("run-b", "Northwind Bikes sells its frames only in Bergen shops.")
        alpha.remember(a)
        beta.remember(b)
        alpha.remember_entities(_entities("Northwind Bikes", "sources frames in", "Oslo"), a[0])
        beta.remember_entities(_entities("Northwind Bikes", "sells in", "Bergen"), b[0])

        assert _ids(alpha.search(["Northwind frames"], 10)[0]) == {a[0].id}
        assert _ids(beta.search(["Northwind frames"], 10)[0]) == {b[0].id}
        assert default.search(["Northwind frames"], 10)[0] == []
        assert alpha.graph_context("What about Northwind Bikes?") == [
            "Northwind Bikes -[sources frames in]-> Oslo (from run-a/1.research)"
        ]
        assert beta.graph_context("What about Northwind Bikes?") == [
            "Northwind Bikes -[sells in]-> Bergen (from run-b/1.research)"
        ]
        assert default.graph_context("What about Northwind Bikes?") == []
        assert alpha.graph.paths("Northwind Bikes", "Bergen") == []
        # Counting and clearing are per namespace too.
        assert alpha.stats()["graph"]["entities"] == 2
        assert alpha.clear() == {"passages": 1, "entities": 2}
        assert _ids(beta.search(["Northwind frames"], 10)[0]) == {b[0].id}
        assert beta.stats()["graph"]["relations"] == 1
    finally:
        for memory in (alpha, beta, default):
            memory.close()


def test_unfinished_runs_findings_are_recalled_only_once_settled(directory: Path) -> None:
    writer = Memory(directory, run_id="run-w")
    reader = Memory(directory, run_id="run-r")
    curious = Memory(directory, run_id="run-c", include_unfinished=True)
    try:
        records = _finding("run-w", "The ferry timetable changes on 4 May.", pending=True)
        writer.remember(records)
        writer.remember_entities(_entities("Ferry line 7", "stops at", "Nesodden"), records[0])

        # The run that wrote them sees its own; another run does not, unless it asks.
        assert _ids(writer.search(["ferry timetable"], 5)[0]) == {records[0].id}
        assert reader.search(["ferry timetable"], 5)[0] == []
        assert reader.graph_context("Ferry line 7") == []
        assert reader.entity("Ferry line 7")["mentioned_in"] == []
        assert _ids(curious.search(["ferry timetable"], 5)[0]) == {records[0].id}
        assert curious.graph_context("Ferry line 7") != []
        assert reader.stats()["vector"]["pending"] == 1
        assert reader.stats()["graph"]["pending_findings"] == 1

        assert writer.settle("run-w") == {"passages": 1}
        assert _ids(reader.search(["ferry timetable"], 5)[0]) == {records[0].id}
        assert reader.graph_context("Ferry line 7") == [
            "Ferry line 7 -[stops at]-> Nesodden (from run-w/1.research)"
        ]
        assert [m["run_id"] for m in reader.entity("Ferry line 7")["mentioned_in"]] == ["run-w"]
        assert reader.stats()["vector"]["pending"] == 0
        # Settling again (a resumed run that finishes twice over) changes nothing.
        assert writer.settle("run-w") == {"passages": 0}
    finally:
        for memory in (writer, reader, curious):
            memory.close()


def test_a_namespace_nobody_wrote_reads_as_empty_without_creating_it(directory: Path) -> None:
    Memory(directory).remember(_finding("run-a", "Something worth keeping."))
    reader = Memory(directory, namespace="ghost", read_only=True)
    try:
        assert reader.search(["something"], 5)[0] == []
        assert reader.graph.find(["Something"]) == []
        assert reader.stats()["vector"]["passages"] == 0
        with pytest.raises(MemoryStoreError):
            reader.remember(_finding("run-b", "not allowed"))
    finally:
        reader.close()
    writer = Memory(directory)
    try:
        assert writer.stats()["vector"]["passages"] == 1
    finally:
        writer.close()


def test_a_graph_store_from_before_namespaces_keeps_its_entities(directory: Path) -> None:
    """A graph file written by an earlier version (no `pending` column) opens, keeps what it
    held, and takes new writes."""
    import ladybug

    directory.mkdir(parents=True)
    db = ladybug.Database(str(directory / "graph.lbdb"))
    conn = ladybug.Connection(db)
    for statement in (
        "CREATE NODE TABLE Entity(name STRING, label STRING, kind STRING, PRIMARY KEY(name))",
        "CREATE NODE TABLE Finding(id STRING, run_id STRING, step_id STRING, team STRING, "
        "source STRING, kind STRING, PRIMARY KEY(id))",
        "CREATE REL TABLE MENTIONS(FROM Finding TO Entity)",
        "CREATE REL TABLE RELATED(FROM Entity TO Entity, relation STRING, finding STRING, "
        "run_id STRING, step_id STRING, source STRING)",
        "CREATE (:Entity {name: 'acme', label: 'ACME', kind: 'org'})",
        "CREATE (:Entity {name: 'oslo', label: 'Oslo', kind: 'place'})",
        "MATCH (a:Entity {name: 'acme'}), (b:Entity {name: 'oslo'}) "
        "CREATE (a)-[:RELATED {relation: 'is based in', finding: 'finding:old:1:1', "
        "run_id: 'old', step_id: '1', source: 'old/1'}]->(b)",
    ):
        conn.execute(statement)
    conn.close()
    db.close()

    reader = Memory(directory, read_only=True)
    try:  # read-only: nothing can be migrated, and what was there still reads
        assert reader.graph_context("Where is ACME?") == ["ACME -[is based in]-> Oslo (from old/1)"]
    finally:
        reader.close()
    memory = Memory(directory)
    try:
        assert memory.graph_context("Where is ACME?") == ["ACME -[is based in]-> Oslo (from old/1)"]
        new = _finding("run-n", "ACME opened a shop in Bergen.")
        memory.remember_entities(_entities("ACME", "has a shop in", "Bergen"), new[0])
        assert len(memory.graph_context("Where is ACME?")) == 2
    finally:
        memory.close()


def test_the_memory_cli_reads_one_namespace(directory: Path, tmp_path: Path) -> None:
    memory = Memory(directory, namespace="team_a")
    try:
        memory.remember(_finding("run-a", "The refund window is thirty days."))
    finally:
        memory.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "atlas", "memory", *args, "--store", str(directory)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )

    found = cli("search", "refund window", "--namespace", "team_a")
    assert found.returncode == 0, found.stderr
    assert "thirty days" in found.stdout
    other = cli("search", "refund window")
    assert other.returncode == 0, other.stderr
    assert "thirty days" not in other.stdout and "(nothing in memory)" in other.stdout
    bad = cli("search", "refund", "--namespace", "team-a")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "--namespace 'team-a'" in bad.stderr
    assert "Traceback" not in bad.stderr
