"""Demo actions: they fire visibly in the worker log within seconds of start."""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

log = logging.getLogger(__name__)

DEMO_ACTIONS: list[dict[str, Any]] = [
    {
        "name": "demo-hello-every-5s",
        "action_type": "run_task",
        "config": {"task": "demo.hello", "kwargs": {"who": "every five seconds"}},
        "schedule": {"kind": "interval", "every_s": 5},
        "catchup_mode": "skip",
    },
    {
        "name": "demo-add-every-minute",
        "action_type": "run_task",
        "config": {"task": "demo.add", "args": [2, 3]},
        "schedule": {"kind": "cron", "expr": "* * * * *", "timezone": "Europe/Paris"},
    },
    {
        "name": "demo-fail-every-30s",
        "action_type": "run_task",
        "config": {
            "task": "demo.fail",
            "kwargs": {"message": "demo failure (retried, then failed)"},
        },
        "schedule": {"kind": "interval", "every_s": 30},
        "retry_max_attempts": 2,
        "retry_backoff_s": 2,
        "catchup_mode": "skip",
    },
]

# -- the demo pipeline: fan out to two local HTTP calls, join, notify a local webhook ----------

DEMO_SINK_HOST = "127.0.0.1"
DEMO_SINK_PORT = 8765
# The demo webhook is signed with this environment variable's value (scripts/demo.sh sets it).
DEMO_HOOK_KEY_ENV = "DEMO_HOOK_KEY"


def demo_pipeline(port: int = DEMO_SINK_PORT) -> dict[str, Any]:
    base = f"http://{DEMO_SINK_HOST}:{port}"
    return {
        "nodes": [
            {"id": "start", "type": "trigger"},
            {"id": "split", "type": "parallel"},
            {
                "id": "inventory",
                "type": "action",
                "config": {
                    "action_type": "call_api",
                    "config": {"method": "GET", "url": f"{base}/inventory"},
                },
            },
            {
                "id": "pricing",
                "type": "action",
                "config": {
                    "action_type": "call_api",
                    "config": {"method": "GET", "url": f"{base}/pricing"},
                },
            },
            {"id": "gather", "type": "join", "config": {"policy": "all"}},
            {
                "id": "notify",
                "type": "action",
                "config": {
                    "action_type": "send_notification",
                    "config": {
                        "channel": "webhook",
                        "url": f"{base}/hook",
                        "secret_env": DEMO_HOOK_KEY_ENV,
                        "title": "demo pipeline",
                        "text": "{{ nodes.inventory.output.json.items }} items at "
                        "{{ nodes.pricing.output.json.price }} each",
                    },
                },
            },
        ],
        "edges": [
            {"from": "start", "to": "split"},
            {"from": "split", "to": "inventory"},
            {"from": "split", "to": "pricing"},
            {"from": "inventory", "to": "gather"},
            {"from": "pricing", "to": "gather"},
            {"from": "gather", "to": "notify"},
        ],
    }


DEMO_PIPELINE_NAME = "demo-fanout"
DEMO_PIPELINE_ACTION: dict[str, Any] = {
    "name": "demo-pipeline-every-30s",
    "action_type": "execute_pipeline",
    "config": {"pipeline": DEMO_PIPELINE_NAME, "inputs": {"requested_by": "demo"}},
    "schedule": {"kind": "interval", "every_s": 30},
    "catchup_mode": "skip",
}


class _SinkHandler(BaseHTTPRequestHandler):
    """Answers the demo pipeline's calls on loopback, and logs the webhook it receives."""

    answers: ClassVar[dict[str, dict[str, Any]]] = {
        "/inventory": {"items": 42},
        "/pricing": {"price": 9.5, "currency": "EUR"},
    }

    def do_GET(self) -> None:
        body = self.answers.get(self.path)
        if body is None:
            self._reply(404, {"error": "not found"})
            return
        self._reply(200, body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        payload = self.rfile.read(min(length, 64 * 1024)).decode(errors="replace")
        log.warning("demo sink: webhook received on %s: %s", self.path, payload[:300])
        self._reply(200, {"ok": True})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("demo sink: " + format, *args)


def serve_sink(port: int = DEMO_SINK_PORT) -> None:
    """Serve the demo pipeline's endpoints on 127.0.0.1 until interrupted."""
    server = ThreadingHTTPServer((DEMO_SINK_HOST, port), _SinkHandler)
    log.warning("demo sink listening on http://%s:%d", DEMO_SINK_HOST, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
