"""The MLflow UI that `python -m atlas ui` serves, seen through a real browser (Debian chromium)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import atlas
from tests.conftest import free_port

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]

pytestmark = pytest.mark.e2e


def test_a_replanning_run_shows_its_iterations_verdicts_and_tool_calls(
    make_spec: Callable[..., Any], state_dir: Path, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.fail(
            "Debian's chromium is not installed (scripts/test installs it when run as root)"
        )
    from playwright.sync_api import sync_playwright

    # A replanning dry run: iteration 1's verdict fails, iteration 2's passes.
    spec = make_spec(tracing={"enabled": True}, budget={"max_iterations": 2})
    result = atlas.run(spec, model="scripted?fail_iterations=1", state_dir_path=state_dir)
    assert result.trace_id and result.iterations == 2 and result.status == "passed"

    port = free_port()
    log_path = tmp_path / "ui.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        ui = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "atlas",
                "ui",
                "--state-dir",
                str(state_dir),
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 180
        url = None
        while url is None:
            assert ui.poll() is None, log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, "atlas ui printed no trace URL"
            found = re.search(r"latest run \S+: (\S+)", log_path.read_text())
            url = found.group(1) if found else None
            time.sleep(0.3)
        assert url.startswith(f"http://127.0.0.1:{port}/") and result.trace_id in url

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1200})
                _trace_page_shows_both_verdicts(page, url)
                _overview_counts_the_tool_calls(page, url.split("/traces")[0])
            finally:
                browser.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    for shot in ("mlflow-trace.png", "mlflow-tool-calls.png"):
        assert (SCREENSHOTS / shot).stat().st_size > 10_000, shot
    deadline = time.monotonic() + 15
    while _mlflow_servers_on(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _mlflow_servers_on(port), "the MLflow server outlived `atlas ui`"


def _trace_page_shows_both_verdicts(page: Any, url: str) -> None:
    """The trace drawer: iterations, team spans named by step, and each iteration's verdict in
    the assessments pane of its judge span."""
    page.goto(url)
    page.get_by_text("iteration 2", exact=True).first.wait_for(timeout=60_000)
    # The drawer is marked aria-hidden while MLflow's assistant panel is open, so it is found
    # by its component id rather than by role.
    drawer = page.locator('[data-component-id="mlflow.evaluations_review.modal"]')
    for name in (
        "atlas.task",
        "iteration 1",
        "plan",
        "dispatch",
        "team.research · 1.research",
        "team.analysis · 2.analysis",
        "team.writing · 2.writing",
    ):
        assert drawer.get_by_text(name, exact=True).first.is_visible(), name
    judges = drawer.get_by_text("judge", exact=True)  # per iteration: ATLAS's span, the model's
    assert judges.count() == 4
    drawer.locator("button", has_text="Assess").first.click()
    for span, verdict, score in ((0, "False", "0.4"), (2, "True", "0.9")):
        judges.nth(span).click()
        drawer.get_by_text("Feedback (4)").first.wait_for(timeout=15_000)
        page.wait_for_timeout(500)
        text = drawer.inner_text()
        feedback = text[text.rindex("Feedback (4)") :]
        assert f"judge\n{verdict}" in feedback, feedback[:400]
        assert f"judge_score\n{score}" in feedback, feedback[:400]
        assert f"criterion.cites_notes\n{verdict}" in feedback, feedback[:400]
        if span == 0:
            assert "Add more detail and cite sources" in text  # the feedback the planner got
            SCREENSHOTS.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "mlflow-trace.png"))


def _overview_counts_the_tool_calls(page: Any, experiment_url: str) -> None:
    """The experiment's Dashboard > Tool calls tab reads the spans from the tracking store
    (MLflow 3.18 moved it from the Overview, now a getting-started page, to the Dashboard)."""
    page.goto(f"{experiment_url}/dashboard/usage?workflowType=genai")
    tab = page.get_by_text("Tool calls", exact=True).first
    tab.wait_for(timeout=60_000)
    page.wait_for_timeout(1_000)
    got_it = page.get_by_text("Got it", exact=True)  # the "Detect Issues" tip covers the tabs
    if got_it.count():
        got_it.first.click(timeout=10_000)
    tab.click(timeout=10_000)
    total = page.get_by_text("Total Tool Calls", exact=True).first
    total.wait_for(timeout=60_000)
    page.get_by_text("query_data", exact=True).first.wait_for(timeout=30_000)
    text = page.inner_text("body")
    count = re.search(r"(\d+)\s*\nTotal Tool Calls", text)
    assert count and int(count.group(1)) > 0, text[text.find("Tool calls") :][:600]
    page.screenshot(path=str(SCREENSHOTS / "mlflow-tool-calls.png"))


def _mlflow_servers_on(port: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mlflow" in args and b"server" in args and str(port).encode() in args:
                found.append(int(entry.name))
    return found


def test_ui_binds_loopback_by_default() -> None:
    from atlas.cli import _parser

    args = _parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"
