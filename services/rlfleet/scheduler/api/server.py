"""Serving the REST app with uvicorn in a thread of the scheduler process.

The socket is bound here, before uvicorn starts, so the port is known at once
(``http_port = 0`` picks a free one) and a taken port fails the process start
with a clear message instead of inside a thread.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)


class HttpServer:
    def __init__(
        self,
        app: FastAPI,
        *,
        host: str,
        port: int,
        graceful_s: float = 3.0,
        tls_cert_file: str = "",
        tls_key_file: str = "",
        tls_ca_file: str = "",
        tls_client_auth: bool = False,
    ):
        """``tls_cert_file`` + ``tls_key_file`` serve HTTPS only (the same files as the
        scheduler's gRPC TLS); ``tls_client_auth`` requires client certificates signed
        by ``tls_ca_file``."""
        self.app = app
        self.tls = bool(tls_cert_file and tls_key_file)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        # A restarted scheduler takes its old port back while old connections linger.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise SystemExit(f"error: cannot serve the REST API on {host}:{port}: {exc}") from None
        self.sock.listen(128)
        self.host = host
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,  # our JSON logging, set up by the process
            access_log=False,
            timeout_graceful_shutdown=graceful_s,
            lifespan="on",
            ssl_certfile=tls_cert_file or None,
            ssl_keyfile=tls_key_file or None,
            ssl_ca_certs=tls_ca_file or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_auth else ssl.CERT_NONE,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self, *, timeout: float = 30.0) -> HttpServer:
        """Starts serving in a daemon thread; returns once uvicorn accepts requests."""
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="rest-api", daemon=True
        )
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the REST API server did not start; see the log above")
            time.sleep(0.02)
        logger.info("REST API at %s", self.url, extra={"http_port": self.port})
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.app.state.stopping.set()  # event streams end first, or shutdown waits for them
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.sock.close()
