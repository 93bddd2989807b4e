"""The benchmark harness itself: the workload each side runs is the one the README describes.

The peers (langgraph-supervisor, CrewAI) live in their own environment that `scripts/bench`
installs from PyPI, so they are not run here; ATLAS's side and the hand-written LangGraph
baseline are.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import workloads
from benchmarks.run import markdown


def test_atlas_and_the_handwritten_graph_run_the_same_fanout_workload() -> None:
    from benchmarks.handwritten import measure

    atlas = workloads.fanout(False, 0, 1)
    assert atlas["steps_done"] == 9 and atlas["model_calls"] == 20
    # plan, research and analysis in one wave, writing in a second, verdict
    assert atlas["critical_path_calls"] == 6
    baseline = measure(0, 1)
    assert baseline["steps_done"] == 9 and baseline["model_calls"] == atlas["model_calls"]


def test_results_table_shows_every_goal_with_its_measured_value() -> None:
    results = json.loads((Path(__file__).parents[1] / "benchmarks" / "results.json").read_text())
    table = markdown(results)
    for row in (
        "`python -m atlas --help`",
        "fan-out parallel efficiency",
        "ATLAS / langgraph-supervisor",
        "ATLAS / CrewAI hierarchical",
        "prompt tokens, ATLAS / langgraph-supervisor",
        "overhead per model call",
        "traced / untraced wall time",
        "50 fan-out tasks at once",
        "memory recall@5",
    ):
        assert row in table, row
    assert "| crewai-hierarchical 1.15.30 |" in table  # the peers' versions are named
