"""`atlas batch` throughput: the fan-out task (`fixtures/fanout/task.yaml`, 100 ms per model call)
as N task files, through the local executor with 1 and 2 workers and through a local Ray
cluster with 2, each a fresh `python -m atlas batch` measured end to end (pool or cluster start
included). Tracing on (the fixture has memory off). Interleaved over rounds; ratios within a round.

Scaling efficiency = throughput(2 workers) / (2 x throughput(1 worker)). The per-task overhead
of Ray over the local pool = (wall on Ray - wall on the local pool with the same workers) / N.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FANOUT_TASK = HERE / "fixtures" / "fanout" / "task.yaml"


def _task_files(folder: Path, n: int) -> list[Path]:
    """N copies of the fan-out task, each with its own output, its inputs and agents where the
    fixture has them."""
    data = yaml.safe_load(FANOUT_TASK.read_text())
    source = FANOUT_TASK.parent
    data["inputs"] = {
        kind: [str((source / p).resolve()) for p in patterns]
        for kind, patterns in data.get("inputs", {}).items()
    }
    data["agents_dir"] = str((source / data["agents_dir"]).resolve())
    files = []
    for i in range(n):
        task = folder / f"task{i:03d}.yaml"
        task.write_text(yaml.safe_dump({**data, "output": f"out/{i:03d}.md"}))
        files.append(task)
    return files


def _batch(files: list[Path], state: Path, executor: str, workers: int, latency_ms: int) -> float:
    command = [
        sys.executable,
        "-m",
        "atlas",
        "batch",
        *map(str, files),
        "--executor",
        executor,
        "--max-concurrency",
        str(workers),
        "--model",
        f"scripted?fanout=3&latency_ms={latency_ms}",
        "--state-dir",
        str(state),
        "--quiet",
    ]
    started = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        tail = " | ".join(out.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"atlas batch --executor {executor} failed: {tail}")
    return wall


def bench_batch(rounds: int = 1, tasks: int = 100, latency_ms: int = 100) -> dict[str, Any]:
    modes = [("local", 1), ("local", 2), ("ray", 2)]
    walls: dict[str, list[float]] = {f"{e}-{w}": [] for e, w in modes}
    for _ in range(rounds):
        for executor, workers in modes:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                files = _task_files(folder, tasks)
                walls[f"{executor}-{workers}"].append(
                    _batch(files, folder / "state", executor, workers, latency_ms)
                )
                shutil.rmtree(folder, ignore_errors=True)
    wall = {name: statistics.median(values) for name, values in walls.items()}
    rate = {name: tasks / value for name, value in wall.items()}
    efficiency = rate["local-2"] / (2 * rate["local-1"])
    return {
        "workload": f"{tasks} fan-out task files (20 calls of {latency_ms} ms each), traced",
        "wall_s": {k: round(v, 2) for k, v in wall.items()},
        "tasks_per_s": {k: round(v, 3) for k, v in rate.items()},
        "speedup_2_workers": round(rate["local-2"] / rate["local-1"], 2),
        "scaling_efficiency": round(efficiency, 2),
        "ray_overhead_per_task_s": round((wall["ray-2"] - wall["local-2"]) / tasks, 3),
        "goal": "2 workers >= 1.8x one",
        "met": rate["local-2"] / rate["local-1"] >= 1.8,
        "samples": walls,
    }
