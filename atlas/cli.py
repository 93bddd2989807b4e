"""`python -m atlas`: run, resume, runs, trace, validate, schema, ui, memory.

Imports are lazy so `--help` is fast. Exit codes: 0 passed, 1 finished without passing (or a
budget stop; the output is still written), 2 bad input, 3 runtime failure, 130 interrupted.
Errors are one line on stderr, never a traceback (set ATLAS_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from typing import Any

EXIT_PASSED, EXIT_NOT_PASSED, EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_AWAITING_APPROVAL = 4
"""The run paused: a plan or a tool call waits for a person (`atlas approve RUN_ID`)."""
EXIT_TERMINATED = 143


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        self.exit(EXIT_BAD_INPUT, f"atlas: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m atlas",
        description="ATLAS: a planner, parallel teams and a judge on LangGraph, traced in MLflow.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def state(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--state-dir", metavar="DIR", help="runs, checkpoints and traces (default ./.atlas)"
        )
        p.add_argument(
            "--state-url",
            metavar="URL",
            help="run records and checkpoints in Postgres (default: $ATLAS_STATE_URL, else "
            "SQLite in the state directory)",
        )

    run = sub.add_parser("run", help="run a task file")
    run.add_argument("file", help="task YAML file")
    run.add_argument(
        "--model", metavar="SPEC", help="model for every role, e.g. scripted or openai:gpt-4o-mini"
    )
    run.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    run.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow tracking URI (default: local sqlite)"
    )
    run.add_argument("--quiet", action="store_true", help="no live progress")
    run.add_argument(
        "--approve-all",
        action="store_true",
        help="approve every plan and tool call the task's approval: asks about (for CI)",
    )
    state(run)

    resume = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    resume.add_argument("run_id", metavar="RUN_ID", help="a run id, or a unique prefix of one")
    resume.add_argument(
        "--model",
        metavar="SPEC",
        help="model for every role (needed again when the run's --model held a secret)",
    )
    resume.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    resume.add_argument("--quiet", action="store_true", help="no live progress")
    resume.add_argument(
        "--approve-all", action="store_true", help="approve everything approval: asks about"
    )
    state(resume)

    approvals = sub.add_parser("approvals", help="list what paused runs wait for")
    approvals.add_argument("run_id", metavar="RUN_ID", nargs="?", help="one run (default: all)")
    approvals.add_argument("--json", action="store_true", help="print one JSON document")
    state(approvals)

    approve = sub.add_parser(
        "approve", help="decide what a paused run waits for (all of it, or --id), and resume it"
    )
    approve.add_argument("run_id", metavar="RUN_ID", help="a run id, or a unique prefix of one")
    approve.add_argument(
        "--id", action="append", dest="ids", metavar="ID", help="decide this item only (repeatable)"
    )
    approve.add_argument(
        "--edit", metavar="FILE", help="YAML/JSON: a tool call's new arguments, or a plan's steps"
    )
    approve.add_argument("--reject", action="store_true", help="reject instead of approving")
    approve.add_argument("--reason", metavar="TEXT", help="why (required with --reject)")
    approve.add_argument("--by", metavar="NAME", help="who decides (default: $ATLAS_USER, login)")
    approve.add_argument(
        "--model", metavar="SPEC", help="as for resume (needed when --model held a secret)"
    )
    approve.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    approve.add_argument("--quiet", action="store_true", help="no live progress")
    state(approve)

    trace = sub.add_parser(
        "trace", help="a run's story from its MLflow trace: plans, waves, handoffs, verdicts"
    )
    trace.add_argument("run_id", metavar="RUN_ID", help="a run id, or a unique prefix of one")
    trace.add_argument("--json", action="store_true", help="print the story as one JSON document")
    trace.add_argument(
        "--tracking-uri", metavar="URI", help="read the trace from this store (default: the run's)"
    )
    state(trace)

    runs = sub.add_parser("runs", help="list runs and their status")
    runs.add_argument("--json", action="store_true")
    runs.add_argument("--limit", type=int, default=20)
    state(runs)

    validate = sub.add_parser("validate", help="check a task file (and its tools)")
    validate.add_argument("file")
    validate.add_argument(
        "--connect", action="store_true", help="also start each MCP server and list its tools"
    )

    sub.add_parser("schema", help="print the task file's JSON Schema")

    ui = sub.add_parser("ui", help="open MLflow's UI on the runs' traces (127.0.0.1)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--tracking-uri", metavar="URI")
    state(ui)

    from atlas.memory.cli import add_parser as add_memory

    add_memory(sub, state)

    from atlas.doctor import add_parser as add_doctor

    add_doctor(sub, state)

    from atlas.models.cache_cli import add_parser as add_cache

    add_cache(sub, state)

    from atlas.batch.cli import add_parser as add_batch

    add_batch(sub, state)

    from atlas.eval.cli import add_parser as add_eval

    add_eval(sub, state)

    tools = sub.add_parser(
        "tools", help="list the tools each worker of a task gets, with their schemas"
    )
    tools.add_argument("file", nargs="?", help="task YAML file (default: the built-in tools)")
    tools.add_argument("--json", action="store_true", help="print one JSON document")
    tools.add_argument(
        "--no-connect", action="store_true", help="do not start MCP servers to list their tools"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        from atlas import __version__

        print(__version__)
        return 0
    if not args.command:
        _parser().print_help()
        return EXIT_BAD_INPUT
    try:
        if getattr(args, "state_url", None):
            from atlas.runs_postgres import STATE_URL_ENV, check_url

            os.environ[STATE_URL_ENV] = check_url(args.state_url, "--state-url")
        return int(_COMMANDS[args.command](args))
    except KeyboardInterrupt:
        print(
            "atlas: interrupted; continue with `python -m atlas resume <run id>`", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    except Exception as exc:
        return _fail(exc)


def _fail(exc: BaseException) -> int:
    from atlas.errors import AtlasError

    if os.environ.get("ATLAS_DEBUG"):
        import traceback

        traceback.print_exception(exc)
    full = _disk_full(exc)
    if full is not None:
        print(f"atlas: error: {full}", file=sys.stderr)
        return EXIT_FAILURE
    if isinstance(exc, AtlasError):
        # One line, whatever the input held (a newline or carriage return in a path or query).
        print(f"atlas: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    text = " ".join(str(exc).split())[:300]
    print(f"atlas: error: {type(exc).__name__}: {text}", file=sys.stderr)
    return EXIT_FAILURE


_DISK_FULL = ("database or disk is full", "no space left on device", "disk i/o error")


def _disk_full(exc: BaseException) -> str | None:
    """The one line for an error caused by a full disk (an OSError with ENOSPC or EDQUOT, or
    SQLite's own words for it, anywhere in the exception's chain), else None."""
    import errno

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        where = ""
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {current.filename}" if current.filename else ""
            return f"the disk is full (no space left on device{where}); free some space and resume"
        text = str(current).lower()
        if any(words in text for words in _DISK_FULL):
            return (
                "the disk is full or failing (SQLite could not write); free some space and resume"
            )
        current = current.__cause__ or current.__context__
    return None


def _cmd_schema(args: argparse.Namespace) -> int:
    from atlas.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from atlas.spec import indexed_documents, input_warnings, load_task
    from atlas.tools.cli import check_tools, server_lines

    spec = load_task(args.file)
    box = check_tools(spec, connect=args.connect)
    try:
        servers = server_lines(box)
    finally:
        box.close()
    warnings = input_warnings(spec)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    docs, data = len(indexed_documents(spec)), len(spec.data_paths)
    tools = len({r.text for w in box.workers.values() for r in w.refs})
    noted = f"; {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else ""
    print(
        f"{args.file}: ok ({len(spec.teams)} teams, {tools} tools, {docs} documents, "
        f"{data} data files{noted})"
    )
    for line in servers:
        print(f"  {line}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from atlas.spec import load_task

    spec = load_task(args.file)
    if args.model:
        from atlas.models import check_override

        check_override(args.model)
    from atlas.tools.cli import check_tools

    check_tools(spec).close()  # every tool reference resolves, before anything starts
    _warn_inputs(spec)
    return _execute(args, lambda on_event: _run(spec, args, on_event))


def _warn_inputs(spec: Any) -> None:
    """Inputs that a run will skip, one `warning:` line each, before anything starts."""
    from atlas.spec import input_warnings
    from atlas.tools.data import check_data_files

    lines = list(input_warnings(spec))
    for path, reason in check_data_files(spec.data_paths):
        lines.append(f"data file {path} will be skipped: {reason}")
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


def _run(spec: Any, args: argparse.Namespace, on_event: Any) -> Any:
    from atlas.runner import run

    return run(
        spec,
        model=args.model,
        state_dir_path=args.state_dir,
        on_event=on_event,
        tracking_uri=args.tracking_uri,
        task_file=os.path.abspath(args.file),
        approve_all=args.approve_all,
    )


def _cmd_resume(args: argparse.Namespace) -> int:
    from atlas.runner import resume

    if args.model:
        from atlas.models import check_override

        check_override(args.model)
    record = _resolve_run(args)
    return _execute(
        args,
        lambda on_event: resume(
            record.run_id,
            state_dir_path=args.state_dir,
            on_event=on_event,
            model=args.model,
            approve_all=args.approve_all,
        ),
    )


def _find_run(args: argparse.Namespace) -> Any:
    """The run `args.run_id` names (an id or a unique prefix)."""
    from atlas.errors import RunNotFound
    from atlas.runs import run_store, state_dir
    from atlas.runs_postgres import STATE_URL_ENV, url_of_local_run

    directory = state_dir(args.state_dir)
    try:
        return run_store(directory).resolve(args.run_id)
    except RunNotFound:
        # A run whose task file put its state in Postgres (`state.url`): found through the
        # note in its local folder; the command then reads and writes that store throughout.
        url = None if os.environ.get(STATE_URL_ENV) else url_of_local_run(directory, args.run_id)
        if url is None:
            raise
        os.environ[STATE_URL_ENV] = url
        return run_store(directory, url).resolve(args.run_id)


def _resolve_run(args: argparse.Namespace) -> Any:
    """`_find_run`, saying so when the id was a prefix."""
    from atlas.runs import matched_prefix

    record = _find_run(args)
    note = matched_prefix(args.run_id, record)
    if note:
        print(f"atlas: {note}", file=sys.stderr)
    return record


def _cmd_approvals(args: argparse.Namespace) -> int:
    from atlas.approvals import pending
    from atlas.runs import run_store, state_dir

    if args.run_id:
        records = [_resolve_run(args)]
    else:
        store = run_store(state_dir(args.state_dir))
        records = [r for r in store.list(limit=1000) if r.status == "awaiting_approval"]
    found = [(r, p) for r in records for p in pending(r.run_id, state_dir_path=args.state_dir)]
    if args.json:
        print(json.dumps([{"run_id": r.run_id, **p.as_dict()} for r, p in found], default=str))
        return 0
    if not found:
        print("nothing is waiting for approval")
        return 0
    for record, item in found:
        print(_clean_line(f"{record.run_id}  {item.id}  {item.describe()}"))
    runs = sorted({r.run_id for r, _ in found})
    print(f"decide with: python -m atlas approve {runs[0]} [--id ID] [--reject --reason TEXT]")
    return 0


def _cmd_approve(args: argparse.Namespace) -> int:
    from atlas.approvals import approve

    if args.model:
        from atlas.models import check_override

        check_override(args.model)
    record = _resolve_run(args)
    return _execute(
        args,
        lambda on_event: approve(
            record.run_id,
            ids=args.ids,
            reject=args.reject,
            reason=args.reason,
            edit=args.edit,
            by=args.by,
            state_dir_path=args.state_dir,
            on_event=on_event,
            model=args.model,
        ),
    )


def _clean_line(text: str) -> str:
    from atlas.tracing.redact import scrub_text, secret_values

    return scrub_text(text, secret_values())


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as an interrupt (exit 143)."""


