"""Graph memory on a real graph server: FalkorDB over Bolt, through the Neo4j backend.

What a user would notice, each on the embedded LadybugDB file and on the server where the two
should agree: entities found again by a later run, neighbours, two-hop neighbours, paths and
mentions with their provenance, unfinished runs kept out, namespaces kept apart, concurrent
writers that duplicate nothing, failed writes that leave nothing; then a full ATLAS run, the
`atlas memory` commands, and a server that is not there.

The server is shared by the whole file (tests/graph_server.py), so every test works in
namespaces of its own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from atlas.errors import MemoryStoreError
from atlas.memory.entities import Entities
from atlas.memory.graph import (
    FALKORDB,
    MERGE_ENTITY,
    MERGE_FINDING,
    MERGE_RELATION,
    GraphMemory,
    Provenance,
    scoped,
)
from atlas.memory.store import Memory, finding_records
from tests.conftest import EXAMPLES, atlas_cli, free_port

OpenMemory = Callable[..., Memory]


def _extraction(entities: list[str], relations: list[tuple[str, str, str]]) -> Entities:
    return Entities.model_validate(
        {
            "entities": [{"name": n, "type": "org"} for n in entities],
            "relations": [{"source": a, "relation": r, "target": b} for a, r, b in relations],
        }
    )


def _finding(run_id: str, step: str, team: str, text: str, *, pending: bool = False) -> Any:
    return finding_records(
        run_id=run_id, step_id=step, team=team, iteration=1, text=text, pending=pending
    )[0]


def _namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["embedded", "falkordb"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """The graph store under test: None for the embedded file, else the server's URI."""
    if request.param == "embedded":
        return None
    return str(request.getfixturevalue("falkordb_server"))


@pytest.fixture
def open_memory(backend: str | None, tmp_path: Path) -> Iterator[OpenMemory]:
    """Opens `Memory` over one memory directory and the backend's graph; closes them after."""
    opened: list[Memory] = []

    def open_(namespace: str, **kw: Any) -> Memory:
        memory = Memory(tmp_path / "memory", graph_uri=backend, namespace=namespace, **kw)
        opened.append(memory)
        return memory

    yield open_
    for memory in opened:
        memory.close()


# -- what a run stores, and what later runs find ---------------------------------------------
HOSTILE = 'O\'Brien \\ Sons "Ltd" Café 東京'
"""A quote, a backslash, double quotes and non-ASCII: FalkorDB pastes Bolt parameters into the
query text unescaped, so the backend must not send it any."""


def test_entities_merge_across_findings_and_are_found_with_provenance(
    open_memory: OpenMemory,
) -> None:
    memory = open_memory(_namespace())
    first = _finding("r1", "1.research", "research", "ACME Corp supplies Northwind Bikes.")
    second = _finding("r2", "1.analysis", "analysis", "The ACME Corp. is based in Oslo.")
    third = _finding("r3", "1.research", "research", f"{HOSTILE} owns ACME Corp.")
    memory.remember_entities(
        _extraction(
            ["ACME Corp", "Northwind Bikes"], [("ACME Corp", "supplies", "Northwind Bikes")]
        ),
        first,
    )
    again = _extraction(["The ACME Corp.", "Oslo"], [("the acme corp", "is based in", "Oslo")])
    memory.remember_entities(again, second)
    memory.remember_entities(again, second)  # a resumed step writes its finding again
    memory.remember_entities(_extraction([HOSTILE], [(HOSTILE, "owns", "ACME Corp")]), third)

    stats = memory.graph.stats()
    assert stats == {**stats, "entities": 4, "relations": 3, "findings": 3, "pending_findings": 0}
    info = memory.entity("acme CORP")
    assert info["entity"] == "ACME Corp"
    facts = {(r["relation"], r["other"], r["direction"], r["run_id"]) for r in info["relations"]}
    assert facts == {
        ("supplies", "Northwind Bikes", "out", "r1"),
        ("is based in", "Oslo", "out", "r2"),
        ("owns", HOSTILE, "in", "r3"),
    }
    provenance = {(m["run_id"], m["step_id"], m["team"], m["source"]) for m in info["mentioned_in"]}
    assert provenance == {
        ("r1", "1.research", "research", "r1/1.research"),
        ("r2", "1.analysis", "analysis", "r2/1.analysis"),
        ("r3", "1.research", "research", "r3/1.research"),
    }
    assert memory.graph.find([HOSTILE.upper()]) == [{"name": HOSTILE.lower(), "label": HOSTILE}]
    assert memory.graph.paths("Northwind Bikes", "Oslo") == [
        [("ACME Corp", "supplies", "Northwind Bikes"), ("ACME Corp", "is based in", "Oslo")]
    ]
    assert memory.graph.paths("Northwind Bikes", HOSTILE, max_hops=1) == []
    assert len(memory.graph.paths("Oslo", HOSTILE)) == 1
    assert sorted(memory.graph.two_hop("Northwind Bikes")) == sorted(["Oslo", HOSTILE])
    context = memory.graph_context("Plan the deliveries from ACME Corp this winter")
    assert "ACME Corp -[supplies]-> Northwind Bikes (from r1/1.research)" in context


