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

from benchmarks import workloads
from benchmarks.batch import bench_batch
from benchmarks.first_event import bench_first_event
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


def bench_tracing_cost(rounds: int, latency_ms: int) -> dict[str, Any]:
    """Wall time of the same dry run traced and untraced, medians and their ratio.

    MLflow's LangChain autolog is process-wide once on, so each mode runs in its own process;
    the processes alternate, and only warm runs (imports done, store created) are timed.
    """
    times: dict[bool, list[float]] = {True: [], False: []}
    calls = 0
    for n in range(rounds):
        for traced in (True, False) if n % 2 == 0 else (False, True):
            got = _atlas("traced" if traced else "untraced", latency_ms, 2)
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


# -- the fan-out workload against peers -------------------------------------------------------

PEERS_VENV = ROOT / ".venv-peers"
PEERS = {
    "langgraph-supervisor": "benchmarks.peers.supervisor",
    "crewai-hierarchical": "benchmarks.peers.crew",
}


def _json_tail(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd[-5:])} failed: {' | '.join(tail)}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _atlas(mode: str, latency_ms: int, runs: int) -> dict[str, Any]:
    return _json_tail(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--worker",
            mode,
            "--runs",
            str(runs),
            "--latency-ms",
            str(latency_ms),
        ]
    )


def _handwritten(latency_ms: int, runs: int) -> dict[str, Any]:
    return _json_tail(
        [
            sys.executable,
            "-m",
            "benchmarks.handwritten",
            "--latency-ms",
            str(latency_ms),
            "--runs",
            str(runs),
        ]
    )


def _peer(name: str, latency_ms: int, runs: int) -> dict[str, Any]:
    return _json_tail(
        [
            str(PEERS_VENV / "bin" / "python"),
            "-m",
            PEERS[name],
            "--latency-ms",
            str(latency_ms),
            "--runs",
            str(runs),
        ],
        env={"PYTHONPATH": str(ROOT)},
    )


def _setup_peers() -> float:
    started = time.perf_counter()
    subprocess.run([str(HERE / "peers" / "setup_env.sh")], cwd=ROOT, check=True)
    return time.perf_counter() - started


def _collect(samples: dict[str, list[dict[str, Any]]], name: str, got: dict[str, Any]) -> None:
    samples.setdefault(name, []).append(got)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    walls = [w for r in runs for w in r["wall_s"]]
    last = runs[-1]
    return {
        "wall_s": round(statistics.median(walls), 3),
        "model_calls": last["model_calls"],
        "prompt_tokens": last["prompt_tokens"],
        "steps_done": last["steps_done"],
        "samples": [round(w, 3) for w in walls],
        **({"version": last["version"]} if "version" in last else {}),
    }


def bench_fanout(rounds: int, latency_ms: int = 100) -> dict[str, Any]:
    """3 teams x 3 steps, 2 calls of `latency_ms` per step: ATLAS (traced, as shipped, and
    untraced), the hand-written LangGraph graph and the peers, interleaved round by round."""
    install_s = _setup_peers()
    samples: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        _collect(samples, "atlas", _atlas("fanout-traced", latency_ms, 2))
        _collect(samples, "atlas-untraced", _atlas("fanout-untraced", latency_ms, 2))
        _collect(samples, "handwritten-langgraph", _handwritten(latency_ms, 2))
        for name in PEERS:
            _collect(samples, name, _peer(name, latency_ms, 1))
    frameworks = {name: _summary(runs) for name, runs in samples.items()}
    critical_s = samples["atlas"][-1]["critical_path_calls"] * latency_ms / 1000
    atlas = frameworks["atlas"]
    sup, crew = frameworks["langgraph-supervisor"], frameworks["crewai-hierarchical"]
    efficiency = critical_s / atlas["wall_s"]
    vs_sup, vs_crew = atlas["wall_s"] / sup["wall_s"], atlas["wall_s"] / crew["wall_s"]
    tokens = atlas["prompt_tokens"] / sup["prompt_tokens"]
    return {
        "workload": f"3 teams x 3 steps, 2 scripted calls of {latency_ms} ms per step",
        "critical_path_s": critical_s,
        "frameworks": frameworks,
        "parallel_efficiency": {
            "value": round(efficiency, 3),
            "untraced": round(critical_s / frameworks["atlas-untraced"]["wall_s"], 3),
            "goal": ">= 0.90",
            "met": efficiency >= 0.9,
        },
        "wall_vs_supervisor": {
            "value": round(vs_sup, 3),
            "goal": "<= 0.333",
            "met": vs_sup <= 1 / 3,
        },
        "wall_vs_crewai": {"value": round(vs_crew, 3), "goal": "<= 0.333", "met": vs_crew <= 1 / 3},
        "prompt_tokens_vs_supervisor": {
            "value": round(tokens, 3),
            "goal": "<= 0.5",
            "met": tokens <= 0.5,
        },
        "peers_env_setup_s": round(install_s, 1),
    }


