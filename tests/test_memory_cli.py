"""`python -m atlas memory ...` as a user runs it, on embedded stores and a real Chroma server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import atlas_cli, free_port

HELDOUT = Path(__file__).parent / "fixtures" / "recall_heldout"


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atlas: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_ingest_search_stats_graph_clear(tmp_path: Path) -> None:
    store = str(tmp_path / "mem")
    docs = HELDOUT / "docs"
    ingest = atlas_cli("memory", "ingest", str(docs), "--store", store, "--json")
    assert ingest.returncode == 0, ingest.stderr
    counts = json.loads(ingest.stdout)
    assert counts["files"] == 30 and counts["written"] == counts["chunks"] >= 30

    questions = ["how do I get my money back?", "when does the clinic open?"]
    search = atlas_cli("memory", "search", *questions, "--k", "3", "--json", "--store", store)
    assert search.returncode == 0, search.stderr
    answers = json.loads(search.stdout)
    assert [a["query"] for a in answers] == questions
    for answer in answers:
        assert len(answer["results"]) == 3
        for hit in answer["results"]:
            assert set(hit) >= {"text", "source", "score"}
            assert hit["source"].endswith(tuple(f"#{n}" for n in range(1, 9)))
            assert (docs / Path(hit["source"].split("#")[0]).name).exists()
        scores = [h["score"] for h in answer["results"]]
        assert scores == sorted(scores, reverse=True)

    text = atlas_cli("memory", "search", "refund", "--store", store)
    assert text.returncode == 0 and text.stdout.startswith("== refund\n 1. [")

    stats = atlas_cli("memory", "stats", "--json", "--store", store)
    assert json.loads(stats.stdout)["vector"]["documents"] == counts["chunks"]

    unknown = atlas_cli("memory", "graph", "Nobody Inc", "--store", store)
    assert unknown.returncode == 1 and "is not in the graph" in unknown.stdout

    refused = atlas_cli("memory", "clear", "--store", store)
    assert refused.returncode == 2 and "--yes" in _one_line_error(refused)
    cleared = atlas_cli("memory", "clear", "--yes", "--store", store)
    assert cleared.returncode == 0 and f"deleted {counts['chunks']} passages" in cleared.stdout
    empty = atlas_cli("memory", "search", "refund", "--json", "--store", store)
    assert json.loads(empty.stdout) == [{"query": "refund", "results": []}]


def test_graph_command_after_a_run(tmp_path: Path) -> None:
    """A dry run fills the graph; `memory graph` shows an entity's relations and provenance."""
    state = tmp_path / "state"
    task = tmp_path / "task.yaml"
    shutil.copytree(HELDOUT / "docs", tmp_path / "docs")
    task.write_text(
        "task: Compare the Kesvaria visa rules with its drone rules.\n"
        "teams: [research, writing]\n"
        "inputs: {documents: [docs/*.md]}\n"
        "tracing: {enabled: false}\n",
        "utf-8",
    )
    run = atlas_cli("run", str(task), "--model", "scripted", "--quiet", "--state-dir", str(state))
    assert run.returncode == 0, run.stderr
    stats = json.loads(atlas_cli("memory", "stats", "--json", "--state-dir", str(state)).stdout)
    assert stats["graph"]["entities"] > 0 and stats["graph"]["findings"] == 2
    graph = atlas_cli("memory", "graph", "kesvaria", "--json", "--state-dir", str(state))
    assert graph.returncode == 0, graph.stdout + graph.stderr
    info = json.loads(graph.stdout)
    assert info["known"] and info["relations"]
    assert {m["team"] for m in info["mentioned_in"]} <= {"research", "writing"}
    assert all(m["run_id"] and m["source"].startswith(m["run_id"]) for m in info["mentioned_in"])


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["ingest", "/no/such/folder"], 2, "no such file or folder: /no/such/folder"),
        (["ingest", "{tmp}"], 2, "no text files"),
        (["search", "x"], 2, "no memory store at"),
        (["search", "x", "--k", "0"], 2, "--k must be between 1 and 50"),
        (["search", "   ", "--store", "{tmp}"], 2, "a query is empty"),
        (["stats", "--store", "{corrupt}"], 3, "cannot be opened (corrupt or not a Chroma store?)"),
        (["stats", "--store", "{tmp}", "--vector-url", "ftp://x"], 2, "http(s) URL"),
        (
            ["stats", "--store", "{tmp}", "--vector-url", "http://127.0.0.1:{port}"],
            3,
            "cannot reach the Chroma server at http://127.0.0.1:",
        ),
        (
            ["stats", "--store", "{tmp}", "--graph-uri", "bolt://neo4j:secret@127.0.0.1:{port}"],
            3,
            "cannot reach the Neo4j server at bolt://127.0.0.1:",
        ),
    ],
)
def test_bad_input_and_broken_stores_give_one_line(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    corrupt = tmp_path / "corrupt"
    (corrupt / "chroma").mkdir(parents=True)
    (corrupt / "chroma" / "chroma.sqlite3").write_text("not a database")
    empty = tmp_path / "empty"
    empty.mkdir()
    values = {"tmp": str(empty), "corrupt": str(corrupt), "port": str(free_port())}
    filled = [a.format(**values) for a in args]
    proc = atlas_cli("memory", *filled, "--state-dir", str(tmp_path / "state"))
    assert proc.returncode == code, proc.stderr
    line = _one_line_error(proc)
    assert message.format(**values) in line
    assert "secret" not in line  # credentials never reach messages


def test_chroma_server_backend(tmp_path: Path, chroma_server: str) -> None:
    store = ["--store", str(tmp_path / "mem"), "--vector-url", chroma_server]
    ingest = atlas_cli("memory", "ingest", str(HELDOUT / "docs"), *store)
    assert ingest.returncode == 0, ingest.stderr
    assert "into http://127.0.0.1:" in ingest.stdout
    search = atlas_cli("memory", "search", "how do I get my money back?", "--json", *store)
    hits = json.loads(search.stdout)[0]["results"]
    assert len(hits) == 5
    # The passages live on the server, not in the local directory.
    assert not (tmp_path / "mem" / "chroma").exists()