def test_long_values_are_stored_whole(open_memory: OpenMemory) -> None:
    """FalkorDB copies Bolt parameters into a 4 KiB buffer; a longer one crashed the server."""
    memory = open_memory(_namespace())
    source = "docs/" + "very-long-folder-name/" * 400 + "notes.md#3"
    assert len(source) > 8000
    memory.graph.add(
        _extraction(["Ferry Line 7", "Nesodden"], [("Ferry Line 7", "stops at", "Nesodden")]),
        Provenance(finding="finding:long:1:1", run_id="long", step_id="1", source=source),
    )
    assert [n["source"] for n in memory.graph.neighbours("ferry line 7")] == [source]
    assert [m["source"] for m in memory.entity("Nesodden")["mentioned_in"]] == [source]


def test_the_largest_finding_is_stored_whole(open_memory: OpenMemory) -> None:
    """20 entities and 20 relations (the most an extraction holds): on FalkorDB one query of 41
    statements, every one of which must take effect. A NUL in a name (FalkorDB cannot hold one)
    still merges and is found."""
    memory = open_memory(_namespace())
    names = [f"Station {n}" for n in range(19)] + ["Nul\x00Byte Inc"]
    relations = [(names[n], "links to", names[(n + 1) % 20]) for n in range(20)]
    record = _finding("big", "1.research", "research", "Twenty stations in a ring.")
    assert memory.remember_entities(_extraction(names, relations), record) == (20, 20)
    assert memory.graph.stats() == {
        **memory.graph.stats(),
        "entities": 20,
        "relations": 20,
        "findings": 1,
    }
    found = memory.graph.find(["Nul\x00Byte Inc"])
    assert [f["label"].replace("\ufffd", "\x00") for f in found] == ["Nul\x00Byte Inc"]
    assert {n["other"] for n in memory.graph.neighbours("Station 0")} == {
        "Station 1",
        found[0]["label"],
    }
    assert len(memory.entity("Station 7")["mentioned_in"]) == 1


def test_memory_persists_across_runs(open_memory: OpenMemory) -> None:
    """What one run (one Memory, then closed) stored, the next run's Memory finds."""
    namespace = _namespace()
    writer = open_memory(namespace, run_id="run-1")
    record = _finding("run-1", "1.research", "research", "Harbour Café buys from Oat Mill.")
    writer.remember_entities(
        _extraction(["Harbour Café", "Oat Mill"], [("Harbour Café", "buys from", "Oat Mill")]),
        record,
    )
    writer.close()
    later = open_memory(namespace, run_id="run-2")
    assert later.graph_context("What does Harbour Café buy?") == [
        "Harbour Café -[buys from]-> Oat Mill (from run-1/1.research)"
    ]
    reader = open_memory(namespace, read_only=True)
    assert reader.graph.stats()["entities"] == 2


def test_unfinished_runs_are_recalled_only_once_settled(open_memory: OpenMemory) -> None:
    namespace = _namespace()
    writer = open_memory(namespace, run_id="run-w")
    reader = open_memory(namespace, run_id="run-r")
    curious = open_memory(namespace, run_id="run-c", include_unfinished=True)
    record = _finding("run-w", "1.research", "research", "Ferry 7 stops at Nesodden.", pending=True)
    writer.remember_entities(
        _extraction(["Ferry 7", "Nesodden", "Aker"], [("Ferry 7", "stops at", "Nesodden")]),
        record,
    )
    older = _finding("run-o", "1.research", "research", "Aker borders Nesodden.")
    writer.remember_entities(_extraction(["Aker"], [("Aker", "borders", "Nesodden")]), older)

    assert writer.graph_context("Ferry 7") == [
        "Ferry 7 -[stops at]-> Nesodden (from run-w/1.research)"
    ]
    assert reader.graph_context("Ferry 7") == []
    assert reader.entity("Ferry 7")["mentioned_in"] == []
    assert reader.graph.two_hop("Ferry 7") == [] and reader.graph.paths("Ferry 7", "Aker") == []
    assert curious.graph.two_hop("Ferry 7") == ["Aker"]
    assert reader.stats()["graph"]["pending_findings"] == 1

    writer.settle("run-w")
    assert reader.graph_context("Ferry 7") == [
        "Ferry 7 -[stops at]-> Nesodden (from run-w/1.research)"
    ]
    assert reader.graph.paths("Ferry 7", "Aker") == [
        [("Ferry 7", "stops at", "Nesodden"), ("Aker", "borders", "Nesodden")]
    ]
    assert [m["run_id"] for m in reader.entity("Ferry 7")["mentioned_in"]] == ["run-w"]
    assert reader.stats()["graph"]["pending_findings"] == 0


