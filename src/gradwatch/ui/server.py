"""Serving the live page with uvicorn: in the foreground (``gradwatch ui``) or beside a
training script (:func:`serve_in_background`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import threading
import time
from pathlib import Path

import uvicorn

from gradwatch.errors import ConfigError
from gradwatch.store import _resolve_path
from gradwatch.ui import DEFAULT_HOST, DEFAULT_PORT
from gradwatch.ui.app import create_app

__all__ = ["UIServer", "serve_in_background", "is_loopback", "DEFAULT_HOST", "DEFAULT_PORT"]

_START_TIMEOUT_S = 10.0
_servers: dict[tuple[Path, str, int], UIServer] = {}
_servers_lock = threading.Lock()


class _QuietCancellation(logging.Filter):
    """Drops uvicorn's reports of requests cancelled by a shutdown (a long read in flight
    when the page's server stops is expected, not an error worth a traceback).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        cancelled = isinstance(exc, asyncio.CancelledError) or record.getMessage().startswith("Cancel ")
        return not cancelled


logging.getLogger("uvicorn.error").addFilter(_QuietCancellation())


def is_loopback(host: str) -> bool:
    """True when ``host`` is only reachable from this machine (127.x, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a port in use is a clear error, not an exit."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.create_server(address[:2], family=family, backlog=64)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigError(
            f"cannot serve on {host}:{port} ({reason}); pass another --port (0 picks a free one) "
            f"or a host of this machine"
        ) from err
    sock.set_inheritable(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server that also ends the page streams when asked to exit (Ctrl-C)."""

    def __init__(self, config: uvicorn.Config, stopping: threading.Event) -> None:
        super().__init__(config)
        self._stopping = stopping

    def handle_exit(self, sig: int, frame: object) -> None:  # noqa: D102
        self._stopping.set()
        super().handle_exit(sig, frame)


class UIServer:
    """The live page's server over one store: bound on construction, then :meth:`run`
    (blocking) or :meth:`start` (a daemon thread).

    Args:
        store: the store file or directory (default: ``$GRADWATCH_STORE``, else
            ``./gradwatch-runs/gradwatch.db``); it need not exist yet.
        host: the address to listen on. Default: ``127.0.0.1``, this machine only.
        port: the port; 0 picks a free one. Default: 8765.
        poll_s: how often an open page's stream checks the store for commits.

    Attributes:
        url: the page's address, e.g. ``http://127.0.0.1:8765/``.
        store_path: the database file served.

    Raises:
        ConfigError: the address cannot be bound (port in use, unknown host).
    """

    def __init__(
        self,
        store: str | os.PathLike | None = None,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        poll_s: float = 0.25,
    ) -> None:
        if not 0 <= int(port) <= 65535:
            raise ConfigError(f"port {port}; expected 0 to 65535 (0 picks a free port)")
        self.store_path = _resolve_path(store)
        self.host = host
        self._stopping = threading.Event()
        hosts = ["127.0.0.1", "localhost", "::1", "[::1]"]
        if not is_loopback(host):
            unspecified = host.strip("[]") in ("0.0.0.0", "::", "")
            hosts = ["*"] if unspecified else [*hosts, host, socket.gethostname()]
        self.app = create_app(self.store_path, poll_s=poll_s, allowed_hosts=hosts, stopping=self._stopping)
        self._socket = _bind(host, port)
        self.port = self._socket.getsockname()[1]
        shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host.strip("[]"), host)
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        self.url = f"http://{shown}:{self.port}/"
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2, access_log=False
        )
        self._server = _Server(config, self._stopping)
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """True between start and stop."""
        return self._server.started and not self._server.should_exit

    def run(self) -> None:
        """Serve in this thread until Ctrl-C (or :meth:`stop` from another thread)."""
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._socket.close()

    def start(self) -> UIServer:
        """Serve from a daemon thread; returns once the server accepts connections."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self.run, name="gradwatch-ui", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"the gradwatch ui server on {self.url} did not start; see the log above")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the open pages' streams and stop serving. Idempotent."""
        self._stopping.set()
        self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread is None:
            self._socket.close()
        with _servers_lock:
            for key, server in list(_servers.items()):
                if server is self:
                    del _servers[key]

    def __enter__(self) -> UIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<UIServer {self.url} over {str(self.store_path)!r}, {state}>"


def serve_in_background(
    store: str | os.PathLike | None = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> UIServer:
    """Serve the live page of ``store`` from a daemon thread beside a training script.

    One line next to :func:`gradwatch.watch`::

        page = gradwatch.ui.serve_in_background(watcher.store.path, port=8765)
        print(page.url)  # open it; page.stop() when done (or let the process end)

    Calling it again for the same store, host and port returns the server already
    running (a script that trains several runs keeps one page). Read-only, bound to
    ``127.0.0.1`` unless ``host`` says otherwise.

    Returns:
        a started :class:`UIServer`: ``.url``, ``.stop()``; also a context manager.

    Raises:
        ConfigError: the port is in use by something else, or the host is not valid.
    """
    key = (_resolve_path(store).resolve(), host, int(port))
    with _servers_lock:
        existing = _servers.get(key)
        if existing is not None and existing.running and port != 0:
            return existing
        server = UIServer(store, host=host, port=port).start()
        if port != 0:
            _servers[key] = server
        return server
