"""ATLAS benchmarks: `scripts/bench` (or `python -m benchmarks.run`).

Every comparison is a ratio of numbers measured in the same run, interleaved, because these
machines are shared and noisy. Results go to benchmarks/results.json (committed),
benchmarks/results.md (included in the README) and benchmarks/results.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.memory import bench_memory

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUICKSTART = ROOT / "examples" / "quickstart"

os.environ.setdefault("MLFLOW_MODEL_CATALOG_URI", "")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _spec(traced: bool, state: Path, out: Path) -> Any:
    from atlas.spec import TaskSpec

    return TaskSpec.from_dict(
        {
            "task": "Write a one-page brief on the bike-share pilot.",
            "acceptance": ["States the total number of trips.", "Cites the notes."],
            "inputs": {
                "documents": [str(QUICKSTART / "docs" / "*.md")],
                "data": [str(QUICKSTART / "data" / "*.csv")],
            },
            "output": str(out),
            "tracing": {"enabled": traced, "experiment": "bench"},
        },
        base_dir=state,
    )


def _worker(traced: bool, runs: int, latency_ms: int) -> dict[str, Any]:
    """In a fresh process: one warm-up run, then `runs` timed runs of the dry-run workload."""
    import atlas

    model = f"scripted?latency_ms={latency_ms}"
    times, calls = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        atlas.run(_spec(traced, state, state / "warm.md"), model=model, state_dir_path=state)
        for n in range(runs):
            started = time.perf_counter()
            result = atlas.run(
                _spec(traced, state, state / f"o{n}.md"), model=model, state_dir_path=state
            )
            times.append(time.perf_counter() - started)
            calls = result.model_calls
        if traced:
            import mlflow

            mlflow.flush_trace_async_logging()
    return {"times": times, "calls": calls}


def _spawn(traced: bool, runs: int, latency_ms: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--worker",
            "traced" if traced else "untraced",
            "--runs",
            str(runs),
            "--latency-ms",
            str(latency_ms),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def bench_tracing_cost(rounds: int, latency_ms: int) -> dict[str, Any]:
    """Wall time of the same dry run traced and untraced, medians and their ratio.

    MLflow's LangChain autolog is process-wide once on, so each mode runs in its own process;
    the processes alternate, and only warm runs (imports done, store created) are timed.
    """
    times: dict[bool, list[float]] = {True: [], False: []}
    calls = 0
    for n in range(rounds):
        for traced in (True, False) if n % 2 == 0 else (False, True):
            got = _spawn(traced, 2, latency_ms)
            times[traced] += got["times"]
            calls = got["calls"]
    traced_s, untraced_s = statistics.median(times[True]), statistics.median(times[False])
    return {
        "workload": f"dry run, {calls} scripted calls of {latency_ms} ms, {2 * rounds} runs each",
        "traced_s": round(traced_s, 3),
        "untraced_s": round(untraced_s, 3),
        "ratio": round(traced_s / untraced_s, 3),
        "goal": "<= 1.05",
        "met": traced_s / untraced_s <= 1.05,
        "samples": {
            "traced": [round(t, 3) for t in times[True]],
            "untraced": [round(t, 3) for t in times[False]],
        },
    }


def bench_help(rounds: int) -> dict[str, Any]:
    """Start-up: `python -m atlas --help`, median wall time."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "atlas", "--help"], check=True, capture_output=True)
        samples.append(time.perf_counter() - started)
    median = statistics.median(samples)
    return {
        "median_s": round(median, 3),
        "goal": "<= 1 s",
        "met": median <= 1.0,
        "samples": [round(s, 3) for s in samples],
    }


def bench_tracking_down(rounds: int) -> dict[str, Any]:
    """A dry run whose tracking server is down (refused port) against a normal traced dry run."""
    import socket

    import atlas

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    times: dict[str, list[float]] = {"normal": [], "server_down": []}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        atlas.run(_spec(True, state, state / "warm.md"), model="scripted", state_dir_path=state)
        for n in range(rounds):
            for kind in ("normal", "server_down") if n % 2 == 0 else ("server_down", "normal"):
                uri = dead if kind == "server_down" else None
                started = time.perf_counter()
                atlas.run(
                    _spec(True, state, state / f"d{n}.md"),
                    model="scripted",
                    state_dir_path=state,
                    tracking_uri=uri,
                )
                times[kind].append(time.perf_counter() - started)
    normal, down = statistics.median(times["normal"]), statistics.median(times["server_down"])
    return {
        "normal_s": round(normal, 3),
        "server_down_s": round(down, 3),
        "extra_s": round(down - normal, 3),
        "goal": "<= 5 s extra",
        "met": down - normal <= 5,
    }


