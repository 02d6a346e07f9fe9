"""Following a store as it is written: what one open page has not seen yet.

A :class:`Follower` belongs to one server-sent-events stream. Each :meth:`~Follower.poll`
first asks SQLite whether anything was committed since the last look
(``PRAGMA data_version``, answered from the WAL index without reading a table); only
then does it read the run list's changes and, for each followed run, the rows after
its cursors: one primary-key seek per question, so an idle store costs nothing and a
busy one costs the new rows. Every event it emits is idempotent on the page (a bucket
merged twice, a run row applied twice, a finding list replaced), so a reconnect that
replays a little is harmless.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwatch.ui import queries

__all__ = ["Follow", "Follower", "snapshot", "MAX_FOLLOWED"]

MAX_FOLLOWED = 16
_log = logging.getLogger(__name__)
# Run rows are re-read when updated within this many seconds before the newest update
# seen: writers stamp updated_at when they queue a row, not when it commits, so a
# concurrent writer's earlier stamp may become visible after a later one.
_CLOCK_SLACK_S = 5.0
# A run whose process died writes nothing, so liveness is re-checked on a timer too.
_LIVENESS_EVERY_S = 2.0


@contextlib.contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One read transaction: every query inside sees the same committed state."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


@dataclass
class Follow:
    """One followed run and what the page already has of it.

    Attributes:
        run_id: the run.
        width: the page's bucket width in steps (a power of two).
        after_metrics: the last step of layer metrics the page has (-1: none).
        after_scalars: the last step of scalars the page has (-1: none).
    """

    run_id: int
    width: int = 1
    after_metrics: int = -1
    after_scalars: int = -1
    _n_layers: int = field(default=-1, repr=False)
    _findings: tuple[int, int] | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, text: str) -> Follow:
        """``"RUN[:WIDTH[:AFTER_METRICS[:AFTER_SCALARS]]]"``, e.g. ``"3:8:1200:1207"``."""
        parts = text.split(":")
        if not 1 <= len(parts) <= 4 or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(
                f"follow={text!r}; expected RUN[:WIDTH[:AFTER_METRICS[:AFTER_SCALARS]]] integers"
            )
        values = [int(p) for p in parts]
        follow = cls(*values)
        if follow.width < 1 or follow.width & (follow.width - 1):
            raise ValueError(f"width {follow.width} in follow={text!r}; expected a power of two")
        return follow


class Follower:
    """What one page follows: the run list, and a few runs in detail.

    Args:
        path: the store's database file (it may not exist yet).
        follows: the runs to follow, at most :data:`MAX_FOLLOWED`.
        since: the newest ``updated_at`` in the page's run list (None: send every run
            still marked running, and runs updated from now on).
    """

    def __init__(self, path: Path, follows: list[Follow], since: float | None = None) -> None:
        if len(follows) > MAX_FOLLOWED:
            raise ValueError(f"{len(follows)} runs to follow; at most {MAX_FOLLOWED}")
        self._path = path
        self._follows = follows
        self._since = since if since is not None else time.time()
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None
        self._sent_runs: dict[int, tuple] = {}
        self._liveness_at = 0.0

    def close(self) -> None:
        """Close the read-only connection. Idempotent."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is None:
            if not self._path.exists():
                return None
            self._conn = queries.connect(self._path)
        return self._conn

    def poll(self) -> list[tuple[str, dict[str, Any]]]:
        """The events since the last call: ``[(name, data)]``, names ``runs``,
        ``layers``, ``metrics``, ``scalars``, ``findings``. Empty when nothing changed.
        """
        try:
            return self._poll()
        except sqlite3.OperationalError as err:
            # not ready (tables not created yet) or briefly unreadable: look again next time
            self.close()
            if not queries.not_ready(err):
                _log.warning("gradwatch ui: reading %s failed (%s); retrying", self._path, err)
            return []

    def _poll(self) -> list[tuple[str, dict[str, Any]]]:
        conn = self._connection()
        if conn is None:
            return []
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        now = time.monotonic()
        changed = version != self._version
        due = now - self._liveness_at >= _LIVENESS_EVERY_S
        if not (changed or due):
            return []
        self._version = version
        events: list[tuple[str, dict[str, Any]]] = []
        with snapshot(conn):
            if due:
                self._liveness_at = now
            runs = self._changed_runs(conn)
            if runs:
                events.append(("runs", {"runs": runs}))
            if changed:
                for follow in self._follows:
                    events += self._run_events(conn, follow)
        return events

    def _changed_runs(self, conn: sqlite3.Connection) -> list[dict[str, Any]]:
        out = []
        for row in queries.runs(conn, since=self._since - _CLOCK_SLACK_S, running=True):
            signature = (row["name"], row["status"], row["last_step"], row["finished_at"])
            if self._sent_runs.get(row["id"]) != signature:
                self._sent_runs[row["id"]] = signature
                out.append(row)
            self._since = max(self._since, row["updated_at"])
        return out

    def _run_events(self, conn: sqlite3.Connection, follow: Follow) -> list[tuple[str, dict[str, Any]]]:
        rid = follow.run_id
        events: list[tuple[str, dict[str, Any]]] = []
        n_layers = conn.execute("SELECT COUNT(*) FROM layers WHERE run_id = ?", (rid,)).fetchone()[0]
        if n_layers != follow._n_layers:
            follow._n_layers = n_layers
            events.append(("layers", {"run": rid, "layers": queries.layers(conn, rid)}))
        metrics = queries.layer_buckets(
            conn, rid, queries.PAGE_METRICS, width=follow.width, after=follow.after_metrics
        )
        if metrics["layers"]:
            follow.after_metrics = metrics["upto"]
            events.append(("metrics", {"run": rid, **metrics}))
        names = queries.scalar_names(conn, rid)
        scalars = queries.scalar_buckets(conn, rid, names, width=follow.width, after=follow.after_scalars)
        if scalars["scalars"]:
            follow.after_scalars = scalars["upto"]
            events.append(("scalars", {"run": rid, **scalars}))
        token = queries.findings_token(conn, rid)
        if token != follow._findings:
            first = follow._findings is None
            follow._findings = token
            if not (first and token[0] == 0):
                events.append(("findings", {"run": rid, "findings": queries.findings(conn, rid)}))
        return events
