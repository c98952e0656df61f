"""Run the service with uvicorn: in the foreground until SIGINT / SIGTERM, or in a background thread."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from ..errors import QScorerError

logger = logging.getLogger(__name__)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); errors name the address."""
    if not 0 <= port <= 65535:
        raise QScorerError(f"port must be between 0 and 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise QScorerError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _config(app, access_log: bool) -> uvicorn.Config:
    return uvicorn.Config(app, log_config=None, access_log=access_log, timeout_graceful_shutdown=None)


def serve(
    app, host: str = "127.0.0.1", port: int = 8000, *, sock: socket.socket | None = None, access_log: bool = True
) -> int:
    """Serve ``app`` on ``host:port`` (or on ``sock``, from :func:`listen`) until SIGINT or SIGTERM; requests in
    flight are answered first. Returns 0.

    uvicorn shuts down gracefully on either signal (no new connections, open requests finish, then the app's
    shutdown: the batcher scores what is still queued) and then raises the signal again under the handler that was
    installed before it started; the handler installed here makes that a normal return instead of a kill.
    """
    sock = sock or listen(host, port)
    server = uvicorn.Server(_config(app, access_log))
    stopped_by: list[int] = []
    previous = {signum: signal.signal(signum, lambda received, frame: stopped_by.append(received))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    logger.info("serving on %s (the web page is at /, the API documentation at /docs)", url_of(sock))
    try:
        server.run(sockets=[sock])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopped_by:
        logger.info("stopped by %s", signal.Signals(stopped_by[0]).name)
    return 0


@contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = False) -> Iterator[str]:
    """Serve ``app`` from a daemon thread while the block runs; yields its base URL (a free port by default)."""
    sock = listen(host, port)
    server = uvicorn.Server(_config(app, access_log))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="qscorer-server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise QScorerError("the server thread stopped while starting (see the log)")
        time.sleep(0.01)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
