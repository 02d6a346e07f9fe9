"""The live page's web application: Starlette routes over a read-only store.

Routes (all GET; anything else is 405, unknown paths and run ids are 404 as JSON):

    /                              the page (static/index.html)
    /static/<file>                 the page's scripts, styles and the bundled uPlot
    /favicon.ico                   204 (no icon; browsers ask for one)
    /api/runs                      {"store", "exists", "runs": [...]}      (StoreReader.runs)
    /api/runs/<id>                 {"run", "layers", "scalars", "findings"}
    /api/runs/<id>/series          downsampled history: {"run", "width", "partial", "metrics", "scalars"}
                                   ?points=1000 (buckets at most), ?metrics=delta_rms,...,
                                   ?quick=1: sampled at bucket ends when the run is long ("partial"),
                                   ?width=W: buckets of W steps (a power of two) instead
    /api/stream                    server-sent events: runs, layers, metrics, scalars, findings
                                   ?since=<updated_at>, ?follow=RUN:WIDTH:AFTER_M:AFTER_S (repeat)

Nothing here writes: the store is opened with ``mode=ro`` and ``query_only``. Files are
served only from the package's ``static`` directory (Starlette's ``StaticFiles``
resolves each path and refuses any outside it). Every response carries a
Content-Security-Policy that allows scripts from this server only, and the Host
header must name this machine (no DNS-rebinding page can read the runs).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradwatch.store import LAYER_METRICS, _resolve_path
from gradwatch.store_reader import StoreReader, not_ready
from gradwatch.ui import queries
from gradwatch.ui.live import Follow, Follower

__all__ = ["create_app", "STATIC_DIR"]

STATIC_DIR = Path(__file__).parent / "static"
_KEEPALIVE_S = 15.0
_MAX_POINTS = 5000
# Above this many layer rows a run's first picture is sampled (queries.layer_samples) and
# the page asks for the exact buckets after drawing it.
_QUICK_ROWS = 200_000
_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


def _plain(value: Any) -> Any:
    """JSON-safe: NaN becomes null, +-inf the strings "inf" and "-inf" (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _json(data: Any, status: int = 200) -> Response:
    body = json.dumps(_plain(data), separators=(",", ":"), allow_nan=False)
    return Response(
        body, status_code=status, media_type="application/json", headers={"cache-control": "no-store"}
    )


class _SecurityHeaders:
    """Adds :data:`_HEADERS` to every HTTP response (plain ASGI: streaming stays streaming)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + _HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _Store:
    """The store's path and a way to run a query function on a fresh read-only connection."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, fn: Callable[[StoreReader], Any]) -> Any:
        """``fn(conn)`` in one read transaction; a store not there (yet) is a 404, one
        that cannot be read a 503 that says why (never a traceback).
        """
        if not self.path.exists():
            raise HTTPException(404, f"no run store at {self.path} yet")
        try:
            with StoreReader(self.path) as reader, reader.snapshot():
                return fn(reader)
        except sqlite3.DatabaseError as err:
            if not_ready(err):
                raise HTTPException(404, f"the store at {self.path} holds no runs yet") from None
            raise HTTPException(503, f"cannot read the store at {self.path}: {err}") from None


class _BucketCache:
    """Exact bucket tables of long runs, kept between requests and extended by the rows
    written since (merging is exact: :func:`queries.merge_tables`), so a long run's full
    read is paid once per server, not once per page load.
    """

    def __init__(self, size: int = 8) -> None:
        self._items: OrderedDict[tuple, tuple[int, np.ndarray]] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def buckets(self, reader: StoreReader, run_id: int, metrics: tuple[str, ...], width: int) -> dict:
        key = (run_id, width, metrics)
        with self._lock:
            after, table = self._items.get(key, (-1, None))
        new, upto = reader.bucket_table(run_id, metrics, width=width, after=after)
        if table is not None:
            new = queries.merge_tables(table, new, width)
        with self._lock:
            self._items[key] = (upto, new)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return {
            "width": width,
            "upto": upto,
            "layers": queries.encode_table(new, metrics, envelope=width > 1),
        }


def _run_id(request: Request) -> int:
    return int(request.path_params["run_id"])


def _missing(run_id: int) -> HTTPException:
    return HTTPException(404, f"no run {run_id} in this store")


def create_app(
    store: str | Path | None = None,
    *,
    poll_s: float = 0.25,
    allowed_hosts: list[str] | None = None,
    stopping: threading.Event | None = None,
) -> Starlette:
    """The ASGI application of ``gradwatch ui`` over a run store, read-only.

    Args:
        store: the store file or directory. Default: ``$GRADWATCH_STORE``, else
            ``./gradwatch-runs/gradwatch.db``. It may not exist yet: the page then
            waits for the first run.
        poll_s: how often each open page's stream asks SQLite whether anything was
            committed (a read of the WAL index, no table read). Default: 0.25 s.
        allowed_hosts: values the Host header may take. Default: this machine's
            loopback names (``127.0.0.1``, ``localhost``, ``::1``).
        stopping: set it to end every open stream (a server shutting down).
    """
    db = _Store(_resolve_path(store))
    cache = _BucketCache()
    stopping = stopping or threading.Event()

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-store"})

    async def list_runs(request: Request) -> Response:
        if not db.path.exists():
            return _json({"store": str(db.path), "exists": False, "runs": []})
        try:
            runs = await run_in_threadpool(db.read, StoreReader.runs)
        except HTTPException as err:
            if err.status_code != 404:
                raise
            runs = []  # created a moment ago: no tables yet
        return _json({"store": str(db.path), "exists": True, "runs": runs})

    async def run_detail(request: Request) -> Response:
        run_id = _run_id(request)

        def read(reader: StoreReader) -> dict[str, Any]:
            info = reader.run(run_id)
            if info is None:
                raise _missing(run_id)
            return {
                "run": info,
                "layers": reader.layers(run_id),
                "scalars": reader.scalar_names(run_id),
                "findings": reader.findings(run_id),
            }

        return _json(await run_in_threadpool(db.read, read))

    async def run_series(request: Request) -> Response:
        run_id = _run_id(request)
        try:
            points = int(request.query_params.get("points", queries.DEFAULT_POINTS))
            quick = request.query_params.get("quick") == "1"
            fixed = int(request.query_params.get("width", 0))
            if fixed < 0 or fixed & (fixed - 1):
                raise ValueError(f"width={fixed}; expected a power of two")
            metrics = request.query_params.get("metrics")
            chosen = (
                queries.PAGE_METRICS
                if metrics is None
                else tuple(dict.fromkeys(m for m in metrics.split(",") if m))
            )
            unknown = [m for m in chosen if m not in LAYER_METRICS]
            if unknown or not chosen:
                raise ValueError(f"metrics={metrics!r}; expected some of {', '.join(LAYER_METRICS)}")
            if not 2 <= points <= _MAX_POINTS:
                raise ValueError(f"points={points}; expected 2 to {_MAX_POINTS}")
        except ValueError as err:
            raise HTTPException(400, str(err)) from None

        def read(reader: StoreReader) -> dict[str, Any]:
            if reader.run(run_id) is None:
                raise _missing(run_id)
            names = reader.scalar_names(run_id)
            width = fixed or queries.bucket_width(max(reader.last_steps(run_id, names)), points)
            long = reader.estimated_rows(run_id, reader.layer_count(run_id)) > _QUICK_ROWS
            partial = quick and long
            if partial:
                metrics_data = queries.layer_samples(reader, run_id, chosen, width=width)
            elif long:
                metrics_data = cache.buckets(reader, run_id, chosen, width)
            else:
                metrics_data = queries.layer_buckets(reader, run_id, chosen, width=width)
            return {
                "run": run_id,
                "width": width,
                "partial": partial,
                "metrics": metrics_data,
                "scalars": queries.scalar_buckets(reader, run_id, names, width=width),
            }

        return _json(await run_in_threadpool(db.read, read))

    async def stream(request: Request) -> Response:
        try:
            follows = [Follow.parse(f) for f in request.query_params.getlist("follow")]
            since_text = request.query_params.get("since")
            since = float(since_text) if since_text else None
            if since is not None and not math.isfinite(since):
                raise ValueError(f"since={since_text!r}; expected a time in seconds")
            follower = Follower(db.path, follows, since)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        return StreamingResponse(
            _events(request, follower, poll_s, stopping),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            return _json({"error": exc.detail}, exc.status_code)
        return _json({"error": "internal error; see the server's log"}, 500)

    hosts = allowed_hosts or ["127.0.0.1", "localhost", "::1", "[::1]"]
    app = Starlette(
        routes=[
            Route("/", index),
            Route("/favicon.ico", lambda request: Response(status_code=204)),
            Route("/api/runs", list_runs),
            Route("/api/runs/{run_id:int}", run_detail),
            Route("/api/runs/{run_id:int}/series", run_series),
            Route("/api/stream", stream),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        middleware=[Middleware(_SecurityHeaders), Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
        exception_handlers={HTTPException: error, Exception: error},
    )
    app.state.store_path = db.path
    app.state.stopping = stopping
    return app


def _event(name: str, data: dict[str, Any]) -> str:
    body = json.dumps(_plain(data), separators=(",", ":"), allow_nan=False)
    return f"event: {name}\ndata: {body}\n\n"


async def _events(
    request: Request, follower: Follower, poll_s: float, stopping: threading.Event
) -> AsyncIterator[str]:
    """The stream of one page: events as the store changes, a comment now and then to
    notice a page that went away.
    """
    quiet = 0.0
    try:
        yield "retry: 1000\n\n"
        while not stopping.is_set():
            events = await run_in_threadpool(follower.poll)
            for name, data in events:
                yield _event(name, data)
            quiet = 0.0 if events else quiet + poll_s
            if quiet >= _KEEPALIVE_S:
                quiet = 0.0
                yield ": keep-alive\n\n"
            if await request.is_disconnected():
                return
            await anyio.sleep(poll_s)
    finally:
        follower.close()
