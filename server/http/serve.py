"""The HTTP API's server: uvicorn on the gRPC server's event loop, on a socket bound here (so a taken port
fails the start with the flag to change), with the same TLS files as gRPC. Signals stay the process's own
(main.py drains both transports on SIGTERM)."""

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn

from ..config import ServerConfig

log = logging.getLogger(__name__)

STOP_GRACE_S = 1      # after the drain, a second for connections to take their last bytes


class _OnOurLoop(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM is main.py's to handle."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    def __init__(self, config: ServerConfig, app):
        self.host = config.http_host or config.host
        self.requested_port = config.http_port
        tls = {}
        if config.tls_cert:
            tls = dict(ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key)
            if config.tls_client_ca:
                tls.update(ssl_ca_certs=config.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self.scheme = "https" if tls else "http"
        self.uvicorn = _OnOurLoop(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", ws="none",
                                                 timeout_graceful_shutdown=STOP_GRACE_S, server_header=False,
                                                 **tls))
        self.task: asyncio.Task | None = None
        self.port = 0

    async def start(self) -> int:
        """Listens; returns the port. Raises OSError naming --http-port when it is taken."""
        sock = self._bind()
        self.port = sock.getsockname()[1]
        self.task = asyncio.create_task(self.uvicorn.serve(sockets=[sock]))
        while not self.uvicorn.started:
            if self.task.done():          # it could not start (an unreadable certificate, say)
                self.task.result()
                raise OSError(f"the HTTP API on {self.host}:{self.port} did not start")
            await asyncio.sleep(0.01)
        return self.port

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise OSError(f"could not listen on {self.host}:{self.requested_port} for the HTTP API ({exc.strerror}); "
                          "choose another --http-port (0 = any free one) or --no-http") from None
        sock.listen(2048)
        sock.setblocking(False)
        return sock

    async def stop(self) -> None:
        if self.task is None:
            return
        self.uvicorn.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None
