"""`python -m atlas batch TASKS... [--executor local|ray] [--max-concurrency N]` and
`atlas batch --resume BATCH_ID`: progress for the whole batch, a summary table, one JSON line
per run with `--json` (the object `atlas run --json` prints)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from atlas.batch import Batch, Item, Options, make_batch
from atlas.errors import SpecError
from atlas.tracing.redact import scrub_text, secret_values

EXIT_INTERRUPTED = 130


def add_parser(sub: Any, state: Any) -> None:
    batch = sub.add_parser(
        "batch", help="run many task files, one run each, on worker processes or a Ray cluster"
    )
    batch.add_argument("files", nargs="*", metavar="TASK", help="task YAML files")
    batch.add_argument("--resume", metavar="BATCH_ID", help="run what a batch has not finished")
    batch.add_argument("--executor", choices=("local", "ray"), default=None)
    batch.add_argument(
        "--max-concurrency",
        type=int,
        metavar="N",
        help="runs at once (default: the cores, or the Ray cluster's CPUs)",
    )
    batch.add_argument(
        "--max-per-provider",
        action="append",
        default=[],
        metavar="PROVIDER=N",
        help="at most N runs at once on a provider's models, e.g. openai=4 (repeatable)",
    )
    batch.add_argument("--address", metavar="ADDR", help="a running Ray cluster (default: local)")
    batch.add_argument("--model", metavar="SPEC", help="model for every role of every run")
    batch.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI")
    batch.add_argument("--json", action="store_true", help="one JSON line per run, as run --json")
    batch.add_argument("--quiet", action="store_true", help="no progress lines")
    batch.add_argument("--approve-all", action="store_true", help="as for run")
    state(batch)


def _caps(values: list[str]) -> dict[str, int]:
    caps: dict[str, int] = {}
    for value in values:
        name, sep, number = value.partition("=")
        if not sep or not name.strip() or not number.strip().isdigit() or int(number) < 1:
            raise SpecError(
                f"{value!r}: write PROVIDER=N, e.g. openai=4", field="--max-per-provider"
            )
        caps[name.strip()] = int(number)
    return caps


def run(args: argparse.Namespace) -> int:
    from atlas.batch.driver import drive
    from atlas.runs import state_dir
    from atlas.runs_postgres import state_url

    directory = state_dir(args.state_dir)
    caps = _caps(args.max_per_provider)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SpecError("must be at least 1", field="--max-concurrency")
    if args.resume:
        if args.files:
            raise SpecError("give task files or --resume BATCH_ID, not both", field="TASKS")
        batch = Batch.load(directory, args.resume)
        batch.options.state_url = state_url()
        if args.executor:
            batch.executor = args.executor
    else:
        if not args.files:
            raise SpecError("give task files, or --resume BATCH_ID", field="TASKS")
        options = Options(
            model=args.model,
            tracking_uri=args.tracking_uri,
            state_dir=str(directory),
            state_url=state_url(),
            approve_all=args.approve_all,
        )
        batch = make_batch(args.files, options, executor=args.executor or "local")
    executor = _executor(batch, args)
    show = _Progress(batch, quiet=args.quiet, as_json=args.json)
    started = time.monotonic()
    try:
        drive(
            batch,
            executor,
            directory,
            max_concurrency=args.max_concurrency,
            caps=caps,
            listener=show,
        )
    except KeyboardInterrupt:
        print(
            f"atlas: batch interrupted; continue with `python -m atlas batch --resume "
            f"{batch.batch_id}`",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    show.summary(time.monotonic() - started)
    return 0 if all(item.status == "passed" for item in batch.items) else 1


def _executor(batch: Batch, args: argparse.Namespace) -> Any:
    if batch.executor == "ray":
        from atlas.batch.ray import RayExecutor

        return RayExecutor(batch, address=args.address, workers=args.max_concurrency)
    if args.address:
        raise SpecError("--address is for --executor ray", field="--address")
    from atlas.batch.local import LocalExecutor

    return LocalExecutor(batch, workers=args.max_concurrency)


class _Progress:
    """One line per start, retry and finish on stderr (the run's own progress stays in its
    worker); `--json` prints each finished run's summary on stdout."""

    def __init__(self, batch: Batch, *, quiet: bool, as_json: bool) -> None:
        self.batch, self.quiet, self.as_json = batch, quiet, as_json
        self.total = len(batch.items)
        if not quiet:
            self._say(
                f"batch {batch.batch_id}: {self.total} tasks on {batch.executor}"
                f" (manifest: batches/{batch.batch_id}.json)"
            )

    def _say(self, text: str) -> None:
        print(scrub_text(text, secret_values()), file=sys.stderr, flush=True)

    def __call__(self, kind: str, batch: Batch, item: Item | None) -> None:
        if item is None:
            return
        if kind == "finish" and self.as_json:
            print(json.dumps(_summary_of(item), default=str), flush=True)
        if self.quiet:
            return
        counts = batch.counts()
        cost = batch.cost()
        spent = "" if cost is None else f", ${cost:.4f} so far"
        head = f"[{counts['done']}/{self.total} done, {counts['running']} running{spent}]"
        name = item.label or os.path.relpath(item.task_file)
        if kind == "start":
            again = f" (attempt {item.attempts}, resuming)" if item.attempts > 1 else ""
            self._say(f"{head} start  {name}  run {item.run_id}{again}")
        elif kind == "retry":
            self._say(f"{head} retry  {name}: {item.error}")
        elif kind == "finish":
            why = f": {item.error}" if item.error and item.status != "passed" else ""
            self._say(f"{head} {item.status}  {name}  run {item.run_id}{why}")

    def summary(self, wall: float) -> None:
        if self.quiet:
            return
        from rich.console import Console
        from rich.table import Table

        console = Console(stderr=True, highlight=False)
        if not console.is_terminal:
            console = Console(stderr=True, highlight=False, width=200)  # logs: a row per line
        table = Table(show_header=True, header_style="bold")
        for col in ("#", "task", "status", "score", "tokens", "cost", "wall s", "run id"):
            table.add_column(col, overflow="fold", no_wrap=col == "run id")
        for item in self.batch.items:
            r = item.result or {}
            cost = r.get("cost_usd")
            table.add_row(
                str(item.index),
                item.label or os.path.relpath(item.task_file),
                item.status,
                "" if r.get("score") is None else f"{r['score']:.2f}",
                str(r.get("tokens", "")),
                "" if cost is None else f"${cost:.4f}",
                "" if r.get("wall_s") is None else f"{r['wall_s']:.1f}",
                item.run_id,
            )
        console.print(table)
        counts = self.batch.counts()
        cost = self.batch.cost()
        console.print(
            scrub_text(
                f"batch {self.batch.batch_id}: {counts['passed']}/{self.total} passed, "
                f"{counts['failed']} not, in {wall:.1f} s"
                + ("" if cost is None else f", ${cost:.4f}"),
                secret_values(),
            )
        )


def _summary_of(item: Item) -> dict[str, Any]:
    if item.result:
        return item.result
    return {"run_id": item.run_id, "status": item.status, "error": item.error}