def _on_signal(signum: int, frame: Any) -> None:
    """The first SIGINT or SIGTERM stops the run: runs refuse further model calls and the
    interrupt unwinds, writing the record and the partial output. Signals that arrive while
    that clean-up runs are noted, not raised, so the clean-up is never cut half-way (a second
    Ctrl-C used to crash the checkpointer mid-write)."""
    from atlas.runner import cancel_active

    signal.signal(signal.SIGINT, _while_stopping)
    signal.signal(signal.SIGTERM, _while_stopping)
    from atlas.errors import RunInterrupted

    cancel_active(RunInterrupted("interrupted"))
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _while_stopping(signum: int, frame: Any) -> None:
    print("atlas: stopping; saving the run's state (one moment)", file=sys.stderr, flush=True)


def _execute(args: argparse.Namespace, start: Any) -> int:
    from atlas.progress import Progress
    from atlas.runner import last_result

    progress = Progress(enabled=not args.quiet, to_stderr=args.json)
    _quiet_alert_log()
    previous = _install_signals()
    try:
        with progress:
            result = start(progress.handle)
    except KeyboardInterrupt as exc:
        # Signals stay noted-not-raised until the process exits: the interpreter's own
        # shutdown (joining threads, flushing stores) must not be cut either.
        previous = None
        _ignore_signals()
        partial = last_result()
        print(_interrupted_line(partial), file=sys.stderr)
        if partial is not None and args.json:
            print(partial.to_json(), flush=True)
        # From here the process only exits; a signal now would cut the interpreter's shutdown
        # (Python restores the default handlers while finalizing), so it is ignored outright.
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except Exception as exc:
        _ignore_signals()
        code = _fail(exc)
        partial = last_result()
        if partial is not None and args.json:
            print(partial.to_json())
        elif partial is not None and partial.output:
            print(f"atlas: partial output kept at {partial.output}", file=sys.stderr)
        from atlas.errors import StateError

        stored = not isinstance(exc, StateError)
        if partial is not None and partial.run_dir and code == EXIT_FAILURE and stored:
            print(
                f"atlas: the run's drafts and plan are kept in {partial.run_dir}; continue "
                f"with `python -m atlas resume {partial.run_id}`",
                file=sys.stderr,
            )
        return code
    finally:
        _restore_signals(previous)
    for alert in result.alerts:
        print(f"warning: alert {alert['name']}: {alert['message']}", file=sys.stderr)
    if args.json:
        print(result.to_json())
    else:
        progress.summary(result)
    if result.status == "awaiting_approval":
        return _paused(args, result)
    return EXIT_PASSED if result.passed else EXIT_NOT_PASSED


