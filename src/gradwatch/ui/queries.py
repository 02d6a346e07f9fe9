"""What the live page reads: read-only SQLite queries over the run store, downsampled.

Everything here is a plain function of an open read-only connection (:func:`connect`),
so it is testable without a server. Long series are cut into buckets of
``width`` steps, a power of two, aligned to multiples of the width (bucket
``b`` holds steps ``b * width`` to ``b * width + width - 1``). Each bucket keeps,
per layer and metric, the minimum, the maximum and the last value (the value at
the bucket's last logged step). These three are exact under merging: a bucket of
width ``2w`` is the merge of its two halves of width ``w``, and merging a bucket
with new rows of the same bucket gives the bucket over all rows. So the page can
take a downsampled history, add the buckets of newly written steps as they stream
in, and halve its resolution when the series grows, without asking again.

Arrays travel as base64 little-endian ``float64`` (NaN for missing; steps too): a
third of the bytes of JSON numbers and no parsing, and no precision lost for the
1e-30 gradients of a deep sigmoid stack.
"""

from __future__ import annotations

import base64
import json
import math
import socket
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.store import LAYER_METRICS, _pid_alive

__all__ = [
    "DEFAULT_POINTS",
    "PAGE_METRICS",
    "connect",
    "not_ready",
    "bucket_width",
    "runs",
    "run",
    "layers",
    "scalar_names",
    "last_steps",
    "layer_buckets",
    "bucket_table",
    "merge_tables",
    "encode_table",
    "layer_samples",
    "estimated_rows",
    "scalar_buckets",
    "findings",
    "findings_token",
]

DEFAULT_POINTS = 1000
# What the page draws: the back-propagated error and weight gradients of parameterised
# layers, the saturated and dead fractions of activations.
PAGE_METRICS = ("delta_rms", "grad_norm", "saturated_frac", "dead_frac")
# A scalar is "the run's progress" when one of these names has it (a seek each, where a
# MAX over every scalar name would scan the run's rows).
_PROGRESS_SCALARS = ("loss", "wall_time")


def connect(path: str | Path) -> sqlite3.Connection:
    """Open the store read-only (``mode=ro``): no statement through it can write.

    Args:
        path: the store's database file (it must exist).

    Raises:
        sqlite3.OperationalError: the file is missing or not readable.
    """
    uri = Path(path).expanduser().resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=10.0, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA query_only = 1")
    return conn


def not_ready(err: sqlite3.DatabaseError) -> bool:
    """True for the error of a store whose file exists but whose tables do not, yet (a
    writer has just created it) or ever (another program's SQLite file).
    """
    return "no such table" in str(err)


def bucket_width(last_step: int | None, points: int = DEFAULT_POINTS) -> int:
    """The smallest power of two ``w`` such that steps ``0..last_step`` fill at most
    ``points`` buckets of ``w`` steps.
    """
    if last_step is None or last_step < 0:
        return 1
    need = (int(last_step) + 1) / max(1, int(points))
    return 1 if need <= 1 else 1 << math.ceil(math.log2(need))


def _f64(values: Iterable[float | None] | np.ndarray) -> str:
    if not isinstance(values, np.ndarray):
        values = [math.nan if v is None else v for v in values]
    arr = np.ascontiguousarray(values, dtype="<f8")
    return base64.b64encode(arr.tobytes()).decode("ascii")


def _status(status: str, pid: int | None, host: str | None, here: str) -> str:
    """``interrupted`` for a run still marked running whose process is gone from this host
    (the rule of :meth:`RunStore.runs`).
    """
    if status == "running" and host == here and not _pid_alive(pid):
        return "interrupted"
    return status


_RUN_COLUMNS = "r.id, r.name, r.status, r.created_at, r.updated_at, r.finished_at, r.pid, r.host"
_LAST_STEP = (
    "MAX(COALESCE((SELECT MAX(step) FROM layer_metrics m WHERE m.run_id = r.id), -1), "
    + ", ".join(
        f"COALESCE((SELECT MAX(step) FROM scalars s WHERE s.run_id = r.id AND s.name = '{n}'), -1)"
        for n in _PROGRESS_SCALARS
    )
    + ") AS last_step"
)


