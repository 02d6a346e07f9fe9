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

import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwatch.store_reader import StoreReader, not_ready
from gradwatch.ui import queries

__all__ = ["Follow", "Follower", "MAX_FOLLOWED"]

MAX_FOLLOWED = 16
_log = logging.getLogger(__name__)
# Run rows are re-read when updated within this many seconds before the newest update
# seen: writers stamp updated_at when they queue a row, not when it commits, so a
# concurrent writer's earlier stamp may become visible after a later one.
_CLOCK_SLACK_S = 5.0
# A run whose process died writes nothing, so liveness is re-checked on a timer too.
_LIVENESS_EVERY_S = 2.0


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
        self._reader: StoreReader | None = None
        self._version: int | None = None
        self._sent_runs: dict[int, tuple] = {}
        self._liveness_at = 0.0

    def close(self) -> None:
        """Close the read-only connection. Idempotent."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _connection(self) -> StoreReader | None:
        if self._reader is None:
            if not self._path.exists():
                return None
            self._reader = StoreReader(self._path)
        return self._reader

    def poll(self) -> list[tuple[str, dict[str, Any]]]:
        """The events since the last call: ``[(name, data)]``, names ``runs``,
        ``layers``, ``metrics``, ``scalars``, ``findings``. Empty when nothing changed.
        """
        try:
            return self._poll()
        except sqlite3.OperationalError as err:
            # not ready (tables not created yet) or briefly unreadable: look again next time
            self.close()
            if not not_ready(err):
                _log.warning("gradwatch ui: reading %s failed (%s); retrying", self._path, err)
            return []

    def _poll(self) -> list[tuple[str, dict[str, Any]]]:
        reader = self._connection()
        if reader is None:
            return []
        version = reader.data_version()
        now = time.monotonic()
        changed = version != self._version
        due = now - self._liveness_at >= _LIVENESS_EVERY_S
        if not (changed or due):
            return []
        self._version = version
        events: list[tuple[str, dict[str, Any]]] = []
        with reader.snapshot():
            if due:
                self._liveness_at = now
            runs = self._changed_runs(reader)
            if runs:
                events.append(("runs", {"runs": runs}))
            if changed:
                for follow in self._follows:
                    events += self._run_events(reader, follow)
        return events

    def _changed_runs(self, reader: StoreReader) -> list[dict[str, Any]]:
        out = []
        for row in reader.runs(since=self._since - _CLOCK_SLACK_S, running=True):
            signature = (row["name"], row["status"], row["last_step"], row["finished_at"])
            if self._sent_runs.get(row["id"]) != signature:
                self._sent_runs[row["id"]] = signature
                out.append(row)
            self._since = max(self._since, row["updated_at"])
        return out

    def _run_events(self, reader: StoreReader, follow: Follow) -> list[tuple[str, dict[str, Any]]]:
        rid = follow.run_id
        events: list[tuple[str, dict[str, Any]]] = []
        n_layers = reader.layer_count(rid)
        if n_layers != follow._n_layers:
            follow._n_layers = n_layers
            events.append(("layers", {"run": rid, "layers": reader.layers(rid)}))
        metrics = queries.layer_buckets(
            reader, rid, queries.PAGE_METRICS, width=follow.width, after=follow.after_metrics
        )
        if metrics["layers"]:
            follow.after_metrics = metrics["upto"]
            events.append(("metrics", {"run": rid, **metrics}))
        names = reader.scalar_names(rid)
        scalars = queries.scalar_buckets(reader, rid, names, width=follow.width, after=follow.after_scalars)
        if scalars["scalars"]:
            follow.after_scalars = scalars["upto"]
            events.append(("scalars", {"run": rid, **scalars}))
        token = reader.findings_token(rid)
        if token != follow._findings:
            first = follow._findings is None
            follow._findings = token
            if not (first and token[0] == 0):
                events.append(("findings", {"run": rid, "findings": reader.findings(rid)}))
        return events
