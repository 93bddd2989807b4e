"""The cafés' stock API: a small HTTP service on 127.0.0.1 that the `check_stock` tool calls.

`python stock_api.py [PORT]` serves it; `run.py` starts it on a free port for a run.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STOCK = {
    "espresso beans": {"on_hand": 12, "unit": "kg", "reorder_at": 20},
    "oat milk": {"on_hand": 48, "unit": "litres", "reorder_at": 30},
    "paper cups": {"on_hand": 900, "unit": "cups", "reorder_at": 1500},
    "croissants": {"on_hand": 60, "unit": "pieces", "reorder_at": 40},
}


class StockHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/stock":
            self.send_error(404)
            return
        query = urllib.parse.parse_qs(url.query).get("q", [""])[0].lower()
        items = [{"item": k, **v} for k, v in STOCK.items() if k in query]
        body = json.dumps({"items": items or [{"item": k, **v} for k, v in STOCK.items()]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(port: int = 0) -> ThreadingHTTPServer:
    """A server bound to 127.0.0.1 (port 0: a free one); call `serve_forever()` on it."""
    return ThreadingHTTPServer(("127.0.0.1", port), StockHandler)


if __name__ == "__main__":
    httpd = serve(int(sys.argv[1]) if len(sys.argv) > 1 else 8765)
    print(f"stock API on http://127.0.0.1:{httpd.server_port}", flush=True)
    httpd.serve_forever()
