"""Built-in tools: documents are confined to the task, SQL is read-only and bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlas.errors import ToolError
from atlas.tools import Workspace, make_tools
from atlas.tools.data import DataSource
from atlas.tools.documents import DocumentIndex, chunk_text
from tests.conftest import EXAMPLES

DATA = sorted((EXAMPLES / "quickstart" / "data").glob("*.csv"))
DOCS = sorted((EXAMPLES / "quickstart" / "docs").glob("*.md"))


def test_search_finds_the_right_passage_with_its_source() -> None:
    index = DocumentIndex.from_paths(DOCS, EXAMPLES / "quickstart")
    hits = index.search("brake pads replaced in July", k=3)
    assert hits[0][0].source == "docs/maintenance_log.md#1"
    assert "37 bikes" in hits[0][0].text


def test_read_document_only_reads_indexed_sources(tmp_path: Path) -> None:
    index = DocumentIndex.from_paths(DOCS, EXAMPLES / "quickstart")
    ws = Workspace(index, DataSource([]), None)  # type: ignore[arg-type]
    (read,) = make_tools(["read_document"], ws)
    assert "Brake wear" in read.invoke({"source": "docs/maintenance_log.md"})
    for outside in ("../../pyproject.toml", "/etc/passwd", "docs/../../README.md"):
        answer = read.invoke({"source": outside})
        assert answer.startswith("error: unknown source")


def test_chunks_stay_near_the_size_limit() -> None:
    text = "\n\n".join(["word " * 50] * 10) + "\n\n" + "x" * 2000
    chunks = chunk_text(text, size=400)
    assert all(len(c) <= 400 for c in chunks)
    assert "".join(chunks).replace("\n", "").replace(" ", "").count("x") == 2000


def test_sql_answers_from_the_data() -> None:
    data = DataSource(DATA)
    assert "table trips_by_month (30 rows)" in data.describe()
    out = data.query(
        "SELECT station_id, SUM(trips) AS t FROM trips_by_month GROUP BY 1 ORDER BY t DESC LIMIT 1"
    )
    assert out.splitlines()[1].startswith("S1 |")


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE stations",
        "INSERT INTO stations VALUES ('x','y',1,'z')",
        "SELECT 1; SELECT 2",
        "COPY stations TO '/tmp/leak.csv'",
        "ATTACH '/tmp/x.db'",
        "SET enable_external_access=true",
        "INSTALL httpfs",
    ],
)
def test_sql_refuses_anything_but_one_select(sql: str) -> None:
    with pytest.raises(ToolError):
        DataSource(DATA).query(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv_auto('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM 'http://127.0.0.1:9/x.csv'",
    ],
)
def test_sql_cannot_read_files_or_network(sql: str) -> None:
    with pytest.raises(ToolError):
        DataSource(DATA).query(sql)


def test_runaway_query_is_stopped() -> None:
    data = DataSource(DATA, timeout_s=0.5)
    with pytest.raises(ToolError, match="longer than"):
        data.query("SELECT COUNT(*) FROM range(100000000000) a, range(1000) b")


def test_tool_errors_go_back_to_the_model_as_text() -> None:
    ws = Workspace(DocumentIndex(), DataSource(DATA), None)  # type: ignore[arg-type]
    (query,) = make_tools(["query_data"], ws)
    assert query.invoke({"sql": "DELETE FROM stations"}).startswith("error: only read-only")
