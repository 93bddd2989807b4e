"""`python -m atlas`: run, resume, runs, validate, schema, ui, memory.

Imports are lazy so `--help` is fast. Exit codes: 0 passed, 1 finished without passing (or a
budget stop; the output is still written), 2 bad input, 3 runtime failure, 130 interrupted.
Errors are one line on stderr, never a traceback (set ATLAS_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_PASSED, EXIT_NOT_PASSED, EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


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
    state(run)

    resume = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    resume.add_argument("run_id", metavar="RUN_ID")
    resume.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    resume.add_argument("--quiet", action="store_true", help="no live progress")
    state(resume)

    runs = sub.add_parser("runs", help="list runs and their status")
    runs.add_argument("--json", action="store_true")
    runs.add_argument("--limit", type=int, default=20)
    state(runs)

    validate = sub.add_parser("validate", help="check a task file")
    validate.add_argument("file")

    sub.add_parser("schema", help="print the task file's JSON Schema")

    ui = sub.add_parser("ui", help="open MLflow's UI on the runs' traces (127.0.0.1)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--tracking-uri", metavar="URI")
    state(ui)

    from atlas.memory.cli import add_parser as add_memory

    add_memory(sub, state)
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
    if isinstance(exc, AtlasError):
        # One line, whatever the input held (a newline or carriage return in a path or query).
        print(f"atlas: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    text = " ".join(str(exc).split())[:300]
    print(f"atlas: error: {type(exc).__name__}: {text}", file=sys.stderr)
    return EXIT_FAILURE


def _cmd_schema(args: argparse.Namespace) -> int:
    from atlas.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from atlas.spec import load_task

    spec = load_task(args.file)
    docs, data = len(spec.document_paths), len(spec.data_paths)
    print(f"{args.file}: ok ({len(spec.teams)} teams, {docs} documents, {data} data files)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from atlas.spec import load_task

    spec = load_task(args.file)
    if args.model:
        from atlas.models import check_override

        check_override(args.model)
    return _execute(args, lambda on_event: _run(spec, args, on_event))


def _run(spec: Any, args: argparse.Namespace, on_event: Any) -> Any:
    from atlas.runner import run

    return run(
        spec,
        model=args.model,
        state_dir_path=args.state_dir,
        on_event=on_event,
        tracking_uri=args.tracking_uri,
        task_file=os.path.abspath(args.file),
    )


def _cmd_resume(args: argparse.Namespace) -> int:
    from atlas.runner import resume

    return _execute(
        args, lambda on_event: resume(args.run_id, state_dir_path=args.state_dir, on_event=on_event)
    )


def _execute(args: argparse.Namespace, start: Any) -> int:
    from atlas.progress import Progress
    from atlas.runner import last_result

    progress = Progress(enabled=not args.quiet, to_stderr=args.json)
    try:
        with progress:
            result = start(progress.handle)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        code = _fail(exc)
        partial = last_result()
        if partial is not None and args.json:
            print(partial.to_json())
        elif partial is not None and partial.output:
            print(f"atlas: partial output kept at {partial.output}", file=sys.stderr)
        return code
    if args.json:
        print(result.to_json())
    else:
        progress.summary(result)
    return EXIT_PASSED if result.passed else EXIT_NOT_PASSED


def _cmd_runs(args: argparse.Namespace) -> int:
    from atlas.runs import RunStore, state_dir

    records = RunStore(state_dir(args.state_dir)).list(limit=args.limit)
    if args.json:
        print(json.dumps([r.__dict__ | {"spec_json": None} for r in records], default=str))
        return 0
    if not records:
        print(f"no runs in {state_dir(args.state_dir)}")
        return 0
    from atlas.progress import runs_table

    runs_table(records)
    return 0


def _cmd_memory(args: argparse.Namespace) -> int:
    from atlas.memory.cli import run

    return run(args)


def _cmd_ui(args: argparse.Namespace) -> int:
    from atlas.tracing.ui import serve

    return serve(args)


_COMMANDS = {
    "run": _cmd_run,
    "resume": _cmd_resume,
    "runs": _cmd_runs,
    "validate": _cmd_validate,
    "schema": _cmd_schema,
    "ui": _cmd_ui,
    "memory": _cmd_memory,
}
