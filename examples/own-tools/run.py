"""Run the own-tools example: start the stock API on 127.0.0.1, run the task, stop the API.

    python examples/own-tools/run.py                   # the default model (offline: local)
    python examples/own-tools/run.py --model scripted  # a dry run

Arguments are passed to `python -m atlas run task.yaml`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from stock_api import serve  # noqa: E402


def main(argv: list[str]) -> int:
    httpd = serve(0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    env = {**os.environ, "STOCK_API_URL": f"http://127.0.0.1:{httpd.server_port}"}
    try:
        command = [sys.executable, "-m", "atlas", "run", str(HERE / "task.yaml"), *argv]
        return subprocess.call(command, env=env)
    finally:
        httpd.shutdown()
        httpd.server_close()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
