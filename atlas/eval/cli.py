"""`python -m atlas eval SUITE.yaml [--variant NAME=OVERRIDES ...] [--baseline EVAL_ID]`.

Exit 0 when no variant regressed past the suite's gate against the baseline, 1 when one did
(a CI gate), 2 for bad input."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from atlas.tracing.redact import scrub_text, secret_values


def add_parser(sub: Any, state: Any) -> None:
    ev = sub.add_parser("eval", help="run a suite of cases for each variant and compare them")
    ev.add_argument("suite", metavar="SUITE", help="suite YAML file")
    ev.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="a variant: NAME=field=value[,field=value] (task fields, or model=SPEC)",
    )
    ev.add_argument("--baseline", metavar="EVAL_ID", help="compare against an earlier eval")
    ev.add_argument("--executor", choices=("local", "ray"), default="local")
    ev.add_argument("--max-concurrency", type=int, metavar="N")
    ev.add_argument("--address", metavar="ADDR", help="a running Ray cluster")
    ev.add_argument("--model", metavar="SPEC", help="model for every variant without its own")
    ev.add_argument("--tracking-uri", metavar="URI")
    ev.add_argument("--json", action="store_true", help="print the report as one JSON object")
    state(ev)


def _say(text: str) -> None:
    print(scrub_text(text, secret_values()), file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from atlas.eval import run_eval
    from atlas.eval.suite import load_suite, parse_variant
    from atlas.runs import state_dir

    suite = load_suite(args.suite)
    variants = dict(suite.variants)
    if args.variant:
        if list(variants) == ["default"] and not variants["default"]:
            variants = {"default": {}}
        for text in args.variant:
            name, fields = parse_variant(text)
            variants[name] = fields
    directory = state_dir(args.state_dir)
    report = run_eval(
        suite,
        variants,
        directory=directory,
        executor=args.executor,
        max_concurrency=args.max_concurrency,
        address=args.address,
        model=args.model,
        tracking_uri=args.tracking_uri,
        baseline=args.baseline,
        say=_say,
    )
    if args.json:
        print(json.dumps(report, default=str))
    else:
        show(report)
    return 1 if report["regressed"] else 0


def show(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)
    variants = report["variants"]
    names = list(variants)
    cases = list(next(iter(variants.values()))["cases"]) if variants else []
    table = Table(show_header=True, header_style="bold", title=f"eval {report['eval_id']}")
    table.add_column("case")
    for name in names:
        table.add_column(f"{name}: score", justify="right")
        table.add_column("passed")
    for case in cases:
        row = [case]
        for name in names:
            c = variants[name]["cases"].get(case, {})
            row += [
                "" if c.get("score") is None else f"{c['score']:.2f}",
                "yes" if c.get("passed") else "no",
            ]
        table.add_row(*row)
    console.print(table)
    overall = Table(show_header=True, header_style="bold", title="overall")
    for col in ("variant", "pass rate", "mean score", "cost", "tokens", "wall s", "evaluation run"):
        overall.add_column(col)
    for name in names:
        o = variants[name]["overall"]
        overall.add_row(
            name,
            "" if o["pass_rate"] is None else f"{o['pass_rate']:.2f}",
            "" if o["mean_score"] is None else f"{o['mean_score']:.3f}",
            "" if o["cost_usd"] is None else f"${o['cost_usd']:.4f}",
            str(o["tokens"]),
            f"{o['wall_s']:.1f}",
            str(variants[name].get("evaluation_run_id") or ""),
        )
    console.print(overall)
    for comparison in report["comparisons"]:
        test = comparison["paired"]
        p = test.get("p_value")
        significance = f"p = {p}" if p is not None else test.get("note", "")
        verdict = "REGRESSED: " + "; ".join(comparison["why"]) if comparison["regressed"] else "ok"
        diff = test.get("mean_diff")
        shown = "" if diff is None else f"{diff:+.3f}"
        console.print(
            f"{comparison['variant']} vs {report['baseline']}: mean score diff {shown} over "
            f"{test['pairs']} cases ({significance}): {verdict}"
        )