def _run_row(row: tuple, here: str) -> dict[str, Any]:
    rid, name, status, created, updated, finished, pid, host, last = row[:9]
    status = _status(status, pid, host, here)
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


def runs(
    conn: sqlite3.Connection, *, since: float | None = None, running: bool = False
) -> list[dict[str, Any]]:
    """Runs, oldest first: id, name, status, live, created_at, updated_at, finished_at,
    last_step (one seek per run).

    Args:
        conn: a connection from :func:`connect`.
        since: only runs updated after this time (``time.time()``), plus with
            ``running`` those still marked running. Default: every run.
        running: with ``since``, add the runs still marked running.
    """
    sql = f"SELECT {_RUN_COLUMNS}, {_LAST_STEP} FROM runs r"
    params: list[Any] = []
    if since is not None:
        sql += " WHERE r.updated_at > ?" + (" OR r.status = 'running'" if running else "")
        params.append(since)
    here = socket.gethostname()
    return [_run_row(row, here) for row in conn.execute(sql + " ORDER BY r.id", params)]


def run(conn: sqlite3.Connection, run_id: int) -> dict[str, Any] | None:
    """One run with its config and error, or None when the store has no such id."""
    row = conn.execute(
        f"SELECT {_RUN_COLUMNS}, {_LAST_STEP}, r.config, r.error FROM runs r WHERE r.id = ?", (run_id,)
    ).fetchone()
    if row is None:
        return None
    out = _run_row(row, socket.gethostname())
    try:
        out["config"] = json.loads(row[9])
    except (TypeError, ValueError):
        out["config"] = {}
    out["error"] = row[10]
    return out


def layers(conn: sqlite3.Connection, run_id: int) -> list[dict[str, Any]]:
    """The run's layers in forward order: id, name, type, kind, activation."""
    rows = conn.execute(
        "SELECT layer_id, name, type, kind, activation FROM layers WHERE run_id = ? ORDER BY layer_id",
        (run_id,),
    )
    keys = ("id", "name", "type", "kind", "activation")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def scalar_names(conn: sqlite3.Connection, run_id: int) -> list[str]:
    """The run's scalar names, by hopping the primary key (one seek per name, no scan)."""
    names: list[str] = []
    while True:
        row = conn.execute(
            "SELECT MIN(name) FROM scalars WHERE run_id = ? AND name > ?",
            (run_id, names[-1] if names else ""),
        ).fetchone()
        if row is None or row[0] is None:
            return names
        names.append(row[0])


def last_steps(conn: sqlite3.Connection, run_id: int, names: Iterable[str]) -> tuple[int, int]:
    """The last step with layer metrics and the last step of the named scalars (-1: none)."""
    m = conn.execute("SELECT MAX(step) FROM layer_metrics WHERE run_id = ?", (run_id,)).fetchone()[0]
    s = -1
    for name in names:
        v = conn.execute(
            "SELECT MAX(step) FROM scalars WHERE run_id = ? AND name = ?", (run_id, name)
        ).fetchone()[0]
        if v is not None:
            s = max(s, v)
    return (-1 if m is None else m), s


def _check_metrics(metrics: Sequence[str]) -> list[str]:
    unknown = [m for m in metrics if m not in LAYER_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(LAYER_METRICS)}")
    return list(dict.fromkeys(metrics))


def bucket_table(
    conn: sqlite3.Connection, run_id: int, metrics: Sequence[str], *, width: int, after: int = -1
) -> tuple[np.ndarray, int]:
    """Per-layer buckets of the steps after ``after`` as one float64 table, and the last
    step read (``after`` if none).

    Columns: ``layer_id, step`` (the bucket's last logged step), then per metric the
    minimum, then per metric the maximum, then per metric the last value (NaN where
    missing); rows by layer, then step. Merge two with :func:`merge_tables`, encode one
    with :func:`encode_table`.
    """
    chosen = _check_metrics(metrics)
    k = len(chosen)
    upto = conn.execute(
        "SELECT MAX(step) FROM layer_metrics WHERE run_id = ? AND step > ?", (run_id, after)
    ).fetchone()[0]
    if upto is None:
        return np.empty((0, 2 + 3 * k)), after
    if width == 1:  # a bucket per step: the rows themselves
        sql = f"SELECT layer_id, step, {', '.join(chosen)} FROM layer_metrics WHERE run_id = ? AND step > ?"
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
    rows = conn.execute(sql, params).fetchall()
    table = np.array(rows, dtype="<f8").reshape(len(rows), -1)  # None -> NaN
    if width == 1:
        values = table[:, 2:]
        table = np.hstack([table[:, :2], values, values, values])
    return table[np.lexsort((table[:, 1], table[:, 0]))], upto