def _paused(args: argparse.Namespace, result: Any) -> int:
    """A run waiting for approval: on a terminal, ask now and go on; otherwise exit paused
    (never block a script or CI waiting for input)."""
    from atlas.approvals import Pending

    waiting = [Pending.from_dict(p) for p in result.pending]
    interactive = not args.json and sys.stdin.isatty() and sys.stdout.isatty()
    if interactive and waiting:
        from atlas.approvals import approve_decided, ask_decisions

        decided = ask_decisions(waiting)
        if decided:
            return _execute(
                args,
                lambda on_event: approve_decided(
                    result.run_id,
                    waiting,
                    decided,
                    state_dir_path=args.state_dir,
                    on_event=on_event,
                    model=getattr(args, "model", None),
                ),
            )
    print(
        f"atlas: paused, waiting for approval of {len(waiting)} item(s); see them with "
        f"`python -m atlas approvals {result.run_id}`, decide with "
        f"`python -m atlas approve {result.run_id}`",
        file=sys.stderr,
    )
    return EXIT_AWAITING_APPROVAL


def _quiet_alert_log() -> None:
    """Alerts are logged for embedding apps; the CLI prints them itself, as `warning:` lines."""
    import logging

    alerts = logging.getLogger("atlas.alerts")
    alerts.propagate = False
    if not alerts.handlers:
        alerts.addHandler(logging.NullHandler())


