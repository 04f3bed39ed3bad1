"""Process plumbing for the entry points: signals, the metrics/health endpoint, exit codes."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from capture.common.errors import ConfigError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


def install_stop_signals(stop: threading.Event) -> None:
    """SIGTERM/SIGINT set ``stop``; a second SIGINT exits at once (a person who means it)."""

    def handle(signum: int, _frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            log.warning("second interrupt: exiting without a clean shutdown")
            raise SystemExit(130)
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


class MetricsServer:
    """Serves ``/metrics`` from a registry and ``/healthz`` from a health check, on one port.

    ``/healthz`` answers 200 or 503 with a small JSON body, so a compose healthcheck and a
    person with curl both see why a service is unhealthy.
    """

    def __init__(self, registry: CollectorRegistry, health: HealthCheck,
                 host: str = "0.0.0.0", port: int = 0) -> None:  # noqa: S104 - container port
        self._registry = registry
        self._health = health
        self._host = host
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.server_address[1])

    def start(self) -> None:
        registry, health = self._registry, self._health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path == "/healthz":
                    ok, detail = health()
                    body = json.dumps({"ok": ok, **detail}).encode()
                    self._reply(200 if ok else 503, "application/json", body)
                else:
                    self._reply(404, "text/plain", b"try /metrics or /healthz\n")

            def _reply(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # scrapes every few seconds would drown the log

        self._server = ThreadingHTTPServer((self._host, self._port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            name="metrics-http", target=self._server.serve_forever, daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run ``main`` and exit with its status; configuration errors become one line and status 2."""
    try:
        code = main(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def check_health_url(url: str, timeout: float = 3.0) -> int:
    """Exit status for a container healthcheck: 0 when ``url`` answers 200."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
            return EXIT_OK if response.status == 200 else EXIT_FAILURE
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