def test_namespaces_are_kept_apart(open_memory: OpenMemory, backend: str | None) -> None:
    prefix = _namespace()
    if backend is not None:  # the server's default namespace is shared: start it empty
        shared = GraphMemory(uri=backend)
        shared.clear()
        shared.close()
    alpha, beta = open_memory(f"{prefix}_a"), open_memory(f"{prefix}_b")
    default = open_memory("default")
    a = _finding("run-a", "1.research", "research", "Northwind Bikes sources frames in Oslo.")
    b = _finding("run-b", "1.research", "research", "Northwind Bikes sells in Bergen.")
    alpha.remember_entities(
        _extraction(
            ["Northwind Bikes", "Oslo"], [("Northwind Bikes", "sources frames in", "Oslo")]
        ),
        a,
    )
    beta.remember_entities(
        _extraction(["Northwind Bikes", "Bergen"], [("Northwind Bikes", "sells in", "Bergen")]), b
    )
    assert alpha.graph_context("What about Northwind Bikes?") == [
        "Northwind Bikes -[sources frames in]-> Oslo (from run-a/1.research)"
    ]
    assert beta.graph_context("What about Northwind Bikes?") == [
        "Northwind Bikes -[sells in]-> Bergen (from run-b/1.research)"
    ]
    assert default.graph_context("What about Northwind Bikes?") == []
    assert alpha.graph.paths("Northwind Bikes", "Bergen") == []
    assert alpha.graph.stats()["entities"] == 2
    assert alpha.graph.clear() == 2
    assert alpha.graph.stats()["entities"] == 0
    assert beta.graph.stats() == {**beta.graph.stats(), "entities": 2, "relations": 1}


# -- concurrency and failures ------------------------------------------------------------------
def test_parallel_threads_lose_and_duplicate_nothing(falkordb_server: str, tmp_path: Path) -> None:
    """Eight threads write findings naming shared entities at once, as parallel steps do (the
    embedded store's version is in test_memory.py)."""
    memory = Memory(tmp_path / "memory", graph_uri=falkordb_server, namespace=_namespace())
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def writer(n: int) -> None:
        try:
            barrier.wait()
            for i in range(4):
                record = _finding("r", f"s{n}-{i}", "research", f"Depot{n} ships to Town{i}.")
                memory.remember_entities(
                    _extraction(
                        [f"Depot{n}", f"Town{i}", "Hub"],
                        [(f"Depot{n}", "ships to", f"Town{i}"), (f"Town{i}", "uses", "Hub")],
                    ),
                    record,
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # 8 depots, 4 towns and the hub; two relations per finding, each kept with its finding.
    try:
        stats = memory.graph.stats()
        assert stats == {**stats, "entities": 13, "findings": 32, "relations": 64}
    finally:
        memory.close()


_GRAPH_WRITER = """
import sys
from atlas.memory.entities import Entities
from atlas.memory.graph import GraphMemory, Provenance

uri, namespace, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
graph = GraphMemory(uri=uri, namespace=namespace)
print("ready", flush=True)
sys.stdin.readline()  # go: every writer opens the new namespace at the same moment
for step in range(15):
    depot = f"Depot {step % 5}"
    graph.add(
        Entities.model_validate({
            "entities": [{"name": depot, "type": "place"}, {"name": "Central Hub"}],
            "relations": [
                {"source": f"Writer {n}", "relation": "ships to", "target": depot},
                {"source": depot, "relation": "feeds", "target": "Central Hub"},
            ],
        }),
        Provenance(finding=f"finding:run{n}:s{step}:1", run_id=f"run{n}", step_id=f"s{step}"),
    )
graph.close()
print("ok", flush=True)
"""


def test_processes_writing_a_new_namespace_at_once_duplicate_nothing(
    falkordb_server: str,
) -> None:
    """Three processes open a namespace nobody wrote before and write the same entities at
    once. The server has no unique constraints (FalkorDB): MERGE alone must keep one node per
    name and one relation per (relation, finding)."""
    namespace = _namespace()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _GRAPH_WRITER, falkordb_server, namespace, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.stderr
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outcomes = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], outcomes
    graph = GraphMemory(uri=falkordb_server, namespace=namespace, read_only=True)
    try:
        twice = graph.backend.run(
            scoped(
                "MATCH (e:Entity) WITH e.name AS name, count(*) AS n WHERE n > 1 RETURN name, n",
                namespace,
            )
        )
        assert twice == []
        # 5 depots, the hub, 3 writers; 2 relations and 2 mentions in each of 45 findings.
        assert graph.stats() == {**graph.stats(), "entities": 9, "findings": 45, "relations": 90}
        mentions = graph.backend.run(
            scoped("MATCH (:Finding)-[m:MENTIONS]->(:Entity) RETURN count(m) AS n", namespace)
        )
        assert mentions == [{"n": 45 * 3}]
    finally:
        graph.close()