def bench_overhead(rounds: int) -> dict[str, Any]:
    """Zero latency: ATLAS's time per model call against the hand-written LangGraph graph making
    the same calls, untraced and traced."""
    samples: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        _collect(samples, "atlas-untraced", _atlas("fanout-untraced", 0, 3))
        _collect(samples, "atlas-traced", _atlas("fanout-traced", 0, 3))
        _collect(samples, "handwritten", _handwritten(0, 3))
    per_call = {
        name: statistics.median(w for r in runs for w in r["wall_s"]) / runs[-1]["model_calls"]
        for name, runs in samples.items()
    }
    ratio = per_call["atlas-untraced"] / per_call["handwritten"]
    return {
        "per_call_ms": {k: round(v * 1000, 2) for k, v in per_call.items()},
        "model_calls": {k: runs[-1]["model_calls"] for k, runs in samples.items()},
        "untraced_ratio": round(ratio, 2),
        "traced_ratio": round(per_call["atlas-traced"] / per_call["handwritten"], 2),
        "goal": "untraced <= 1.5x hand-written LangGraph per model call",
        "met": ratio <= 1.5,
    }


def bench_concurrency(rounds: int, tasks: int = 50, latency_ms: int = 100) -> dict[str, Any]:
    """`tasks` fan-out runs at once in one process (asyncio, traced as shipped) against one."""
    got = _json_tail(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--worker",
            "concurrent",
            "--runs",
            str(rounds),
            "--latency-ms",
            str(latency_ms),
            "--tasks",
            str(tasks),
        ]
    )
    one, many = statistics.median(got["one_s"]), statistics.median(got["many_s"])
    return {
        "workload": f"{tasks} fan-out tasks at once (20 calls of {latency_ms} ms each), arun",
        "one_s": round(one, 3),
        "many_s": round(many, 3),
        "ratio": round(many / one, 2),
        "goal": "<= 1.5",
        "met": many / one <= 1.5,
        "samples": {"one": got["one_s"], "many": got["many_s"]},
    }


def bench_startup(rounds: int) -> dict[str, Any]:
    """`python -m atlas --help`, and the time from starting a run to its first model call."""
    help_ = bench_help(rounds * 2)
    first = _json_tail([sys.executable, "-m", "benchmarks.run", "--worker", "first-call"])
    return {**help_, "first_call": first}


BENCHES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "startup": lambda a: bench_startup(a.rounds),
    "fanout": lambda a: bench_fanout(a.rounds),
    "overhead": lambda a: bench_overhead(a.rounds),
    "tracing_cost": lambda a: bench_tracing_cost(a.rounds, 100),
    "concurrency": lambda a: bench_concurrency(2),
    "tracking_down": lambda a: bench_tracking_down(a.rounds),
    "memory": lambda a: bench_memory(a.rounds),
    "mcp_tool": lambda a: bench_mcp_tool(),
    "first_event": lambda a: bench_first_event(),
    "batch": lambda a: bench_batch(1, 100),
}


def bench_mcp_tool(calls: int = 300) -> dict[str, Any]:
    """One function as a plain LangChain tool and as a stdio MCP tool, per call (a report)."""
    from benchmarks.mcp_overhead import measure

    return {**measure(calls), "goal": "report"}


def _yes(entry: dict[str, Any]) -> str:
    return "yes" if entry["met"] else "**no**"


def _fanout_rows(f: dict[str, Any]) -> list[str]:
    eff, sup, crew, tok = (
        f["parallel_efficiency"],
        f["wall_vs_supervisor"],
        f["wall_vs_crewai"],
        f["prompt_tokens_vs_supervisor"],
    )
    return [
        f"| fan-out parallel efficiency (critical path {f['critical_path_s']:.1f} s / wall; "
        f"{f['workload']}) | {eff['value']:.2f} (untraced {eff['untraced']:.2f}) | "
        f"{eff['goal']} | {_yes(eff)} |",
        f"| fan-out wall time, ATLAS / langgraph-supervisor | {sup['value']:.2f} | "
        f"{sup['goal']} | {_yes(sup)} |",
        f"| fan-out wall time, ATLAS / CrewAI hierarchical | {crew['value']:.2f} | "
        f"{crew['goal']} | {_yes(crew)} |",
        f"| fan-out prompt tokens, ATLAS / langgraph-supervisor | {tok['value']:.2f} | "
        f"{tok['goal']} | {_yes(tok)} |",
    ]