def _install_signals() -> Any:
    """SIGINT and SIGTERM stop a run cleanly (main thread only; elsewhere nothing changes)."""
    try:
        return (
            signal.signal(signal.SIGINT, _on_signal),
            signal.signal(signal.SIGTERM, _on_signal),
        )
    except ValueError:
        return None


def _ignore_signals() -> None:
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, _while_stopping)
        signal.signal(signal.SIGTERM, _while_stopping)


def _restore_signals(previous: Any) -> None:
    if previous is None:
        return
    with contextlib.suppress(ValueError, TypeError):
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def _interrupted_line(partial: Any) -> str:
    if partial is None:
        return "atlas: interrupted before the run started"
    kept = f"; partial output kept at {partial.output}" if partial.output else ""
    return f"atlas: interrupted{kept}; continue with `python -m atlas resume {partial.run_id}`"


def _cmd_runs(args: argparse.Namespace) -> int:
    from atlas.runs import run_store, state_dir

    records = run_store(state_dir(args.state_dir)).list(limit=args.limit)
    if args.json:
        print(json.dumps([r.__dict__ | {"spec_json": None} for r in records], default=str))
        return 0
    if not records:
        print(f"no runs in {state_dir(args.state_dir)}")
        return 0
    from atlas.progress import runs_table

    runs_table(records)
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from atlas.runs import state_dir
    from atlas.tracing.story import render, story_for_record

    directory = state_dir(args.state_dir)
    record = _find_run(args)
    if record.run_id != args.run_id:
        print(f"atlas: run {record.run_id} (matched prefix {args.run_id})", file=sys.stderr)
    story = story_for_record(record, directory, tracking_uri=args.tracking_uri)
    print(json.dumps(story, indent=2) if args.json else render(story))
    return 0


def _cmd_memory(args: argparse.Namespace) -> int:
    from atlas.memory.cli import run

    return run(args)


def _cmd_ui(args: argparse.Namespace) -> int:
    from atlas.tracing.ui import serve

    return serve(args)


def _cmd_eval(args: argparse.Namespace) -> int:
    from atlas.eval.cli import run

    return run(args)


def _cmd_batch(args: argparse.Namespace) -> int:
    from atlas.batch.cli import run

    return run(args)


def _cmd_cache(args: argparse.Namespace) -> int:
    from atlas.models.cache_cli import run

    return run(args)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from atlas.doctor import run

    return run(args)


def _cmd_tools(args: argparse.Namespace) -> int:
    from atlas.tools.cli import cmd_tools

    return cmd_tools(args)


_COMMANDS = {
    "run": _cmd_run,
    "resume": _cmd_resume,
    "approvals": _cmd_approvals,
    "approve": _cmd_approve,
    "runs": _cmd_runs,
    "trace": _cmd_trace,
    "validate": _cmd_validate,
    "schema": _cmd_schema,
    "ui": _cmd_ui,
    "memory": _cmd_memory,
    "doctor": _cmd_doctor,
    "cache": _cmd_cache,
    "batch": _cmd_batch,
    "eval": _cmd_eval,
    "tools": _cmd_tools,
}