def test_a_write_that_fails_half_way_leaves_nothing(open_memory: OpenMemory) -> None:
    """A finding, two entities and a relation, then a statement that fails as it runs. FalkorDB
    ignores ROLLBACK, so the backend sends a write as one query, which it undoes whole."""
    memory = open_memory(_namespace())
    graph = memory.graph
    ns = graph.namespace
    prov = {"run_id": "r", "step_id": "s", "source": "r/s", "pending": False}
    with pytest.raises((MemoryStoreError, RuntimeError)), graph.backend.write() as tx:
        tx.execute(scoped(MERGE_FINDING, ns), {"id": "f1", "team": "t", "kind": "finding", **prov})
        for name in ("acme", "oslo"):
            tx.execute(
                scoped(MERGE_ENTITY, ns),
                {"name": name, "label": name.title(), "kind": "org", "finding": "f1"},
            )
        tx.execute(
            scoped(MERGE_RELATION, ns),
            {"a": "acme", "b": "oslo", "relation": "in", "finding": "f1", **prov},
        )
        # Division by zero, found only as the statement runs (it depends on the data).
        tx.execute(
            scoped(
                "MATCH (f:Finding {id: $id}) SET f.kind = 1 / (size(f.team) - size(f.team))", ns
            ),
            {"id": "f1"},
        )
    assert graph.find(["acme", "oslo"]) == []
    assert graph.stats() == {**graph.stats(), "entities": 0, "relations": 0, "findings": 0}


def test_closing_leaves_the_server_answering_the_next_client(falkordb_server: str) -> None:
    """FalkorDB leaves the connection after a GOODBYE unanswered (the driver waits 60 s): the
    backend closes its connections without one, so one process after another connects at once."""
    for _ in range(3):
        started = time.monotonic()
        graph = GraphMemory(uri=falkordb_server, namespace=_namespace())
        assert graph.backend.server == FALKORDB
        assert graph.stats()["entities"] == 0
        graph.close()
        assert time.monotonic() - started < 5


def test_a_database_in_the_uri_is_refused_on_falkordb(falkordb_server: str) -> None:
    """FalkorDB's Bolt serves one graph: another database name would be silently ignored."""
    graph = GraphMemory(uri=f"{falkordb_server}/tenant_a")
    with pytest.raises(MemoryStoreError, match="serves one graph over Bolt"):
        _ = graph.backend


# -- ATLAS as a user runs it -------------------------------------------------------------------
def _task(where: Path, memory: dict[str, Any], *, tracing: bool = False) -> Path:
    """The quickstart task in `where`, with these memory settings."""
    quickstart = EXAMPLES / "quickstart"
    for part in ("docs", "data"):
        if not (where / part).exists():
            shutil.copytree(quickstart / part, where / part)
    spec = yaml.safe_load((quickstart / "task.yaml").read_text())
    spec["memory"] = memory
    spec["tracing"] = {"enabled": tracing}
    path = where / ("task-traced.yaml" if tracing else "task.yaml")
    path.write_text(yaml.safe_dump(spec), "utf-8")
    return path