def _peer_table(f: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Fan-out workload ({f['workload']}), medians of interleaved runs:",
        "",
        "| framework | wall time | model calls | prompt tokens sent | steps answered |",
        "|---|---|---|---|---|",
    ]
    names = {
        "atlas": "ATLAS (traced, as shipped)",
        "atlas-untraced": "ATLAS, tracing off",
        "handwritten-langgraph": "hand-written LangGraph graph",
    }
    for key, row in f["frameworks"].items():
        version = row.get("version")
        label = names.get(key, key)
        if version:
            label += f" (langgraph {version})" if key.startswith("handwritten") else f" {version}"
        lines.append(
            f"| {label} | {row['wall_s']:.2f} s | {row['model_calls']} | "
            f"{row['prompt_tokens']:,} | {row['steps_done']}/9 |"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines = ["| benchmark | measured | goal | met |", "|---|---|---|---|"]
    b = results["benchmarks"]
    if "startup" in b:
        s = b["startup"]
        lines.append(
            f"| `python -m atlas --help` | {s['median_s']:.3f} s | {s['goal']} | "
            f"{'yes' if s['met'] else 'no'} |"
        )
        if "first_call" in s:
            fc = s["first_call"]
            lines.append(
                f"| `python -m atlas run` to its first model call | "
                f"{fc['untraced']['median_s']:.2f} s untraced, {fc['traced']['median_s']:.2f} s "
                "traced | report | - |"
            )
    if "fanout" in b:
        lines += _fanout_rows(b["fanout"])
    if "overhead" in b:
        o = b["overhead"]
        pc = o["per_call_ms"]
        lines.append(
            f"| overhead per model call at zero latency, ATLAS untraced / hand-written LangGraph "
            f"| {o['untraced_ratio']:.2f} ({pc['atlas-untraced']:.1f} vs "
            f"{pc['handwritten']:.1f} ms; traced {pc['atlas-traced']:.1f} ms, "
            f"{o['traced_ratio']:.2f}x) | <= 1.5 | {_yes(o)} |"
        )
    if "concurrency" in b:
        c = b["concurrency"]
        lines.append(
            f"| {c['workload']}: wall / one task's | {c['ratio']:.2f} ({c['many_s']:.2f} s vs "
            f"{c['one_s']:.2f} s) | {c['goal']} | {_yes(c)} |"
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
    if "mcp_tool" in b:
        m = b["mcp_tool"]
        lines.append(
            f"| a tool call over MCP (stdio, FastMCP server) / the same function as a plain tool "
            f"| {m['mcp_stdio_ms']:.2f} ms vs {m['plain_tool_ms']:.3f} ms per call "
            f"({m['ratio']:.0f}x; server start {m['connect_ms']:.0f} ms, once per run) "
            "| report | - |"
        )
    if "first_event" in b:
        f = b["first_event"]
        lines.append(
            "| FastAPI example: POST /runs to its first server-sent event (dry run, warm) "
            f"| {f['first_event_ms']:.0f} ms (to `end`: {f['end_ms']:.0f} ms) | {f['goal']} "
            f"| {_yes(f)} |"
        )
    if "batch" in b:
        a = b["batch"]
        rate = a["tasks_per_s"]
        lines.append(
            f"| `atlas batch`, {a['workload']}: tasks/s with 1 and 2 local workers, Ray with 2 "
            f"| {rate['local-1']:.3f}, {rate['local-2']:.3f}, {rate['ray-2']:.3f} (2 workers "
            f"{a['speedup_2_workers']:.2f}x one, efficiency {a['scaling_efficiency']:.2f}; Ray "
            f"{a['ray_overhead_per_task_s']:+.2f} s per task over the pool) | {a['goal']} "
            f"| {_yes(a)} |"
        )
    if "memory" in b:
        lines += _memory_rows(b["memory"])
    if "fanout" in b:
        lines += _peer_table(b["fanout"])
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
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if "fanout" in b:
        f = b["fanout"]
        names = list(f["frameworks"])
        walls = [f["frameworks"][n]["wall_s"] for n in names]
        ax = axes[0]
        ax.barh(
            names, walls, color=["#2b6cb0" if n.startswith("atlas") else "#a0aec0" for n in names]
        )
        critical = f["critical_path_s"]
        ax.axvline(critical, color="#c53030", linestyle="--", label="ATLAS critical path")
        ax.set_xlabel("wall time (s)")
        ax.set_title("Fan-out: 3 teams x 3 steps, 100 ms calls")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
    if "tracing_cost" in b:
        t = b["tracing_cost"]
        ax = axes[1]
        ax.boxplot(
            [t["samples"]["untraced"], t["samples"]["traced"]], tick_labels=["untraced", "traced"]
        )
        ax.set_ylabel("wall time (s)")
        ax.set_title(f"Tracing cost: ratio {t['ratio']:.3f} (goal <= 1.05)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


WORKERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "traced": lambda a: _worker(True, a.runs, a.latency_ms),
    "untraced": lambda a: _worker(False, a.runs, a.latency_ms),
    "fanout-traced": lambda a: workloads.fanout(True, a.latency_ms, a.runs),
    "fanout-untraced": lambda a: workloads.fanout(False, a.latency_ms, a.runs),
    "concurrent": lambda a: workloads.concurrent(True, a.latency_ms, a.tasks, a.runs),
    "first-call": lambda a: workloads.first_call(0),
}
"""What `--worker` runs in a fresh process; each prints one JSON line."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES))
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--latency-ms", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=50, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
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
