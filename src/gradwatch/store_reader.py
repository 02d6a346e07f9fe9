"""The store's read-only queries: what the live page and its server read, by name.

:class:`~gradwatch.store.RunStore` writes (through one background writer) and reads
whole DataFrames; a :class:`StoreReader` is a read-only connection (``mode=ro``) for
readers that poll while another process trains: the live page's server and its
event stream. The SQL that knows the store's tables lives in these two modules only.
Each query seeks by primary key: a run's progress, its scalar names, the per-layer
buckets of the steps after a given one, so polling a long run costs a few seeks.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.store import LAYER_METRICS, run_status

__all__ = ["StoreReader", "not_ready", "check_metrics"]

# A scalar is "the run's progress" when one of these names has it (a seek each, where a
# MAX over every scalar name would scan the run's rows).
_PROGRESS_SCALARS = ("loss", "wall_time")


def not_ready(err: sqlite3.DatabaseError) -> bool:
    """True for the error of a store whose file exists but whose tables do not, yet (a
    writer has just created it) or ever (another program's SQLite file).
    """
    return "no such table" in str(err)


def check_metrics(metrics: Sequence[str]) -> list[str]:
    """``metrics`` without repeats; :class:`ValueError` naming any that is not a layer metric."""
    unknown = [m for m in metrics if m not in LAYER_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(LAYER_METRICS)}")
    return list(dict.fromkeys(metrics))


_RUN_COLUMNS = "r.id, r.name, r.status, r.created_at, r.updated_at, r.finished_at, r.pid, r.host"
_LAST_STEP = (
    "MAX(COALESCE((SELECT MAX(step) FROM layer_metrics m WHERE m.run_id = r.id), -1), "
    + ", ".join(
        f"COALESCE((SELECT MAX(step) FROM scalars s WHERE s.run_id = r.id AND s.name = '{n}'), -1)"
        for n in _PROGRESS_SCALARS
    )
    + ") AS last_step"
)


def _run_row(row: tuple) -> dict[str, Any]:
    rid, name, status, created, updated, finished, pid, host, last = row[:9]
    status = run_status(status, host, pid)
    return {
        "id": rid,
        "name": name,
        "status": status,
        "live": status == "running",
        "created_at": created,
        "updated_at": updated,
        "finished_at": finished,
        "last_step": None if last is None or last < 0 else last,
    }


class StoreReader:
    """A read-only connection to a run store, and the queries readers make through it.

    Args:
        path: the store's database file (it must exist).

    Raises:
        sqlite3.OperationalError: the file is missing or not readable.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()
        uri = self.path.as_uri() + "?mode=ro"
        self._conn = sqlite3.connect(uri, uri=True, timeout=10.0, check_same_thread=False,
                                     isolation_level=None)
        self._conn.execute("PRAGMA query_only = 1")

    def close(self) -> None:
        """Close the connection. Idempotent."""
        self._conn.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[StoreReader]:
        """One read transaction: every query inside sees the same committed state."""
        self._conn.execute("BEGIN")
        try:
            yield self
        finally:
            self._conn.execute("COMMIT")

    @property
    def read_only(self) -> bool:
        """True: the connection was opened ``mode=ro`` with ``query_only`` on."""
        return bool(self._one("PRAGMA query_only"))

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first column of the first row of a query."""
        return self._conn.execute(sql, params).fetchone()[0]

    def data_version(self) -> int:
        """SQLite's ``data_version``: it changes when another connection commits."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def layer_count(self, run_id: int) -> int:
        """How many layers the run has (they are added as the watcher first sees them)."""
        return int(self._one("SELECT COUNT(*) FROM layers WHERE run_id = ?", (run_id,)))

    def runs(self, *, since: float | None = None, running: bool = False) -> list[dict[str, Any]]:
        """Runs, oldest first: id, name, status, live, created_at, updated_at, finished_at,
        last_step (one seek per run).

        Args:
            since: only runs updated after this time (``time.time()``), plus with
                ``running`` those still marked running. Default: every run.
            running: with ``since``, add the runs still marked running.
        """
        sql = f"SELECT {_RUN_COLUMNS}, {_LAST_STEP} FROM runs r"
        params: list[Any] = []
        if since is not None:
            sql += " WHERE r.updated_at > ?" + (" OR r.status = 'running'" if running else "")
            params.append(since)
        return [_run_row(row) for row in self._conn.execute(sql + " ORDER BY r.id", params)]

    def run(self, run_id: int) -> dict[str, Any] | None:
        """One run with its config and error, or None when the store has no such id."""
        row = self._conn.execute(
            f"SELECT {_RUN_COLUMNS}, {_LAST_STEP}, r.config, r.error FROM runs r WHERE r.id = ?", (run_id,)
        ).fetchone()
        if row is None:
            return None
        out = _run_row(row)
        try:
            out["config"] = json.loads(row[9])
        except (TypeError, ValueError):
            out["config"] = {}
        out["error"] = row[10]
        return out

    def layers(self, run_id: int) -> list[dict[str, Any]]:
        """The run's layers in forward order: id, name, type, kind, activation."""
        rows = self._conn.execute(
            "SELECT layer_id, name, type, kind, activation FROM layers WHERE run_id = ? ORDER BY layer_id",
            (run_id,),
        )
        keys = ("id", "name", "type", "kind", "activation")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def scalar_names(self, run_id: int) -> list[str]:
        """The run's scalar names, by hopping the primary key (one seek per name, no scan)."""
        names: list[str] = []
        while True:
            row = self._conn.execute(
                "SELECT MIN(name) FROM scalars WHERE run_id = ? AND name > ?",
                (run_id, names[-1] if names else ""),
            ).fetchone()
            if row is None or row[0] is None:
                return names
            names.append(row[0])

    def last_steps(self, run_id: int, names: Iterable[str]) -> tuple[int, int]:
        """The last step with layer metrics and the last step of the named scalars (-1: none)."""
        m = self._one("SELECT MAX(step) FROM layer_metrics WHERE run_id = ?", (run_id,))
        s = -1
        for name in names:
            v = self._one("SELECT MAX(step) FROM scalars WHERE run_id = ? AND name = ?", (run_id, name))
            if v is not None:
                s = max(s, v)
        return (-1 if m is None else m), s

    def bucket_table(
        self, run_id: int, metrics: Sequence[str], *, width: int, after: int = -1
    ) -> tuple[np.ndarray, int]:
        """Per-layer buckets of the steps after ``after`` as one float64 table, and the last
        step read (``after`` if none).

        Columns: ``layer_id, step`` (the bucket's last logged step), then per metric the
        minimum, then per metric the maximum, then per metric the last value (NaN where
        missing); rows by layer, then step. Merge two with
        :func:`gradwatch.ui.queries.merge_tables`, encode one with
        :func:`gradwatch.ui.queries.encode_table`.
        """
        chosen = check_metrics(metrics)
        k = len(chosen)
        upto = self._one("SELECT MAX(step) FROM layer_metrics WHERE run_id = ? AND step > ?", (run_id, after))
        if upto is None:
            return np.empty((0, 2 + 3 * k)), after
        if width == 1:  # a bucket per step: the rows themselves
            columns = ", ".join(chosen)
            sql = f"SELECT layer_id, step, {columns} FROM layer_metrics WHERE run_id = ? AND step > ?"
            params: tuple = (run_id, after)
        else:
            aggregates = ", ".join([f"MIN({m})" for m in chosen] + [f"MAX({m})" for m in chosen])
            sql = (
                f"WITH agg AS (SELECT layer_id, MAX(step) AS last, {aggregates} FROM layer_metrics "
                "WHERE run_id = ? AND step > ? GROUP BY layer_id, step / ?) "
                f"SELECT agg.*, {', '.join(f'm.{m}' for m in chosen)} FROM agg JOIN layer_metrics m "
                "ON m.run_id = ? AND m.step = agg.last AND m.layer_id = agg.layer_id"
            )
            params = (run_id, after, width, run_id)
        rows = self._conn.execute(sql, params).fetchall()
        table = np.array(rows, dtype="<f8").reshape(len(rows), -1)  # None -> NaN
        if width == 1:
            values = table[:, 2:]
            table = np.hstack([table[:, :2], values, values, values])
        return table[np.lexsort((table[:, 1], table[:, 0]))], upto

    def estimated_rows(self, run_id: int, n_layers: int) -> int:
        """Layer rows of a run, from its last two logged steps (two seeks; a COUNT would scan)."""
        last = self._one("SELECT MAX(step) FROM layer_metrics WHERE run_id = ?", (run_id,))
        if last is None:
            return 0
        before = self._one(
            "SELECT MAX(step) FROM layer_metrics WHERE run_id = ? AND step < ?", (run_id, last)
        )
        every = max(1, last - before) if before is not None else 1
        return (last // every + 1) * n_layers

    def findings_token(self, run_id: int) -> tuple[int, int]:
        """(count, largest id) of a run's findings: changes whenever they are rewritten."""
        query = "SELECT COUNT(*), MAX(id) FROM findings WHERE run_id = ?"
        n, top = self._conn.execute(query, (run_id,)).fetchone()
        return int(n), int(top or 0)

    def findings(self, run_id: int) -> list[dict[str, Any]]:
        """A run's findings in stored order, JSON columns decoded."""
        keys = (
            "kind",
            "severity",
            "first_step",
            "last_step",
            "layers",
            "evidence",
            "explanation",
            "prescriptions",
        )
        out = []
        for row in self._conn.execute(
            f"SELECT {', '.join(keys)} FROM findings WHERE run_id = ? ORDER BY id", (run_id,)
        ):
            item = dict(zip(keys, row, strict=True))
            for key, empty in (("layers", []), ("evidence", {}), ("prescriptions", [])):
                try:
                    item[key] = json.loads(item[key]) if item[key] else empty
                except ValueError:
                    item[key] = empty
            out.append(item)
        return out

    def bucket_ends(self, run_id: int, width: int) -> tuple[int | None, list[int]]:
        """The last step with layer metrics (None: none), and each bucket's last logged step,
        newest first: one seek per bucket.
        """
        upto = self._one("SELECT MAX(step) FROM layer_metrics WHERE run_id = ?", (run_id,))
        steps: list[int] = []
        if upto is None:
            return None, steps
        for b in range(upto // width, -1, -1):
            found = self._one(
                "SELECT MAX(step) FROM layer_metrics WHERE run_id = ? AND step >= ? AND step < ?",
                (run_id, b * width, (b + 1) * width),
            )
            if found is not None:
                steps.append(found)
        return upto, steps

    def layer_rows_at(self, run_id: int, metrics: Sequence[str], steps: Sequence[int]) -> np.ndarray:
        """The layer rows at ``steps`` as a float64 table: ``layer_id, step``, then ``metrics``."""
        chosen = check_metrics(metrics)
        rows: list[tuple] = []
        for i in range(0, len(steps), 500):
            part = list(steps[i : i + 500])
            rows += self._conn.execute(
                f"SELECT layer_id, step, {', '.join(chosen)} FROM layer_metrics WHERE run_id = ? "
                f"AND step IN ({', '.join('?' * len(part))})",
                (run_id, *part),
            ).fetchall()
        return np.array(rows, dtype="<f8").reshape(len(rows), 2 + len(chosen))

    def scalar_bucket_rows(self, run_id: int, name: str, *, width: int, after: int = -1) -> list[tuple]:
        """``(bucket, last step, min, max, last value)`` of scalar ``name`` after step ``after``,
        in buckets of ``width`` steps, oldest first.
        """
        sql = (
            "WITH agg AS (SELECT step / ? AS b, MAX(step) AS last, MIN(value), MAX(value) FROM scalars "
            "WHERE run_id = ? AND name = ? AND step > ? GROUP BY b) "
            "SELECT agg.*, s.value FROM agg JOIN scalars s "
            "ON s.run_id = ? AND s.name = ? AND s.step = agg.last ORDER BY agg.b"
        )
        return self._conn.execute(sql, (width, run_id, name, after, run_id, name)).fetchall()
