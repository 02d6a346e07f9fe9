"""The live page: the run store in the browser while the model trains.

``gradwatch ui`` (or :func:`serve_in_background` beside a training script) serves a
page over a store, read-only, on ``127.0.0.1``: the list of runs (running ones marked
live) and, for a run, its loss, per-layer delta RMS and weight-gradient norms as a
layer x step heatmap and as lines, the gradient profile across layers at the latest
step, saturated and dead fractions, findings as they appear, and several runs on one
chart. New rows reach the page as server-sent events; long runs are downsampled on the
server into at most ~1,000 min/max/last buckets per layer (:mod:`gradwatch.ui.queries`).

Layout: :mod:`~gradwatch.ui.queries` (SQL, downsampling), :mod:`~gradwatch.ui.live`
(what changed since a page last looked), :mod:`~gradwatch.ui.app` (Starlette routes),
:mod:`~gradwatch.ui.server` (uvicorn), ``static/`` (the page and the bundled uPlot).
Needs the ``ui`` extra: ``pip install 'gradwatch[ui]'`` (starlette, uvicorn).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from gradwatch.errors import ConfigError

if TYPE_CHECKING:
    from gradwatch.ui.server import UIServer

__all__ = ["serve_in_background", "UIServer", "create_app", "DEFAULT_HOST", "DEFAULT_PORT"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def _server_module():
    try:
        from gradwatch.ui import server
    except ImportError as err:
        raise ConfigError(
            f"the live page needs starlette and uvicorn ({err}); install them with "
            f"pip install 'gradwatch[ui]'"
        ) from err
    return server


def serve_in_background(
    store: str | os.PathLike | None = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> UIServer:
    """Serve the live page of ``store`` from a daemon thread; returns a handle with
    ``.url`` and ``.stop()``. See :func:`gradwatch.ui.server.serve_in_background`.

    Example::

        watcher = gradwatch.watch(model, optimizer)
        print(gradwatch.ui.serve_in_background(watcher.store.path).url)
    """
    return _server_module().serve_in_background(store, host=host, port=port)


def __getattr__(name: str):
    if name == "UIServer":
        return _server_module().UIServer
    if name == "create_app":
        try:
            from gradwatch.ui.app import create_app
        except ImportError:
            _server_module()
            raise
        return create_app
    raise AttributeError(f"module 'gradwatch.ui' has no attribute {name!r}")
