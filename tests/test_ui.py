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


def test_trace_of_a_dry_run_shows_coordination_spans_and_the_verdict(
    make_spec: Callable[..., Any], state_dir: Path, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.fail(
            "Debian's chromium is not installed (scripts/test installs it when run as root)"
        )
    from playwright.sync_api import sync_playwright

    spec = make_spec(tracing={"enabled": True})
    result = atlas.run(spec, model="scripted", state_dir_path=state_dir)
    assert result.trace_id

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
                page.goto(url)
                page.get_by_text("atlas.task").first.wait_for(timeout=60_000)
                for name in ("plan", "dispatch", "team.research", "team.analysis", "team.writing"):
                    assert page.get_by_text(name, exact=True).first.is_visible(), name
                SCREENSHOTS.mkdir(exist_ok=True)
                page.screenshot(path=str(SCREENSHOTS / "mlflow-trace.png"))
                # the judge's span and its assessment (the traces table behind the drawer)
                assert page.get_by_text("judge", exact=True).count() >= 1
                assert page.get_by_text("judge_score", exact=True).count() >= 1
                assert page.get_by_text("0.90").count() >= 1
            finally:
                browser.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    assert (SCREENSHOTS / "mlflow-trace.png").stat().st_size > 10_000
    deadline = time.monotonic() + 15
    while _mlflow_servers_on(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _mlflow_servers_on(port), "the MLflow server outlived `atlas ui`"


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
