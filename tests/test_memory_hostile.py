"""Memory under hostile use: a document too large to embed within the run's time, Ctrl-C during
`atlas memory ingest`, and reading commands on state they must not change."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from atlas.memory.entities import Entities
from atlas.memory.store import Memory, finding_records
from tests.conftest import ROOT, atlas_cli

WORDS = (
    "harbour ferry schedule fare route pier ticket council budget river bridge station "
    "timetable winter summer cargo pilot quay tide lantern"
).split()


def _big_document(path: Path, chunks: int) -> Path:
    """`chunks` paragraphs of about 850 characters: one chunk each, as the chunker cuts them.

    Embedding runs at about 33 chunks/s on 2 cores (README), so 1500 chunks take some 45 s,
    far past the budgets below, and much longer on a loaded machine."""
    rng = random.Random(7)
    paragraphs = [
        f"Section {i}. " + " ".join(rng.choice(WORDS) for _ in range(140))[:830]
        for i in range(chunks)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(paragraphs), "utf-8")
    return path


def _documents(state: Path) -> int:
    stats = atlas_cli("memory", "stats", "--json", "--state-dir", str(state))
    assert stats.returncode == 0, stats.stderr
    return int(json.loads(stats.stdout)["vector"]["documents"])


STOPPED = re.compile(r"memory ingest stopped after (\d+) of (\d+) chunks \(timeout\)")


# -- ingest bounded in time --------------------------------------------------------------------
def test_run_with_a_huge_document_keeps_its_time_budget_and_later_runs_continue(
    tmp_path: Path,
) -> None:
    _big_document(tmp_path / "docs" / "ferries.md", 1500)
    task = tmp_path / "task.yaml"
    task.write_text(
        "task: Summarise the ferry notes.\n"
        "teams: [research, writing]\n"
        "inputs: {documents: [docs/*.md]}\n"
        "tracing: {enabled: false}\n"
        "budget: {timeout_s: 6, max_iterations: 1}\n",
        "utf-8",
    )
    state = tmp_path / "state"

    def run() -> tuple[dict[str, Any], int, int]:
        began = time.monotonic()
        proc = atlas_cli(
            "run", str(task), "--model", "scripted", "--json", "--state-dir", str(state)
        )
        took = time.monotonic() - began
        assert proc.returncode in (0, 1), proc.stderr
        assert "Traceback" not in proc.stderr
        result = json.loads(proc.stdout)
        # The run's own time stays near its 6 s limit (start-up comes on top), and it is not
        # all spent on ingest: the teams made their model calls.
        assert result["wall_s"] < 9, result
        assert took < 40, f"the run took {took:.0f} s"
        assert result["model_calls"] > 0, result
        found = STOPPED.search(" ".join(proc.stderr.split()))
        assert found, f"no warning that the ingest stopped: {proc.stderr}"
        assert "later runs or `atlas memory ingest`" in " ".join(proc.stderr.split())
        return result, int(found.group(1)), int(found.group(2))

    _, done_first, total = run()
    stored_first = _documents(state)
    assert total == 1500
    assert 0 < stored_first == done_first < total

    _, done_second, _ = run()
    stored_second = _documents(state)
    # The second run skipped what the first wrote (counted as done without embedding it
    # again) and went on: more is stored, and nothing twice.
    assert stored_second > stored_first
    assert done_second == stored_second < total


def test_ingest_stops_at_its_deadline_with_progress_and_resumes(tmp_path: Path) -> None:
    doc = _big_document(tmp_path / "big.md", 600)
    memory = Memory(tmp_path / "memory")
    events: list[dict[str, Any]] = []
    try:
        # Open the store and load the embedder first, so the deadline measures ingest alone.
        memory.open()
        memory.vector.embedder.embed(["warm up"])
        began = time.monotonic()
        first = memory.ingest([doc], tmp_path, deadline=began + 2.5, on_progress=events.append)
        took = time.monotonic() - began
        assert first["stopped"] == "timeout"
        assert first["chunks"] == 600 and first["written"] > 0 and first["skipped"] > 0
        assert first["written"] + first["unchanged"] + first["skipped"] == 600
        assert took < 2.5 + 2.0, f"ingest ran {took:.1f} s past a 2.5 s deadline"
        assert memory.vector.count("document") == first["written"]
        # Progress: about once a second, counting up to what was done, out of every chunk.
        assert events and all(e["event"] == "memory_ingest" for e in events)
        assert {e["total"] for e in events} == {600} and {e["files"] for e in events} == {1}
        assert [e["done"] for e in events] == sorted(e["done"] for e in events)
        assert events[-1]["done"] == first["written"]
        assert len(events) <= took + 2

        second = memory.ingest([doc], tmp_path, deadline=time.monotonic() + 1.5)
        assert second["unchanged"] == first["written"], "stored chunks were embedded again"
        assert second["written"] > 0
        assert memory.vector.count("document") == first["written"] + second["written"]
    finally:
        memory.close()


def test_memory_ingest_shows_progress_and_ctrl_c_keeps_what_was_written(tmp_path: Path) -> None:
    doc = _big_document(tmp_path / "big.md", 1500)
    store = tmp_path / "mem"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "atlas", "memory", "ingest", str(doc), "--store", str(store)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        shown = proc.stderr.readline()  # the first update, about a second into embedding
        assert re.fullmatch(r"memory: ingesting \d+/1500 chunks\n", shown), shown
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if not line.startswith("memory: ingesting")]
    assert len(lines) == 1 and "Traceback" not in err, err
    found = re.fullmatch(
        r"atlas: interrupted after (\d+)/1500 chunks; what was written is kept.*", lines[0]
    )
    assert found, lines[0]
    stats = atlas_cli("memory", "stats", "--json", "--store", str(store))
    kept = json.loads(stats.stdout)["vector"]["documents"]
    assert kept == int(found.group(1)) > 0


# -- reading commands change nothing -----------------------------------------------------------
def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


READS = (
    ["stats", "--json"],
    ["search", "ferry", "--json"],
    ["graph", "ACME Corp", "--json"],
    ["graph", "ACME Corp", "--to", "Oslo"],
)


def test_reading_commands_create_nothing(tmp_path: Path) -> None:
    """An empty memory directory reads as empty and stays empty."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in READS:
        proc = atlas_cli("memory", *args, "--store", str(empty))
        assert proc.returncode in (0, 1), proc.stderr
        assert "Traceback" not in proc.stderr
    assert list(empty.iterdir()) == [], "a reading command created files"
    stats = atlas_cli("memory", "stats", "--json", "--store", str(empty))
    assert json.loads(stats.stdout)["vector"]["passages"] == 0