def _run(task: Path, state: Path) -> dict[str, Any]:
    run = ("run", str(task), "--model", "scripted", "--quiet", "--json")
    proc = atlas_cli(*run, "--state-dir", str(state), cwd=task.parent)
    assert proc.returncode == 0, proc.stderr
    assert "memory" not in proc.stderr, proc.stderr  # no memory error or warning
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_a_dry_run_keeps_its_graph_on_the_server_and_the_next_run_recalls_it(
    falkordb_server: str, tmp_path: Path
) -> None:
    namespace = _namespace()
    memory = {"graph_uri": falkordb_server, "namespace": namespace}
    state = tmp_path / "state"
    first = _run(_task(tmp_path, memory), state)
    assert first["status"] == "passed"
    assert not (state / "memory" / "graph.lbdb").exists()  # the graph lives on the server

    graph = GraphMemory(uri=falkordb_server, namespace=namespace, read_only=True)
    try:
        stats = graph.stats()
        assert stats["entities"] > 0 and stats["findings"] > 0 and stats["pending_findings"] == 0
        rows = graph.backend.run(
            scoped(
                "MATCH (f:Finding)-[:MENTIONS]->(:Entity) RETURN DISTINCT f.run_id AS run",
                namespace,
            )
        )
        assert rows == [{"run": first["run_id"]}]
    finally:
        graph.close()

    second = _run(_task(tmp_path, memory, tracing=True), state)
    assert second["status"] == "passed" and second["trace_id"]
    import mlflow

    mlflow.set_tracking_uri(second["tracking_uri"])
    spans = mlflow.get_trace(second["trace_id"]).data.spans
    recalled = [line for s in spans if s.name == "memory.graph_context" for line in s.outputs]
    assert recalled, "the second run found nothing in the graph"
    assert all(f"(from {first['run_id']}/" in line for line in recalled), recalled


def test_memory_commands_on_the_server(falkordb_server: str, tmp_path: Path) -> None:
    namespace = _namespace()
    memory = Memory(tmp_path / "memory", graph_uri=falkordb_server, namespace=namespace)
    try:
        record = _finding("run-1", "1.research", "research", "ACME supplies Northwind in Oslo.")
        memory.remember_entities(
            _extraction(
                ["ACME", "Northwind", "Oslo"],
                [("ACME", "supplies", "Northwind"), ("Northwind", "is based in", "Oslo")],
            ),
            record,
        )
    finally:
        memory.close()
    server = ["--graph-uri", falkordb_server, "--namespace", namespace]
    store = ["--store", str(tmp_path / "memory")]  # passages stay local (none here)
    (tmp_path / "memory").mkdir(exist_ok=True)

    shown = atlas_cli("memory", "graph", "acme", "--json", *server, *store)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["known"] and info["entity"] == "ACME"
    assert [(r["relation"], r["other"]) for r in info["relations"]] == [("supplies", "Northwind")]
    assert [m["source"] for m in info["mentioned_in"]] == ["run-1/1.research"]

    path = atlas_cli("memory", "graph", "ACME", "--to", "oslo", *server, *store)
    assert path.returncode == 0, path.stderr
    assert path.stdout.strip() == "ACME -[supplies]- Northwind -[is based in]- Oslo"
    # `graph` reads only the server: no local memory folder is needed for it.
    elsewhere = ["--store", str(tmp_path / "no-such-folder")]
    path = atlas_cli("memory", "graph", "ACME", "--to", "oslo", *server, *elsewhere)
    assert path.returncode == 0, path.stderr
    assert not (tmp_path / "no-such-folder").exists()

    stats = atlas_cli("memory", "stats", "--json", *server, *store)
    assert stats.returncode == 0, stats.stderr
    graph = json.loads(stats.stdout)["graph"]
    assert graph["store"] == f"{falkordb_server} (namespace {namespace})"
    assert (graph["entities"], graph["relations"], graph["findings"]) == (3, 2, 1)

    cleared = atlas_cli("memory", "clear", "--yes", *server, *store)
    assert cleared.returncode == 0, cleared.stderr
    assert "and 3 entities" in cleared.stdout
    after = GraphMemory(uri=falkordb_server, namespace=namespace, read_only=True)
    try:
        assert after.stats()["entities"] == 0
    finally:
        after.close()


def test_an_unreachable_server_is_one_line_naming_it(tmp_path: Path) -> None:
    """A wrong port: the run stops before any model call, with one line that names the server
    (and not its password)."""
    port = free_port()
    uri = f"bolt://falkordb:s3cret-pw@127.0.0.1:{port}"
    task = _task(tmp_path, {"graph_uri": uri, "namespace": "n1"})
    run = ("run", str(task), "--model", "scripted", "--quiet")
    proc = atlas_cli(*run, "--state-dir", str(tmp_path / "s"), cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(
        f"atlas: error: cannot reach the Neo4j server at bolt://127.0.0.1:{port}"
    )
    assert "s3cret" not in proc.stderr
    assert not (tmp_path / "output").exists()