BENCHES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "startup": lambda a: bench_help(a.rounds * 2),
    "tracing_cost": lambda a: bench_tracing_cost(a.rounds, 100),
    "tracking_down": lambda a: bench_tracking_down(a.rounds),
    "memory": lambda a: bench_memory(a.rounds),
}


def markdown(results: dict[str, Any]) -> str:
    lines = ["| benchmark | measured | goal | met |", "|---|---|---|---|"]
    b = results["benchmarks"]
    if "startup" in b:
        s = b["startup"]
        lines.append(
            f"| `python -m atlas --help` | {s['median_s']:.3f} s | {s['goal']} | "
            f"{'yes' if s['met'] else 'no'} |"
        )
    if "tracing_cost" in b:
        t = b["tracing_cost"]
        lines.append(
            f"| traced / untraced wall time ({t['workload']}) | {t['ratio']:.3f} "
            f"({t['traced_s']:.2f} s / {t['untraced_s']:.2f} s) | {t['goal']} | "
            f"{'yes' if t['met'] else 'no'} |"
        )
    if "tracking_down" in b:
        d = b["tracking_down"]
        lines.append(
            f"| dry run with the tracking server down (refused port) | {d['extra_s']:+.2f} s "
            f"({d['server_down_s']:.2f} s vs {d['normal_s']:.2f} s) | {d['goal']} | "
            f"{'yes' if d['met'] else 'no'} |"
        )
    if "memory" in b:
        lines += _memory_rows(b["memory"])
    lines.append("")
    dates = sorted({str(entry.get("when") or results["when"]) for entry in b.values()})
    lines.append(f"Measured {' and '.join(dates)} on {results['machine']}.")
    return "\n".join(lines) + "\n"


def _memory_rows(m: dict[str, Any]) -> list[str]:
    def met(entry: dict[str, Any]) -> str:
        return "yes" if entry["met"] else "no"

    r, i, v, g = m["recall"], m["ingest"], m["vector_query"], m["graph_two_hop"]
    rows = [
        f"| memory recall@5, 15 paraphrased questions over 30 documents | "
        f"{r['found_in_top5']}/{r['questions']} | {r['goal']} | {met(r)} |",
        f"| memory ingest vs the embedder alone ({i['chunks']} chunks) | {i['ratio']:.2f} "
        f"({i['ingest_chunks_per_s']:.0f} vs {i['raw_chunks_per_s']:.0f} chunks/s) | "
        f"{i['goal']} | {met(i)} |",
    ]
    for size, lat in v["chunks"].items():
        rows.append(
            f"| vector top-5 query at {int(size) // 1000}k chunks, embedding included | "
            f"p50 {lat['p50_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms | "
            f"{v['goal'] if size == '100000' else 'report'} | "
            f"{met(v) if size == '100000' else '-'} |"
        )
    rows.append(
        f"| graph 2-hop query at {g['nodes'] // 1000}k entities, {g['edges'] // 1000}k relations "
        f"| p50 {g['two_hop_p50_ms']:.2f} ms, p95 {g['two_hop_p95_ms']:.2f} ms | {g['goal']} | "
        f"{met(g)} |"
    )
    return rows


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = results["benchmarks"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if "tracing_cost" in b:
        t = b["tracing_cost"]
        ax.boxplot(
            [t["samples"]["untraced"], t["samples"]["traced"]], tick_labels=["untraced", "traced"]
        )
        ax.set_ylabel("wall time (s)")
        ax.set_title(f"Tracing cost: ratio {t['ratio']:.3f} (goal <= 1.05)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES))
    parser.add_argument("--worker", choices=["traced", "untraced"], help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--latency-ms", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker == "traced", args.runs, args.latency_ms)))
        return 0
    chosen = args.only or list(BENCHES)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results: dict[str, Any] = {
        "when": when,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "benchmarks": {},
    }
    previous = HERE / "results.json"
    if args.only and previous.exists():
        # A partial run keeps the other benchmarks' last results (each says when it ran).
        old = json.loads(previous.read_text())
        for name, entry in old.get("benchmarks", {}).items():
            entry.setdefault("when", old.get("when"))
            results["benchmarks"][name] = entry
    for name in chosen:
        print(f"==> {name}", flush=True)
        results["benchmarks"][name] = {**BENCHES[name](args), "when": when}
        print(json.dumps(results["benchmarks"][name], indent=2), flush=True)
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(results))
    plot(results, HERE / "results.png")
    print(f"wrote {HERE / 'results.json'}, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