def _filled_store(directory: Path) -> Path:
    memory = Memory(directory)
    try:
        doc = directory.parent / "notes.md"
        doc.write_text("ACME Corp runs the night ferry from Oslo.", "utf-8")
        memory.ingest([doc], directory.parent)
        record = finding_records(
            run_id="r1", step_id="1.research", team="research", iteration=1, text="ACME and Oslo"
        )[0]
        memory.remember([record])
        memory.remember_entities(
            Entities.model_validate(
                {
                    "entities": [{"name": "ACME Corp", "type": "org"}, {"name": "Oslo"}],
                    "relations": [
                        {"source": "ACME Corp", "relation": "sails from", "target": "Oslo"}
                    ],
                }
            ),
            record,
        )
    finally:
        memory.close()
    return directory


def test_graph_command_leaves_the_graph_file_untouched(tmp_path: Path) -> None:
    store = _filled_store(tmp_path / "mem")
    graph = store / "graph.lbdb"
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in store.iterdir()}
    time.sleep(0.05)
    proc = atlas_cli("memory", "graph", "ACME Corp", "--json", "--store", str(store))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["relations"][0]["other"] == "Oslo"
    after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in store.iterdir()}
    assert after == before, "the graph command wrote to the store"
    assert graph.is_file()


def _as_nobody() -> list[str] | None:
    """A Python that user 65534 can run with this checkout's packages, or None."""
    if os.geteuid() != 0:
        return None
    import sysconfig

    site = sysconfig.get_paths()["purelib"]
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for python in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if not Path(python).is_file():
            continue
        try:
            probe = subprocess.run(
                [python, "-c", "import chromadb, ladybug, atlas"],
                env={"PYTHONPATH": f"{ROOT}:{site}", "HOME": "/tmp", "PATH": os.environ["PATH"]},
                cwd="/",
                preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)),
                capture_output=True,
                check=False,
            )
        except OSError:  # not executable by that user
            continue
        if probe.returncode == 0:
            return [python]
    return None


def test_reading_commands_on_a_store_the_user_cannot_write() -> None:
    """As a user without write access (root ignores permission bits): the graph reads, and the
    vector store, which Chroma cannot open without writing, fails with one clear line."""
    python = _as_nobody()
    if python is None:
        pytest.skip("needs root and a Python that user 65534 can run")
    import sysconfig

    # pytest's tmp_path is under a folder only root may enter: use one anybody may.
    shared = Path(tempfile.mkdtemp(prefix="atlas-readonly-"))
    os.chmod(shared, 0o755)
    store = _filled_store(shared / "mem")
    for path in [store, *store.rglob("*")]:
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
    before = _snapshot(store)
    env = {
        "PYTHONPATH": f"{ROOT}:{sysconfig.get_paths()['purelib']}",
        "HOME": "/tmp",
        "PATH": os.environ["PATH"],
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*python, "-m", "atlas", "memory", *args, "--store", str(store)],
            env=env,
            cwd="/",
            preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    try:
        graph = cli("graph", "ACME Corp", "--json")
        assert graph.returncode == 0, graph.stderr
        assert json.loads(graph.stdout)["relations"][0]["other"] == "Oslo"
        for args in (["stats"], ["search", "ferry"]):
            proc = cli(*args)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 3 and len(lines) == 1, proc.stderr
            assert "is read-only" in lines[0] and "PermissionError" not in lines[0], lines[0]
        assert _snapshot(store) == before
    finally:
        for path in [store, *store.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        shutil.rmtree(shared)