def merge_tables(a: np.ndarray, b: np.ndarray, width: int) -> np.ndarray:
    """Two bucket tables of one run as one: per layer and bucket of ``width`` steps, the
    minimum of the minima, the maximum of the maxima, the last value of the later step.
    """
    both = np.vstack([a, b])
    if not len(both):
        return both
    k = (both.shape[1] - 2) // 3
    both = both[np.lexsort((both[:, 1], both[:, 1] // width, both[:, 0]))]
    bucket = both[:, 1] // width
    first = np.ones(len(both), dtype=bool)
    first[1:] = (both[1:, 0] != both[:-1, 0]) | (bucket[1:] != bucket[:-1])
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], len(both)) - 1
    low = np.fmin.reduceat(both[:, 2 : 2 + k], starts, axis=0)  # fmin/fmax skip NaN
    high = np.fmax.reduceat(both[:, 2 + k : 2 + 2 * k], starts, axis=0)
    return np.hstack([both[ends, :2], low, high, both[ends, 2 + 2 * k :]])


def encode_table(table: np.ndarray, metrics: Sequence[str], *, envelope: bool) -> list[dict[str, Any]]:
    """A bucket table as the page reads it: ``[{"id", "steps", <metric>: {"last", "min",
    "max"}}]`` in base64 float64; a metric a layer never has is left out.
    """
    k = len(metrics)
    entries: list[dict[str, Any]] = []
    if not len(table):
        return entries
    layer_ids, starts = np.unique(table[:, 0], return_index=True)
    for lid, a, b in zip(layer_ids, starts, [*starts[1:], len(table)], strict=True):
        entry: dict[str, Any] = {"id": int(lid), "steps": _f64(table[a:b, 1])}
        for i, metric in enumerate(metrics):
            low, high, last = table[a:b, 2 + i], table[a:b, 2 + k + i], table[a:b, 2 + 2 * k + i]
            if np.isnan(last).all() and np.isnan(low).all():
                continue  # a metric this layer does not have (weights of an activation, ...)
            series = {"last": _f64(last)}
            if envelope:
                series["min"], series["max"] = _f64(low), _f64(high)
            entry[metric] = series
        entries.append(entry)
    return entries


def layer_buckets(
    conn: sqlite3.Connection,
    run_id: int,
    metrics: Sequence[str] = PAGE_METRICS,
    *,
    width: int,
    after: int = -1,
) -> dict[str, Any]:
    """Per-layer metrics of steps after ``after``, in buckets of ``width`` steps.

    Returns ``{"width", "upto", "layers": [{"id", "steps", <metric>: {"last", "min",
    "max"}}]}``: ``steps`` is each bucket's last logged step, the metric arrays
    (float64, base64, NaN where missing) its last value, minimum and maximum;
    ``min``/``max`` are left out when ``width`` is 1 (they equal ``last``), and a
    metric is left out of a layer that never has it. ``upto`` is the last step
    included (``after`` when there is nothing new).
    """
    chosen = _check_metrics(metrics)
    table, upto = bucket_table(conn, run_id, chosen, width=width, after=after)
    return {"width": width, "upto": upto, "layers": encode_table(table, chosen, envelope=width > 1)}


def estimated_rows(conn: sqlite3.Connection, run_id: int, n_layers: int) -> int:
    """Layer rows of a run, from its last two logged steps (two seeks; a COUNT would scan)."""
    last = conn.execute("SELECT MAX(step) FROM layer_metrics WHERE run_id = ?", (run_id,)).fetchone()[0]
    if last is None:
        return 0
    before = conn.execute(
        "SELECT MAX(step) FROM layer_metrics WHERE run_id = ? AND step < ?", (run_id, last)
    ).fetchone()[0]
    every = max(1, last - before) if before is not None else 1
    return (last // every + 1) * n_layers


def layer_samples(
    conn: sqlite3.Connection, run_id: int, metrics: Sequence[str] = PAGE_METRICS, *, width: int
) -> dict[str, Any]:
    """The rows at each bucket's last logged step only: what :func:`layer_buckets` gives
    less the minimum and maximum, at one seek per bucket instead of a read of every row.

    A first picture of a long run; the full buckets merge into it exactly later (their
    minimum is at most, their maximum at least the sampled value, and "last" is the same).
    """
    chosen = _check_metrics(metrics)
    upto = conn.execute("SELECT MAX(step) FROM layer_metrics WHERE run_id = ?", (run_id,)).fetchone()[0]
    out: dict[str, Any] = {"width": width, "upto": -1 if upto is None else upto, "layers": []}
    if upto is None:
        return out
    steps = []
    for b in range(upto // width, -1, -1):
        found = conn.execute(
            "SELECT MAX(step) FROM layer_metrics WHERE run_id = ? AND step >= ? AND step < ?",
            (run_id, b * width, (b + 1) * width),
        ).fetchone()[0]
        if found is not None:
            steps.append(found)
    rows: list[tuple] = []
    for i in range(0, len(steps), 500):
        part = steps[i : i + 500]
        rows += conn.execute(
            f"SELECT layer_id, step, {', '.join(chosen)} FROM layer_metrics WHERE run_id = ? "
            f"AND step IN ({', '.join('?' * len(part))})",
            (run_id, *part),
        ).fetchall()
    table = np.array(rows, dtype="<f8").reshape(len(rows), -1)
    table = table[np.lexsort((table[:, 1], table[:, 0]))]
    values = table[:, 2:]
    out["layers"] = encode_table(np.hstack([table[:, :2], values, values, values]), chosen, envelope=False)
    return out


def scalar_buckets(
    conn: sqlite3.Connection,
    run_id: int,
    names: Sequence[str],
    *,
    width: int,
    after: int = -1,
) -> dict[str, Any]:
    """The named scalars of steps after ``after``, in buckets of ``width`` steps.

    Returns ``{"width", "upto", "scalars": [{"name", "steps", "last", "min", "max"}]}``
    in the encoding of :func:`layer_buckets`.
    """
    out: dict[str, Any] = {"width": width, "upto": after, "scalars": []}
    sql = (
        "WITH agg AS (SELECT step / ? AS b, MAX(step) AS last, MIN(value), MAX(value) FROM scalars "
        "WHERE run_id = ? AND name = ? AND step > ? GROUP BY b) "
        "SELECT agg.*, s.value FROM agg JOIN scalars s ON s.run_id = ? AND s.name = ? AND s.step = agg.last "
        "ORDER BY agg.b"
    )
    for name in names:
        rows = conn.execute(sql, (width, run_id, name, after, run_id, name)).fetchall()
        if not rows:
            continue
        _, steps, lo, hi, last = zip(*rows, strict=True)
        entry: dict[str, Any] = {"name": name, "steps": _f64(steps), "last": _f64(last)}
        if width > 1:
            entry["min"], entry["max"] = _f64(lo), _f64(hi)
        out["scalars"].append(entry)
        out["upto"] = max(out["upto"], steps[-1])
    return out


def findings_token(conn: sqlite3.Connection, run_id: int) -> tuple[int, int]:
    """(count, largest id) of a run's findings: changes whenever they are rewritten."""
    n, top = conn.execute("SELECT COUNT(*), MAX(id) FROM findings WHERE run_id = ?", (run_id,)).fetchone()
    return int(n), int(top or 0)


def findings(conn: sqlite3.Connection, run_id: int) -> list[dict[str, Any]]:
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
    for row in conn.execute(
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
