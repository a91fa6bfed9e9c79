"""The supervisor's small HTTP server: ``/metrics``, ``/healthz`` and ``/readyz``.

On the address of the ``metrics`` option (off by default; keep it on
loopback or a management network: it is unauthenticated, like every
Prometheus exporter).  It lives in the supervisor, so it answers across
reloads and while a dead worker is being replaced.

* ``/metrics``: the Prometheus text format (OpenMetrics when the scraper
  asks for it), rendered by ``prometheus_client``.
* ``/healthz``: liveness, 200 while the supervisor's loop runs.  A
  restarting worker does not fail it (the supervisor handles that, and
  gives up with a non-zero exit after ``restart_attempts``).
* ``/readyz``: readiness for a load balancer, 200; 404 while draining after
  SIGTERM (HAProxy's ``http-check disable-on-404``); 503 with the reasons
  one a line (the rule is in :mod:`.exposition`).

``GET`` and ``HEAD`` are answered; a request has 10 s to arrive whole.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.logs import ROOT

log = logging.getLogger(f"{ROOT}.http")

#: Seconds a client has to send its request.
REQUEST_TIMEOUT = 10.0

INDEX = (b"MilterMonkey\n/metrics  Prometheus metrics\n/healthz  liveness\n"
         b"/readyz   readiness (404 draining, 503 not ready, with the reasons)\n")


def split_host_port(spec: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` (the ``metrics`` option's form)."""
    text = spec.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], family: int, owner: HealthServer) -> None:
        self.address_family = family
        self.owner = owner
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    server_version = "MilterMonkey"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.client_address[0], *args)

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
               head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, head: bool) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, encoder(owner.registry), content_type, head)
            elif path == "/healthz":
                live = owner.live()
                self._reply(200 if live else 503, b"ok\n" if live else b"not live\n", head=head)
            elif path == "/readyz":
                reasons = owner.readiness()
                body = ("ready\n" if not reasons else
                        "not ready\n" + "".join(f"{r}\n" for r in reasons)).encode()
                # Draining answers 404: with HAProxy's ``http-check disable-on-404``
                # the server goes into drain (no new sessions, the open ones go on)
                # instead of down (which ``on-marked-down shutdown-sessions`` cuts).
                draining = bool(reasons) and owner.draining()
                self._reply(200 if not reasons else 404 if draining else 503, body, head=head)
            elif path == "/":
                self._reply(200, INDEX, head=head)
            else:
                self._reply(404, b"not found\n", head=head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            log.exception("http %s %s failed", self.command, path)
            self._reply(500, b"internal error\n", head=head)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)


class HealthServer:
    """Binds at :meth:`start` (a MonkeyError names the option) and serves on its own thread."""

    def __init__(self, spec: str, registry: CollectorRegistry, *,
                 readiness: Callable[[], list[str]], live: Callable[[], bool],
                 draining: Callable[[], bool] = lambda: False) -> None:
        self.spec = spec
        self.registry = registry
        self.readiness = readiness
        self.live = live
        #: True from SIGTERM until exit, while the listener still serves (drain_period).
        self.draining = draining
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        host, port = split_host_port(self.spec)
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 \
                else socket.AF_INET
        except ValueError:
            family = socket.AF_INET  # a name: resolved by bind
        try:
            self._server = _Server((host, port), family, self)
        except OSError as e:
            raise MonkeyError(f"metrics {self.spec!r}: cannot listen: "
                              f"{e.strerror or e}") from None
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.5}, name="mm-http",
                                        daemon=True)
        self._thread.start()
        log.info("metrics and health checks on http://%s/metrics, /healthz, /readyz",
                 self.spec)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
