"""The local web server: the dashboard page, `/metrics` for Prometheus, and `/api/state`,
the JSON the page polls. Both the page and `/metrics` are views of one state: a node's
(`NodeState`, for `join --metrics-port`) or the swarm's (`SwarmMonitor`, for `monitor`).

Served by the standard library's threading HTTP server (it parses HTTP; we only route
four paths), bound to 127.0.0.1 unless told otherwise. The page is three static files
with no external resources, so it works offline.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
import math
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from p2ptrain.monitor.metrics import NodeMetrics, outcome_of
from p2ptrain.monitor.swarm_view import SwarmView, build_view

logger = logging.getLogger(__name__)

STATIC_FILES = {"index.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
                "dashboard.css": "text/css; charset=utf-8"}
HISTORY_LEN = 500  # points kept per chart: bounded memory however long the node runs
DEFAULT_HOST = "127.0.0.1"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def json_safe(value):
    """NaN and ±inf become null (JSON has no such numbers; browsers refuse them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------- the server

class DashboardServer:
    """Serves `/`, `/static/*`, `/metrics` and `/api/state` from a thread.

    Lifecycle: `DashboardServer(...).start()` … `shutdown()`; `url` once started.
    """

    def __init__(self, snapshot: Callable[[], dict], registry: CollectorRegistry, host: str = DEFAULT_HOST,
                 port: int = 0):
        self.snapshot = snapshot
        self.registry = registry
        self.host, self.port = host, port
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> "DashboardServer":
        handler = type("Handler", (_Handler,), {"dashboard": self})
        self._server = ThreadingHTTPServer((self.host, self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="p2ptrain-web", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None


class _Handler(BaseHTTPRequestHandler):
    dashboard: DashboardServer
    server_version = "p2ptrain"

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        path = self.path.split("?", 1)[0]
        try:
            if path in ("/", "/index.html"):
                self._send_static("index.html")
            elif path.startswith("/static/") and path[len("/static/"):] in STATIC_FILES:
                self._send_static(path[len("/static/"):])
            elif path == "/metrics":
                self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.dashboard.registry))
            elif path == "/api/state":
                body = json.dumps(json_safe(self.dashboard.snapshot()), allow_nan=False).encode()
                self._send(HTTPStatus.OK, "application/json", body)
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # one failed view must not take the server down
            logger.warning("dashboard: %s failed: %s", path, e)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", f"error: {e}\n".encode())

    def _send_static(self, name: str) -> None:
        body = resources.files("p2ptrain.monitor").joinpath("static", name).read_bytes()
        self._send(HTTPStatus.OK, STATIC_FILES[name], body)

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's signature)
        logger.debug("dashboard: " + format, *args)


# ------------------------------------------------------------- a node's state

class NodeState:
    """What a training node shows: its status, its own bounded history, the swarm's records.

    Feed it the driver's callbacks (`on_step`, `on_round`, which also feed the metrics);
    `start()` refreshes the swarm view from the DHT every `refresh_s` in a thread.
    """

    def __init__(self, node, refresh_s: float = 10.0, registry: Optional[CollectorRegistry] = None):
        self.node = node
        self.refresh_s = refresh_s
        self.rounds: collections.deque = collections.deque(maxlen=HISTORY_LEN)
        self.steps: collections.deque = collections.deque(maxlen=HISTORY_LEN)
        self._view: Optional[SwarmView] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.metrics = NodeMetrics(node, view=lambda: self._view, registry=registry)

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def on_step(self, report) -> None:
        self.metrics.on_step(report)
        with self._lock:
            self.steps.append({"step": report.step, "loss": report.loss, "tokens_per_s": report.tokens_per_s,
                               "time": time.time()})

    def on_round(self, report) -> None:
        self.metrics.on_round(report)
        self._wake.set()  # the peers' records changed with the round: re-read them now
        with self._lock:
            self.rounds.append({
                "round": report.round, "loss": report.loss, "tokens_per_s": report.tokens_per_s,
                "seconds_inner": report.seconds_inner, "seconds_outer": report.seconds_outer,
                "seconds_wall": report.seconds_wall, "time": time.time(),
                "modules": {m: {"outcome": outcome_of(r), "peers": len(r.group) if r.group else 1}
                            for m, r in report.modules.items()}})

    def refresh(self) -> SwarmView:
        peers = self.node.fetch_peers()
        view = build_view(self.node.cfg.run.id, self.node.run_state.grid, peers)
        self._view = view
        return view

    def snapshot(self) -> dict:
        with self._lock:
            rounds, steps = list(self.rounds), list(self.steps)
        view = self._view
        return {"kind": "node", "time": time.time(), "node": self.node.status(), "rounds": rounds,
                "steps": steps, "swarm": view.to_dict() if view is not None else None}

    def start(self) -> "NodeState":
        self.metrics.start()

        def run() -> None:
            while True:
                try:
                    self.refresh()
                except Exception as e:  # the DHT is best effort: keep the last view
                    logger.debug("swarm view refresh failed: %s", e)
                self._wake.wait(self.refresh_s)
                self._wake.clear()
                if self._stop.is_set():
                    return

        self._thread = threading.Thread(target=run, name="p2ptrain-swarm-view", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.metrics.stop()


def serve_node(node, host: str = DEFAULT_HOST, port: int = 0, refresh_s: float = 10.0) -> tuple[NodeState,
                                                                                              DashboardServer]:
    """Start the node's dashboard and /metrics; stop both with `stop_node_server`."""
    state = NodeState(node, refresh_s=refresh_s).start()
    try:
        server = DashboardServer(state.snapshot, state.registry, host, port).start()
    except BaseException:
        state.stop()
        raise
    return state, server


def stop_node_server(state: Optional[NodeState], server: Optional[DashboardServer]) -> None:
    if server is not None:
        server.shutdown()
    if state is not None:
        state.stop()
