"""ATLAS's side of the benchmarks, each measured in a fresh process (`python -m benchmarks.run
--worker NAME`), so MLflow's process-wide autolog state never leaks from one mode to another.

The fan-out workload is `benchmarks/fixtures/fanout/task.yaml` with `scripted?fanout=3`: a plan of
3 teams x 3 steps, one worker per team, two model calls per step (a tool call, then the answer).
The peers (`benchmarks/peers/`, `benchmarks/handwritten.py`) run the same steps.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FANOUT_TASK = HERE / "fixtures" / "fanout" / "task.yaml"


def _fanout_spec(state: Path, name: str, traced: bool) -> Any:
    from atlas.spec import load_task

    spec = load_task(FANOUT_TASK)
    tracing = spec.tracing.model_copy(update={"enabled": traced, "experiment": "bench"})
    return spec.model_copy(update={"output": str(state / f"{name}.md"), "tracing": tracing})


def _model(latency_ms: int) -> str:
    return f"scripted?fanout=3&latency_ms={latency_ms}"


def fanout(traced: bool, latency_ms: int, runs: int) -> dict[str, Any]:
    """Wall time of the fan-out task, one warm-up run first; with what the critical path is.

    The critical path is the longest chain of model calls that must follow each other: the
    plan, each wave's two calls per step, and the verdict. ATLAS's plan repair makes the writing
    steps wait for research and analysis, so there are two waves.
    """
    import atlas

    times: list[float] = []
    events: list[dict[str, Any]] = []
    result: Any = None
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        atlas.run(
            _fanout_spec(state, "warm", traced), model=_model(latency_ms), state_dir_path=state
        )
        for n in range(runs):
            events.clear()
            started = time.perf_counter()
            result = atlas.run(
                _fanout_spec(state, f"o{n}", traced),
                model=_model(latency_ms),
                state_dir_path=state,
                on_event=events.append,
            )
            times.append(time.perf_counter() - started)
            assert result.status == "passed", result.error
        if traced:
            import mlflow

            mlflow.flush_trace_async_logging()
    waves = sum(e["event"] == "dispatch" for e in events)
    steps = sum(e["event"] == "step_done" and e["status"] == "done" for e in events)
    return {
        "wall_s": times,
        "model_calls": result.model_calls,
        "prompt_tokens": result.input_tokens,
        "completion_tokens": result.output_tokens,
        "steps_done": steps,
        "critical_path_calls": 1 + 2 * waves + 1,
    }


def concurrent(traced: bool, latency_ms: int, tasks: int, rounds: int) -> dict[str, Any]:
    """`tasks` fan-out runs at once with `arun` in one event loop, against one run alone."""
    import atlas

    async def batch(state: Path, n: int, tag: str) -> list[Any]:
        return await asyncio.gather(
            *(
                atlas.arun(
                    _fanout_spec(state, f"{tag}-{i}", traced),
                    model=_model(latency_ms),
                    state_dir_path=state,
                )
                for i in range(n)
            )
        )

    one: list[float] = []
    many: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        asyncio.run(batch(state, 2, "warm"))
        for r in range(rounds):
            for n, into in ((1, one), (tasks, many)) if r % 2 == 0 else ((tasks, many), (1, one)):
                started = time.perf_counter()
                results = asyncio.run(batch(state, n, f"r{r}n{n}"))
                into.append(time.perf_counter() - started)
                assert all(res.status == "passed" for res in results)
    return {"one_s": one, "many_s": many, "tasks": tasks}


def first_call(latency_ms: int) -> dict[str, Any]:
    """Seconds from starting `python -m atlas run` to its first model call, untraced and
    traced (in two fresh processes each, the MLflow store created by an earlier run)."""
    import os
    import subprocess
    import sys

    out: dict[str, list[float]] = {"untraced": [], "traced": []}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        for n in range(5):
            for mode in ("untraced", "traced"):
                log = state / f"calls-{n}-{mode}.jsonl"
                task = state / f"task-{mode}.yaml"
                text = FANOUT_TASK.read_text().replace("../../../", f"{HERE.parent}/")
                text = text.replace(
                    "agents_dir: agents", f"agents_dir: {FANOUT_TASK.parent}/agents"
                )
                text += f"tracing: {{enabled: {str(mode == 'traced').lower()}}}\n"
                task.write_text(text)
                started = time.perf_counter()
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "atlas",
                        "run",
                        str(task),
                        "--model",
                        f"{_model(latency_ms)}&call_log={log}",
                        "--quiet",
                        "--state-dir",
                        str(state),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
                while not (log.exists() and log.stat().st_size > 0):
                    if proc.poll() is not None:
                        raise RuntimeError(f"atlas run exited {proc.returncode} before a call")
                    time.sleep(0.005)
                elapsed = time.perf_counter() - started
                proc.wait(timeout=120)
                if n > 0:  # the first round creates the stores
                    out[mode].append(elapsed)
    return {mode: {"median_s": statistics.median(v), "samples": v} for mode, v in out.items()}
