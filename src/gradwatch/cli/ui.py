"""``gradwatch ui``: the run store as a live page in the browser, read-only."""

from __future__ import annotations

import threading
import webbrowser
from typing import Annotated

import typer
from rich.markup import escape

from gradwatch.cli import app, console, err_console, handle_errors
from gradwatch.cli.runs import StoreOption
from gradwatch.ui import DEFAULT_HOST, DEFAULT_PORT, _server_module


@app.command()
@handle_errors
def ui(
    store: StoreOption = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but 127.0.0.1 exposes your runs.")
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = DEFAULT_PORT,
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open the page in the default browser.")
    ] = False,
) -> None:
    """Serve the runs as a live page: curves update while the model trains (Ctrl-C stops)."""
    server_module = _server_module()
    if not server_module.is_loopback(host):
        err_console.print(
            f"[bold yellow]warning:[/] serving on {escape(host)}: anyone who can reach this machine "
            f"on port {port} can read your runs (read-only); use --host 127.0.0.1 to keep them local",
            highlight=False,
        )
    server = server_module.UIServer(store, host=host, port=port)
    where = "" if server.store_path.exists() else " (no store there yet: runs appear once one is written)"
    console.print(
        f"gradwatch ui: {escape(str(server.store_path))}{escape(where)}\n"
        f"  open [bold]{server.url}[/]  (read-only; Ctrl-C to stop)",
        highlight=False,
    )
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(server.url,)).start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for
        console.print("gradwatch ui: stopped", highlight=False)
