"""Human approval: a run pauses for its plan or a side-effecting tool call, a person decides, and
the run goes on without repeating anything done before the pause.

The side effect is real: the example's `send_email` appends to an outbox file, counted here.
Model calls are counted with the scripted model's call log and compared with the same task run
under `--approve-all`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLES, ROOT, atlas_cli

APPROVED_EXIT = 4


def _example(tmp_path: Path, **changes: Any) -> Path:
    """The approvals example copied to tmp_path, with `changes` merged into its task.yaml."""
    import yaml

    folder = tmp_path / "approvals"
    shutil.copytree(EXAMPLES / "approvals", folder)
    task = folder / "task.yaml"
    data = yaml.safe_load(task.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    task.write_text(yaml.safe_dump(data))
    return task


def _sent(outbox: Path) -> list[dict[str, Any]]:
    if not outbox.exists():
        return []
    return [json.loads(line) for line in outbox.read_text().splitlines() if line.strip()]


def _calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _cli(tmp_path: Path, *args: str, name: str = "outbox") -> subprocess.CompletedProcess[str]:
    env = {"OUTBOX_FILE": str(tmp_path / f"{name}.jsonl"), "ATLAS_USER": "tester"}
    return atlas_cli(*args, "--state-dir", str(tmp_path / f"state-{name}"), env=env)


def _pending(tmp_path: Path, run_id: str, name: str = "outbox") -> list[dict[str, Any]]:
    out = _cli(tmp_path, "approvals", run_id, "--json", name=name)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def _run_id(out: subprocess.CompletedProcess[str]) -> str:
    return str(json.loads(out.stdout.strip().splitlines()[-1])["run_id"])


def test_plan_then_tool_approval_without_a_terminal_side_effect_once(tmp_path: Path) -> None:
    """The whole flow with no TTY: the run exits paused on its plan, `approve` moves it on to
    the tool call, a second `approve` finishes it. The email went out once, and the model was
    called exactly as often as in the same run under --approve-all."""
    task = _example(tmp_path)
    model = f"scripted?call_log={tmp_path / 'calls.log'}"
    first = _cli(tmp_path, "run", str(task), "--model", model, "--json")
    assert first.returncode == APPROVED_EXIT, first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    run_id = summary["run_id"]
    assert summary["status"] == "awaiting_approval"
    assert [p["kind"] for p in summary["pending"]] == ["plan"]
    assert f"atlas approve {run_id}" in first.stderr
    assert [p["kind"] for p in _pending(tmp_path, run_id)] == ["plan"]
    listed = _cli(tmp_path, "runs")
    assert "awaiting_approval" in listed.stdout

    second = _cli(tmp_path, "approve", run_id, "--json")
    assert second.returncode == APPROVED_EXIT, second.stderr
    waiting = json.loads(second.stdout.strip().splitlines()[-1])["pending"]
    assert [(p["kind"], p["tool"]) for p in waiting] == [("tool", "send_email")]
    assert set(waiting[0]["args"]) == {"to", "subject", "body"}
    assert _sent(tmp_path / "outbox.jsonl") == []  # not before its approval

    third = _cli(tmp_path, "approve", run_id, "--json")
    assert third.returncode == 0, third.stderr
    done = json.loads(third.stdout.strip().splitlines()[-1])
    assert done["status"] == "passed"
    assert done["approvals"] == 2
    assert len(_sent(tmp_path / "outbox.jsonl")) == 1
    assert _pending(tmp_path, run_id) == []

    auto_log = tmp_path / "auto-calls.log"
    auto = _cli(
        tmp_path,
        "run",
        str(task),
        "--model",
        f"scripted?call_log={auto_log}",
        "--approve-all",
        "--json",
        name="auto",
    )
    assert auto.returncode == 0, auto.stderr
    assert len(_sent(tmp_path / "auto.jsonl")) == 1
    assert _calls(tmp_path / "calls.log") == _calls(auto_log) > 0


def test_rejected_tool_call_goes_back_to_the_model_and_the_trace_has_the_reason(
    tmp_path: Path,
) -> None:
    """A rejected email is never sent; the worker hears the refusal with its reason, the run
    finishes, and the trace holds the decision as HUMAN feedback with who and why."""
    import mlflow

    task = _example(tmp_path, approval={"plan": False})
    first = _cli(tmp_path, "run", str(task), "--model", "scripted", "--json")
    assert first.returncode == APPROVED_EXIT, first.stderr
    run_id = _run_id(first)
    reason = "the supplier address is wrong"
    out = _cli(tmp_path, "approve", run_id, "--reject", "--reason", reason, "--by", "dana")
    assert out.returncode in (0, 1), out.stderr
    assert _sent(tmp_path / "outbox.jsonl") == []
    plan = json.loads((tmp_path / "state-outbox" / "runs" / run_id / "plan.json").read_text())
    assert plan and plan[0]["steps"]

    db = tmp_path / "state-outbox" / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("atlas")
    assert experiment is not None
    traces = client.search_traces(locations=[experiment.experiment_id])
    found = [a for t in traces for a in t.info.assessments if a.name.startswith("approval.")]
    assert len(found) == 1, [a.name for t in traces for a in t.info.assessments]
    (decision,) = found
    assert decision.name == "approval.tool.send_email"
    assert decision.feedback.value is False
    assert decision.rationale == reason
    assert decision.source.source_type == "HUMAN" and decision.source.source_id == "dana"
    assert decision.metadata["action"] == "reject"
    # The refusal reached the model: the worker's report (from what its tools answered) has it.
    spans = [s for t in traces for s in client.get_trace(t.info.trace_id).data.spans]
    assert any(
        s.name == "approval:tool" and s.attributes.get("atlas.approval.reason") == reason
        for s in spans
    )
    workers = [s for s in spans if s.name == "worker:buyer"]
    assert any("refused" in json.dumps(s.outputs) for s in workers), [s.outputs for s in workers]


def test_bad_decisions_are_one_line_and_cost_no_model_call(tmp_path: Path) -> None:
    task = _example(tmp_path)
    log = tmp_path / "calls.log"
    first = _cli(tmp_path, "run", str(task), "--model", f"scripted?call_log={log}", "--json")
    assert first.returncode == APPROVED_EXIT, first.stderr
    run_id = _run_id(first)
    calls = _calls(log)
    bad_edit = tmp_path / "edit.yaml"
    bad_edit.write_text("just: a mapping\n")
    cases = [
        (["--reject"], "--reason"),
        (["--id", "plan-9"], "no approval 'plan-9' waiting"),
        (["--edit", str(bad_edit)], "a plan's edit is a list of steps"),
        (["--edit", str(tmp_path / "missing.yaml")], "--edit"),
    ]
    for extra, expected in cases:
        out = _cli(tmp_path, "approve", run_id, *extra)
        assert out.returncode == 2, (extra, out.stderr)
        assert expected in out.stderr, (extra, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr
    assert _calls(log) == calls
    assert [p["kind"] for p in _pending(tmp_path, run_id)] == ["plan"]
    other = _cli(tmp_path, "approve", "nope-not-a-run")
    assert other.returncode == 2 and "Traceback" not in other.stderr


def test_an_edited_tool_call_runs_with_the_edited_arguments(tmp_path: Path) -> None:
    task = _example(tmp_path, approval={"plan": False})
    first = _cli(tmp_path, "run", str(task), "--model", "scripted", "--json")
    run_id = _run_id(first)
    edit = tmp_path / "email.yaml"
    edit.write_text(
        "to: orders@beans-and-oats.example\nsubject: Order\nbody: 12 kg beans, 40 l oat milk\n"
    )
    out = _cli(tmp_path, "approve", run_id, "--edit", str(edit), "--json")
    assert out.returncode in (0, 1), out.stderr
    (sent,) = _sent(tmp_path / "outbox.jsonl")
    assert sent["to"] == "orders@beans-and-oats.example"
    assert sent["body"] == "12 kg beans, 40 l oat milk"


def test_rejected_plan_goes_back_to_the_planner_with_the_reason(tmp_path: Path) -> None:
    from atlas.approvals import approve, pending
    from atlas.runner import run
    from atlas.spec import load_task

    task = _example(tmp_path)
    os.environ["OUTBOX_FILE"] = str(tmp_path / "outbox.jsonl")
    try:
        state = tmp_path / "state"
        events: list[dict[str, Any]] = []
        first = run(load_task(task), model="scripted", state_dir_path=state)
        assert first.status == "awaiting_approval"
        (plan,) = pending(first.run_id, state_dir_path=state)
        again = approve(
            first.run_id,
            reject=True,
            reason="order the oat milk first, on its own",
            state_dir_path=state,
            on_event=events.append,
            by="erin",
        )
        assert again.status == "awaiting_approval"
        (replanned,) = pending(first.run_id, state_dir_path=state)
        assert replanned.kind == "plan" and replanned.id != plan.id
        assert replanned.item["iteration"] == 1  # a rejection is not an iteration
        kinds = [e["type"] for e in events]
        assert kinds.index("approval") < kinds.index("plan")
        assert again.model_calls == first.model_calls + 1  # the planner, once more
        assert _sent(tmp_path / "outbox.jsonl") == []
    finally:
        os.environ.pop("OUTBOX_FILE", None)


def test_two_parallel_tool_calls_wait_at_once_and_are_decided_one_at_a_time(
    tmp_path: Path,
) -> None:
    """Two steps run in parallel and each wants to send an email: both wait at once. Deciding
    one resumes that branch only; the other goes on waiting, and nothing else is redone."""
    task = _example(tmp_path, approval={"plan": False})
    log = tmp_path / "calls.log"
    model = f"scripted?fanout=2&call_log={log}"
    first = _cli(tmp_path, "run", str(task), "--model", model, "--json")
    assert first.returncode == APPROVED_EXIT, first.stderr
    run_id = _run_id(first)
    waiting = _pending(tmp_path, run_id)
    assert sorted(p["step"] for p in waiting) == ["1.orders_1", "1.orders_2"]
    assert len({p["interrupt_id"] for p in waiting}) == 2

    one = _cli(tmp_path, "approve", run_id, "--id", waiting[0]["id"], "--json")
    assert one.returncode == APPROVED_EXIT, one.stderr
    left = _pending(tmp_path, run_id)
    assert [p["id"] for p in left] == [waiting[1]["id"]]
    assert len(_sent(tmp_path / "outbox.jsonl")) == 1

    two = _cli(tmp_path, "approve", run_id, "--json")
    assert two.returncode in (0, 1), two.stderr
    assert json.loads(two.stdout.strip().splitlines()[-1])["approvals"] == 2
    assert len(_sent(tmp_path / "outbox.jsonl")) == 2

    auto_log = tmp_path / "auto.log"
    auto = _cli(
        tmp_path,
        "run",
        str(task),
        "--model",
        f"scripted?fanout=2&call_log={auto_log}",
        "--approve-all",
        name="auto",
    )
    assert auto.returncode in (0, 1), auto.stderr
    assert _calls(log) == _calls(auto_log)


def test_waiting_is_not_counted_against_the_time_limit(tmp_path: Path) -> None:
    task = _example(tmp_path, approval={"plan": True}, budget={"timeout_s": 3})
    first = _cli(tmp_path, "run", str(task), "--model", "scripted", "--json")
    run_id = _run_id(first)
    time.sleep(3.5)
    _cli(tmp_path, "approve", run_id)
    done = _cli(tmp_path, "approve", run_id, "--json")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "passed", summary
    assert summary["approval_wait_s"] >= 3.5


# -- on a terminal -------------------------------------------------------------------------------


def _spawn_on_tty(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    import pty

    main, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env.update(OUTBOX_FILE=str(tmp_path / "outbox.jsonl"), ATLAS_USER="tty-user", COLUMNS="200")
    proc = subprocess.Popen(
        [sys.executable, "-m", "atlas", *args, "--state-dir", str(tmp_path / "state-outbox")],
        stdin=child,
        stdout=child,
        stderr=child,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    os.close(child)
    return proc, main


def _read_until(fd: int, wanted: str, seen: list[str], timeout: float = 120) -> None:
    import select

    end = time.monotonic() + timeout
    while wanted not in "".join(seen):
        left = end - time.monotonic()
        assert left > 0, f"no {wanted!r} in:\n{''.join(seen)[-3000:]}"
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            try:
                seen.append(os.read(fd, 4096).decode(errors="replace"))
            except OSError:
                break
    assert wanted in "".join(seen), "".join(seen)[-3000:]


def test_on_a_terminal_the_run_asks_inline_and_goes_on(tmp_path: Path) -> None:
    task = _example(tmp_path)
    proc, fd = _spawn_on_tty(tmp_path, "run", str(task), "--model", "scripted", "--quiet")
    seen: list[str] = []
    try:
        _read_until(fd, "approve, edit or reject?", seen)
        assert "plan of iteration 1" in "".join(seen)
        os.write(fd, b"a\n")
        _read_until(fd, "tool send_email", seen)
        _read_until(fd, "approve, edit or reject?", seen)
        os.write(fd, b"a\n")
        assert proc.wait(timeout=120) == 0, "".join(seen)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(fd)
    assert len(_sent(tmp_path / "outbox.jsonl")) == 1


def test_sigkill_while_paused_at_the_prompt_then_approve(tmp_path: Path) -> None:
    """Killed while it waits at the terminal's prompt: the run is on record as waiting, and
    `approve` finishes it with the email sent once and no model call repeated."""
    task = _example(tmp_path)
    log = tmp_path / "calls.log"
    model = f"scripted?call_log={log}"
    proc, fd = _spawn_on_tty(tmp_path, "run", str(task), "--model", model, "--quiet")
    seen: list[str] = []
    try:
        _read_until(fd, "approve, edit or reject?", seen)
        os.write(fd, b"a\n")
        _read_until(fd, "tool send_email", seen)
        _read_until(fd, "approve, edit or reject?", seen)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(fd)
    runs = _cli(tmp_path, "runs", "--json")
    (record,) = json.loads(runs.stdout)
    assert record["status"] == "awaiting_approval"
    waiting = _pending(tmp_path, record["run_id"])
    assert [p["kind"] for p in waiting] == ["tool"]
    assert _sent(tmp_path / "outbox.jsonl") == []
    done = _cli(tmp_path, "approve", record["run_id"], "--json")
    assert done.returncode == 0, done.stderr
    assert len(_sent(tmp_path / "outbox.jsonl")) == 1

    auto_log = tmp_path / "auto.log"
    auto = _cli(
        tmp_path,
        "run",
        str(task),
        "--model",
        f"scripted?call_log={auto_log}",
        "--approve-all",
        name="auto",
    )
    assert auto.returncode == 0, auto.stderr
    assert _calls(log) == _calls(auto_log)


# -- embedding -----------------------------------------------------------------------------------


def test_embedded_graph_pauses_as_an_interrupt_and_resumes_by_interrupt_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    from atlas.graph import build_graph
    from atlas.spec import load_task

    monkeypatch.setenv("OUTBOX_FILE", str(tmp_path / "outbox.jsonl"))
    spec = load_task(_example(tmp_path))
    app = build_graph(
        spec, model="scripted", state_dir=str(tmp_path / "state"), checkpointer=InMemorySaver()
    )
    config: Any = {"configurable": {"thread_id": "orders-1"}}
    first = app.invoke({"task": spec.task}, config)
    (plan,) = first["__interrupt__"]
    assert plan.value["type"] == "atlas.approval"
    assert plan.value["items"][0]["kind"] == "plan"
    second = app.invoke(Command(resume={plan.id: "approve"}), config)
    (tool,) = second["__interrupt__"]
    assert tool.value["items"][0]["tool"] == "send_email"
    assert _sent(tmp_path / "outbox.jsonl") == []
    third = app.invoke(Command(resume={tool.id: {"action": "approve", "by": "app-user"}}), config)
    assert "__interrupt__" not in third
    assert third["status"] == "passed"
    assert len(_sent(tmp_path / "outbox.jsonl")) == 1


# -- the policy ----------------------------------------------------------------------------------


def test_a_bad_approval_block_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    task = _example(tmp_path, approval={"plan": True, "tools": {"send_email": "sometimes"}})
    out = atlas_cli("run", str(task), "--model", "scripted", "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 2, out.stderr
    assert "approval.tools" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "s" / "runs").exists() or not any((tmp_path / "s" / "runs").iterdir())


def test_which_tools_wait_for_a_person() -> None:
    """An exact name beats a glob, a longer glob a shorter one; a tool that declares side
    effects waits unless the task says `never`; MCP tools match as mcp.<server>.<tool>."""
    from types import SimpleNamespace

    from langchain_core.tools import StructuredTool

    from atlas.graph.approval import needs_approval
    from atlas.spec import Approval

    def tool(name: str, **meta: Any) -> StructuredTool:
        return StructuredTool.from_function(
            func=lambda: "", name=name, description="x", metadata=meta
        )

    def waits(policy: dict[str, Any], t: StructuredTool) -> bool:
        ctx: Any = SimpleNamespace(spec=SimpleNamespace(approval=Approval(**policy)))
        return needs_approval(ctx, t)

    mail = tool("send_email", **{"atlas.tool.side_effects": True})
    plain = tool("lookup")
    crm = tool(
        "create_ticket",
        **{"atlas.tool.kind": "mcp", "atlas.mcp.server": "crm", "atlas.mcp.tool": "create_ticket"},
    )
    assert waits({}, mail) and not waits({}, plain) and not waits({}, crm)
    assert not waits({"tools": {"send_email": "never"}}, mail)
    assert waits({"tools": {"lookup": "always"}}, plain)
    assert waits({"tools": {"mcp.crm.*": "always"}}, crm)
    assert not waits({"tools": {"mcp.*": "always", "mcp.crm.*": "never"}}, crm)
    assert waits({"tools": {"mcp.crm.*": "never", "mcp.crm.create_ticket": "always"}}, crm)


def test_an_mcp_tool_that_declares_itself_destructive_waits_by_default() -> None:
    from mcp import types

    from atlas.tools.mcp import _tool_info

    def info(annotations: types.ToolAnnotations | None) -> Any:
        return _tool_info(
            "crm", types.Tool(name="t", inputSchema={"type": "object"}, annotations=annotations)
        )

    assert info(types.ToolAnnotations(destructiveHint=True)).declared_destructive
    assert not info(types.ToolAnnotations(destructiveHint=False)).declared_destructive
    assert not info(types.ToolAnnotations(readOnlyHint=True)).declared_destructive
    assert not info(None).declared_destructive  # unannotated: not declared, not asked about


def test_a_worker_of_a_supervised_team_waits_and_goes_back_to_its_supervisor(
    make_spec: Any, tmp_path: Path
) -> None:
    """A team with a supervisor (writing: drafter and editor) whose drafts need approval: each
    `save_draft` waits, and after every decision the worker goes on and reports to its
    supervisor. The run ends as it does with everything approved up front, with as many calls."""
    from atlas.approvals import approve, pending
    from atlas.runner import run

    spec = make_spec(approval={"tools": {"save_draft": "always"}}, memory={"enabled": False})
    state = tmp_path / "state"
    result = run(spec, model="scripted", state_dir_path=state)
    rounds = 0
    while result.status == "awaiting_approval":
        waiting = pending(result.run_id, state_dir_path=state)
        assert waiting and all(p.item["tool"] == "save_draft" for p in waiting)
        result = approve(result.run_id, state_dir_path=state, by="qa")
        rounds += 1
    assert rounds >= 1
    auto = run(
        make_spec(approval={"tools": {"save_draft": "always"}}, memory={"enabled": False}),
        model="scripted",
        state_dir_path=tmp_path / "auto",
        approve_all=True,
    )
    assert result.status == auto.status == "passed"
    assert result.model_calls == auto.model_calls
    assert result.approvals == auto.approvals >= rounds
