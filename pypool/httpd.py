"""The HTTP port (``prometheus_exporter_port``): ``/metrics``, ``/healthz`` and ``/readyz``.

A WSGI server in a daemon thread, so HTTP parsing and metric rendering stay
off the event loop. The probes answer ``200`` or ``503`` with a one-line
plain-text reason, which is what a kubelet and HAProxy's ``option httpchk``
read (``pypool.probes`` says what the answers mean).
"""

from __future__ import annotations

import socket
import threading
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from pypool.probes import Verdict

PROBE_PATHS = ("/healthz", "/readyz")  # the Kubernetes manifests and the HAProxy example use these


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


def _plain(start_response, status: str, text: str) -> list[bytes]:  # type: ignore[no-untyped-def]
    body = (text + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [body]


class HttpEndpoint:
    """Serves ``registry`` at /metrics and the two probes on host:port from a daemon thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 liveness: Callable[[], Verdict], readiness: Callable[[], Verdict]) -> None:
        metrics_app = make_wsgi_app(registry)
        probes = {"/healthz": liveness, "/readyz": readiness}

        def wsgi(environ, start_response):  # type: ignore[no-untyped-def]
            path = environ.get("PATH_INFO", "")
            if path in ("/metrics", "/metrics/"):
                return metrics_app(environ, start_response)
            probe = probes.get(path)
            if probe is None:
                return _plain(start_response, "404 Not Found",
                              "not found: try /metrics, /healthz or /readyz")
            verdict = probe()
            return _plain(start_response, "200 OK" if verdict.ok else "503 Service Unavailable", verdict.reason)

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.httpd = make_server(host, port, wsgi, Server, handler_class=_QuietHandler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="pypool-http", daemon=True)
        self.thread.start()
        self.address = self.httpd.server_address

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
