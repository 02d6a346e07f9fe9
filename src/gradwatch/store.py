"""RunStore: every watched run in one SQLite file, read back as pandas DataFrames.

Layout (schema version :data:`SCHEMA_VERSION`)::

    meta(key, value)                           schema version
    runs(id, name, config JSON, status, created_at, updated_at, finished_at, error, pid, host)
    layers(run_id, layer_id, name, type, kind, activation)        forward order
    layer_metrics(run_id, step, layer_id, <one column per LAYER_METRICS>, flags)
    scalars(run_id, step, name, value)         loss, total_grad_norm, lr, user values
    findings(id, run_id, kind, severity, ...)  filled by gradwatch.diagnose

SQLite runs in WAL mode, so readers never block the writer and a process killed
mid-run leaves every committed batch readable. Writes go through a bounded queue
to one background thread per store object, which commits them in batches:
training never waits on the disk unless the queue is full (back-pressure, not
unbounded memory). Several processes may write one store at once; each commit
retries on ``SQLITE_BUSY`` rather than drop rows.

Missing values and non-finite values: a metric a layer did not produce in a step
is NULL. SQLite cannot hold NaN either, so a NaN is NULL too, with its bit set in
``flags`` (bit ``i`` for ``LAYER_METRICS[i]``); the DataFrames turn both into NaN
and expose the bits as the ``nonfinite`` column. +-inf are stored as they are.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import math
import os
import queue
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradwatch.errors import RunNotFoundError, StoreError

__all__ = [
    "RunStore",
    "open_store",
    "default_store_path",
    "LAYER_METRICS",
    "SCHEMA_VERSION",
    "STORE_ENV",
]

SCHEMA_VERSION = 4  # 2: weight_samples; 3: windowed grad-norm extremes, activation input quantiles;
# 4: weight_samples keyed by step first (a step's rows are appended, not spread over the file)
STORE_ENV = "GRADWATCH_STORE"
DEFAULT_STORE = Path("gradwatch-runs") / "gradwatch.db"

LAYER_METRICS = (
    "grad_norm",
    "weight_norm",
    "update_ratio",
    "delta_rms",
    "output_mean",
    "output_std",
    "saturated_frac",
    "green_frac",
    "dead_frac",
    "mean_derivative",
    # v3: the extremes of grad_norm over the steps since the previous logged step
    # (a spike between two logged steps is never lost), and quantiles of an
    # activation's inputs (Ioffe & Szegedy 2015, Figure 1).
    "grad_norm_max",
    "grad_norm_min",
    "input_q15",
    "input_q50",
    "input_q85",
)

# Keyed by step before layer and element: the rows of one step go to the end of the table, so
# a commit writes a page or two (keyed by element first, v2-3, a step's rows landed on as many
# pages as there are tracked weights, each written whole to the WAL at every commit).
_WEIGHT_SAMPLES = """CREATE TABLE IF NOT EXISTS {table} (
    run_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    layer_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, step, layer_id, idx)
) WITHOUT ROWID;"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    config TEXT NOT NULL DEFAULT '{{}}',
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    error TEXT,
    pid INTEGER,
    host TEXT
);
CREATE INDEX IF NOT EXISTS runs_name ON runs(name);
CREATE TABLE IF NOT EXISTS layers (
    run_id INTEGER NOT NULL,
    layer_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    kind TEXT NOT NULL,
    activation TEXT,
    PRIMARY KEY (run_id, layer_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS layer_metrics (
    run_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    layer_id INTEGER NOT NULL,
    {", ".join(f"{m} REAL" for m in LAYER_METRICS)},
    flags INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, step, layer_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scalars (
    run_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, name, step)
) WITHOUT ROWID;
{_WEIGHT_SAMPLES.format(table="weight_samples")}
CREATE TABLE IF NOT EXISTS findings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    first_step INTEGER,
    last_step INTEGER,
    layers TEXT NOT NULL DEFAULT '[]',
    evidence TEXT NOT NULL DEFAULT '{{}}',
    explanation TEXT NOT NULL DEFAULT '',
    prescriptions TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS findings_run ON findings(run_id);
"""

_BUSY_TIMEOUT_S = 60.0
_BATCH_ITEMS = 256
_QUEUE_ITEMS = 1024
# A commit takes what arrives within this long of its first item. A commit writes each page
# it touched to the WAL once, whatever the number of rows on it, so one commit per step
# (every=1) wrote the end page of every tracked weight's and scalar's series at every step.
_COMMIT_EVERY_S = 0.2
_FLUSH = object()  # queued by flush(): commit what came before it now


def default_store_path() -> Path:
    """``$GRADWATCH_STORE`` if set, else ``./gradwatch-runs/gradwatch.db``."""
    env = os.environ.get(STORE_ENV)
    return Path(env) if env else DEFAULT_STORE


def _resolve_path(path: str | os.PathLike | None) -> Path:
    p = Path(path) if path is not None else default_store_path()
    p = p.expanduser()
    if p.is_dir():
        p = p / "gradwatch.db"
    return p


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
    return conn


def _retry(fn, what: str, deadline_s: float = 600.0):
    """Run ``fn`` until it passes, retrying while the database is locked by another writer."""
    start = time.monotonic()
    delay = 0.01
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as err:
            locked = "locked" in str(err) or "busy" in str(err)
            if not locked or time.monotonic() - start > deadline_s:
                raise StoreError(f"{what} failed: {err}") from err
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def pid_alive(pid: int | None) -> bool:
    """Whether a process ``pid`` runs on this host (a permission error means it does)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_INSERT_LAYER_METRICS = (
    f"INSERT OR REPLACE INTO layer_metrics(run_id, step, layer_id, {', '.join(LAYER_METRICS)}, flags) "
    f"VALUES ({', '.join('?' * (len(LAYER_METRICS) + 4))})"
)
_INSERT_WEIGHT_SAMPLES = (
    "INSERT OR REPLACE INTO weight_samples(run_id, step, layer_id, idx, value) VALUES (?, ?, ?, ?, ?)"
)
_FLAG_BITS = np.array([1 << i for i in range(len(LAYER_METRICS))], dtype=np.int64)


def run_status(status: str, host: str | None, pid: int | None) -> str:
    """A run's status as readers show it: ``interrupted`` for a run still marked ``running``
    whose process is gone from this host (killed, crashed, or never detached), else ``status``.

    A run recorded on another host keeps ``running``: its process cannot be seen from here.
    """
    if status == "running" and host == socket.gethostname() and not pid_alive(pid):
        return "interrupted"
    return status


def _clean(value: float | None) -> float | None:
    """SQLite turns NaN into NULL anyway; do it explicitly."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


class _Writer:
    """One background thread committing queued ``(sql, rows)`` items in batches: a batch holds what
    arrives within ``_COMMIT_EVERY_S`` of its first item (or up to a flush), at most ``_BATCH_ITEMS``.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_ITEMS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gradwatch-store-writer", daemon=True)
        self._thread.start()

    @property
    def max_items(self) -> int:
        return self._queue.maxsize

    def pending(self) -> int:
        return self._queue.qsize()

    def put(self, sql: str, rows: list[tuple]) -> None:
        self._raise_if_failed()
        if rows:
            self._queue.put((sql, rows))  # blocks when full: back-pressure

    def flush(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_FLUSH)
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(f"writing to the store {self._path} failed: {self._error}") from self._error

    def _run(self) -> None:
        conn = _connect(self._path)
        # WAL with synchronous=NORMAL: a commit does not wait for fsync; a crash of the process
        # loses nothing committed, a power cut at most the last commits (SQLite's documentation).
        conn.execute("PRAGMA synchronous = NORMAL")
        try:
            while True:
                item = self._queue.get()
                batch = [item]
                deadline = time.monotonic() + _COMMIT_EVERY_S
                while item is not None and item is not _FLUSH and len(batch) < _BATCH_ITEMS:
                    wait = deadline - time.monotonic()
                    try:
                        item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                    except queue.Empty:
                        break
                    batch.append(item)
                work = [b for b in batch if b is not None and b is not _FLUSH]
                if work and self._error is None:
                    try:
                        _retry(functools.partial(self._commit, conn, work), "a batched write")
                    except BaseException as err:  # keep the thread alive to drain the queue
                        self._error = err
                for _ in batch:
                    self._queue.task_done()
                if batch[-1] is None:
                    return
        finally:
            conn.close()

    @staticmethod
    def _commit(conn: sqlite3.Connection, work: list[tuple[str, list[tuple]]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in work:
                conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


class RunStore:
    """The SQLite run store.

    Args:
        path: the database file, or a directory to hold ``gradwatch.db``.
            Default: ``$GRADWATCH_STORE``, else ``./gradwatch-runs/gradwatch.db``.
        create: create the file (and its directory) if missing. With ``False``
            a missing store is an error (what readers such as the CLI want).

    Raises:
        StoreError: the path cannot be created or written, is not a SQLite file,
            or holds a schema from a newer gradwatch.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, create: bool = True) -> None:
        self.path = _resolve_path(path)
        if not self.path.exists():
            if not create:
                raise StoreError(
                    f"no run store at {self.path}; run a watched training first, or pass the "
                    f"path of an existing store (--store PATH or ${STORE_ENV})"
                )
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StoreError(
                    f"cannot create the store directory {self.path.parent}: {err.strerror}; "
                    f"choose a writable place with store=PATH or ${STORE_ENV}"
                ) from err
        self._lock = threading.Lock()
        self._writer: _Writer | None = None
        self._conn = self._open()
        _open_stores.add(self)

    def _open(self) -> sqlite3.Connection:
        try:
            conn = _connect(self.path)
            # Switching a fresh file to WAL takes an exclusive lock, and SQLite answers "database
            # is locked" at once (no busy handler) when another process is opening it too.
            mode = _retry(
                lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0], "opening the store"
            )
            conn.execute("PRAGMA synchronous = NORMAL")
            if mode.lower() != "wal":  # e.g. a read-only directory cannot hold the -wal file
                conn.close()
                raise StoreError(
                    f"cannot use {self.path} in WAL mode (got journal mode {mode!r}); the "
                    f"directory must be writable"
                )
            _retry(lambda: conn.executescript(_SCHEMA), "creating the store schema")
            self._check_version(conn)
        except sqlite3.DatabaseError as err:
            msg = str(err)
            if "not a database" in msg or "malformed" in msg or "corrupt" in msg:
                raise StoreError(
                    f"{self.path} is not a readable gradwatch store ({msg}); move the file "
                    f"away or choose another store path"
                ) from err
            if "readonly" in msg or "unable to open" in msg or "read-only" in msg:
                raise StoreError(
                    f"cannot open {self.path} for writing ({msg}); choose a writable place with "
                    f"store=PATH or ${STORE_ENV}"
                ) from err
            raise StoreError(f"cannot open the store {self.path}: {msg}") from err
        return conn

    def _check_version(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            return
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this gradwatch's "
                f"{SCHEMA_VERSION}; upgrade gradwatch to read it"
            )
        if version < SCHEMA_VERSION:
            _retry(lambda: conn.execute("BEGIN IMMEDIATE"), "upgrading the store's schema")
            try:
                self._upgrade(conn)  # idempotent: another process may have upgraded it meanwhile
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _upgrade(conn: sqlite3.Connection) -> None:
        """Bring an older schema to :data:`SCHEMA_VERSION`, in the caller's transaction.

        1 -> 2 added the weight_samples table, which the schema script has just created;
        2 -> 3 added metric columns to layer_metrics; 3 -> 4 re-keyed weight_samples by step.
        """
        have = {row[1] for row in conn.execute("PRAGMA table_info(layer_metrics)")}
        for metric in LAYER_METRICS:
            if metric not in have:
                conn.execute(f"ALTER TABLE layer_metrics ADD COLUMN {metric} REAL")
        key = [
            row[1]
            for row in sorted(conn.execute("PRAGMA table_info(weight_samples)"), key=lambda r: r[5])
            if row[5]
        ]
        if key != ["run_id", "step", "layer_id", "idx"]:
            conn.execute(_WEIGHT_SAMPLES.format(table="weight_samples_v4"))
            conn.execute(
                "INSERT INTO weight_samples_v4(run_id, step, layer_id, idx, value) "
                "SELECT run_id, step, layer_id, idx, value FROM weight_samples"
            )
            conn.execute("DROP TABLE weight_samples")
            conn.execute("ALTER TABLE weight_samples_v4 RENAME TO weight_samples")
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    # -- writing ---------------------------------------------------------------

    def _writer_or_start(self) -> _Writer:
        with self._lock:
            if self._writer is None:
                self._writer = _Writer(self.path)
            return self._writer

    def create_run(self, name: str, config: dict[str, Any] | None = None) -> int:
        """Insert a run with status ``running`` and return its id."""
        try:
            config_json = json.dumps(config or {}, default=str, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise StoreError(f"config for run {name!r} cannot be stored as JSON: {err}") from err
        now = time.time()

        def insert() -> int:
            with self._lock:
                cur = self._conn.execute(
                    "INSERT INTO runs(name, config, status, created_at, updated_at, pid, host) "
                    "VALUES (?, ?, 'running', ?, ?, ?, ?)",
                    (name, config_json, now, now, os.getpid(), socket.gethostname()),
                )
                return int(cur.lastrowid)

        return _retry(insert, f"creating run {name!r}")

    def add_layers(self, run_id: int, layers: Iterable[tuple[int, str, str, str, str | None]]) -> None:
        """Queue ``(layer_id, name, type, kind, activation)`` rows for a run."""
        rows = [(run_id, *layer) for layer in layers]
        self._writer_or_start().put(
            "INSERT OR REPLACE INTO layers(run_id, layer_id, name, type, kind, activation) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )

    def add_layer_metrics(self, run_id: int, rows: Iterable[tuple[int, int, Sequence[float | None]]]) -> None:
        """Queue ``(step, layer_id, values)`` rows; ``values`` follow :data:`LAYER_METRICS`.

        A shorter ``values`` (written for an older schema) leaves the metrics after it NULL.
        """
        out = []
        width = len(LAYER_METRICS)
        for step, layer_id, values in rows:
            if len(values) > width:
                raise StoreError(
                    f"a layer row has {len(values)} values; expected at most {width}, one per "
                    f"LAYER_METRICS ({', '.join(LAYER_METRICS)})"
                )
            values = list(values) + [None] * (width - len(values))
            flags = 0
            clean = []
            for i, v in enumerate(values):
                if v is not None and isinstance(v, float) and math.isnan(v):
                    flags |= 1 << i
                clean.append(_clean(v))
            out.append((run_id, step, layer_id, *clean, flags))
        self._writer_or_start().put(_INSERT_LAYER_METRICS, out)

    def add_layer_array(
        self, run_id: int, step: int, layer_ids: Sequence[int], values: np.ndarray, present: np.ndarray
    ) -> None:
        """Queue one step's layer rows from arrays: the watcher's fast path of :meth:`add_layer_metrics`.

        ``values`` and ``present`` are ``(len(layer_ids), len(LAYER_METRICS))``: a value is
        stored where ``present`` is True (NULL elsewhere); a present NaN is NULL with its
        bit set in ``flags``, as in :meth:`add_layer_metrics`.
        """
        values = np.asarray(values, dtype=np.float64)
        present = np.asarray(present, dtype=bool)
        if values.shape != (len(layer_ids), len(LAYER_METRICS)) or present.shape != values.shape:
            raise StoreError(
                f"layer arrays of shape {values.shape} and {present.shape}; expected "
                f"({len(layer_ids)}, {len(LAYER_METRICS)}): a row per layer id, a column per LAYER_METRICS"
            )
        nan = np.isnan(values)
        flags = (nan & present) @ _FLAG_BITS
        cells = values.astype(object)
        cells[nan | ~present] = None
        out = [
            (run_id, step, int(lid), *row, int(flag))
            for lid, row, flag in zip(layer_ids, cells.tolist(), flags.tolist(), strict=True)
        ]
        if out:
            self._writer_or_start().put(_INSERT_LAYER_METRICS, out)

    def add_scalars(self, run_id: int, rows: Iterable[tuple[int, str, float | None]]) -> None:
        """Queue ``(step, name, value)`` rows (loss, total_grad_norm, lr, user values)."""
        out = [(run_id, step, name, _clean(value)) for step, name, value in rows]
        self._writer_or_start().put(
            "INSERT OR REPLACE INTO scalars(run_id, step, name, value) VALUES (?, ?, ?, ?)", out
        )
        self._writer_or_start().put("UPDATE runs SET updated_at = ? WHERE id = ?", [(time.time(), run_id)])

    def add_weight_samples(self, run_id: int, rows: Iterable[tuple[int, int, int, float | None]]) -> None:
        """Queue ``(step, layer_id, index, value)`` rows of tracked individual weights."""
        out = [(run_id, step, layer_id, idx, _clean(value)) for step, layer_id, idx, value in rows]
        self._writer_or_start().put(_INSERT_WEIGHT_SAMPLES, out)

    def add_weight_array(
        self, run_id: int, step: int, layer_ids: Sequence[int], indices: Sequence[int], values: np.ndarray
    ) -> None:
        """Queue one step's tracked weights from parallel sequences: the fast path of
        :meth:`add_weight_samples` (``values[j]`` is element ``indices[j]`` of layer ``layer_ids[j]``'s
        weight; NaN is stored as NULL).
        """
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if not len(layer_ids) == len(indices) == len(values):
            raise StoreError(
                f"{len(layer_ids)} layer ids, {len(indices)} indices and {len(values)} values of tracked "
                f"weights; expected one of each per weight"
            )
        cells = values.astype(object)
        cells[np.isnan(values)] = None
        # sqlite binds Python ints, not numpy's
        ids = layer_ids.tolist() if isinstance(layer_ids, np.ndarray) else layer_ids
        where = indices.tolist() if isinstance(indices, np.ndarray) else indices
        out = list(zip(itertools.repeat(run_id), itertools.repeat(step), ids, where, cells.tolist()))
        if out:
            self._writer_or_start().put(_INSERT_WEIGHT_SAMPLES, out)

    def finish_run(self, run_id: int, status: str = "finished", error: str | None = None) -> None:
        """Flush every queued row, then mark the run ``finished``, ``failed`` or ``stopped``.

        ``stopped``: an alert rule stopped training (:class:`~gradwatch.errors.TrainingStopped`).
        """
        if status not in ("finished", "failed", "stopped"):
            raise StoreError(f"run status {status!r}; expected 'finished', 'failed' or 'stopped'")
        self.flush()
        now = time.time()

        def update() -> None:
            with self._lock:
                self._conn.execute(
                    "UPDATE runs SET status = ?, finished_at = ?, updated_at = ?, error = ? WHERE id = ?",
                    (status, now, now, error, run_id),
                )

        _retry(update, f"finishing run {run_id}")

    def add_findings(self, run_id: int, findings: Iterable[dict[str, Any]], *, replace: bool = True) -> None:
        """Store findings (dicts with kind, severity, first_step, last_step, layers,
        evidence, explanation, prescriptions) for a run, replacing earlier ones by default.
        """
        run_id = self.resolve(run_id)
        now = time.time()
        rows = [
            (
                run_id,
                f["kind"],
                f["severity"],
                f.get("first_step"),
                f.get("last_step"),
                json.dumps(list(f.get("layers", [])), default=str),
                json.dumps(f.get("evidence", {}), default=str),
                f.get("explanation", ""),
                json.dumps(list(f.get("prescriptions", [])), default=str),
                now,
            )
            for f in findings
        ]

        def write() -> None:
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    if replace:
                        self._conn.execute("DELETE FROM findings WHERE run_id = ?", (run_id,))
                    self._conn.executemany(
                        "INSERT INTO findings(run_id, kind, severity, first_step, last_step, "
                        "layers, evidence, explanation, prescriptions, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise

        _retry(write, f"storing findings of run {run_id}")

    def flush(self) -> None:
        """Block until every queued row is committed."""
        if self._writer is not None:
            self._writer.flush()

    def pending_writes(self) -> int:
        """Items waiting in the write queue (bounded by :attr:`max_pending_writes`)."""
        return self._writer.pending() if self._writer is not None else 0

    @property
    def max_pending_writes(self) -> int:
        """The write queue's bound; a full queue makes the writer of new rows wait."""
        return _QUEUE_ITEMS

    def close(self) -> None:
        """Commit everything queued and close the store. Idempotent."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        if self._conn is not None:
            with self._lock:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]
        _open_stores.discard(self)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._conn is None

    # -- copying ---------------------------------------------------------------

    def run_tables(self) -> list[str]:
        """The tables holding a run's rows besides ``runs``: every table with a ``run_id`` column.

        Read from the schema itself, so a table added in a later version is copied too.
        """
        query = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        names = [r[0] for r in self._rows(query)]
        return [n for n in names if "run_id" in self._columns(n)]

    def row_counts(self, run: int | str) -> dict[str, int]:
        """How many rows ``run`` has in each table of :meth:`run_tables`."""
        run_id = self.resolve(run)
        return {t: int(self._rows(f"SELECT COUNT(*) FROM {t} WHERE run_id = ?", (run_id,))[0][0])
                for t in self.run_tables()}

    def _columns(self, table: str) -> list[str]:
        return [r[1] for r in self._rows(f"PRAGMA table_info({table})")]

    def copy_run(self, run: int | str, dst: RunStore | str | os.PathLike) -> int:
        """Copy every row of ``run`` into the store ``dst``; returns the run's id there.

        The run's own row (name, config, status, error, times, process and host) and its
        rows in every table of :meth:`run_tables` (layers, layer metrics with their
        non-finite flags, scalars, tracked weights, findings) are copied as stored, in one
        transaction: ``dst`` holds all of the run or none of it. ``dst`` may be a path (the
        store is created if missing).

        Raises:
            RunNotFoundError: ``run`` is not in this store.
            StoreError: ``dst`` is this very store, or cannot be written.
        """
        run_id = self.resolve(run)
        target = dst if isinstance(dst, RunStore) else RunStore(dst)
        try:
            if target.path.resolve() == self.path.resolve():
                raise StoreError(
                    f"copy_run: the destination {target.path} is the store the run is in; copy it "
                    f"into another store"
                )
            self.flush()
            target.flush()
            run_columns = [c for c in self._columns("runs") if c != "id"]
            (run_row,) = self._rows(f"SELECT {', '.join(run_columns)} FROM runs WHERE id = ?", (run_id,))
            tables = {}
            target_tables = set(target.run_tables())
            for table in self.run_tables():
                have = set(target._columns(table)) if table in target_tables else set()
                # a table's own integer ids (findings) are the destination's to number
                columns = [c for c in self._columns(table) if c != "id" and c in have]
                rows = self._rows(f"SELECT {', '.join(columns)} FROM {table} WHERE run_id = ?", (run_id,))
                tables[table] = (columns, rows)
            return _retry(lambda: target._insert_run(run_columns, run_row, tables), f"copying run {run_id}")
        finally:
            if target is not dst:
                target.close()

    def _insert_run(self, run_columns: list[str], run_row: tuple,
                    tables: dict[str, tuple[list[str], list[tuple]]]) -> int:
        """Insert a run's row and its tables' rows in one transaction; the new run id."""
        if self._conn is None:
            raise StoreError(f"the store {self.path} is closed; open it again with open_store()")
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                marks = ", ".join("?" * len(run_columns))
                cur = conn.execute(f"INSERT INTO runs({', '.join(run_columns)}) VALUES ({marks})", run_row)
                new_id = int(cur.lastrowid)
                for table, (columns, rows) in tables.items():
                    at = columns.index("run_id")
                    conn.executemany(
                        f"INSERT INTO {table}({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                        [(*r[:at], new_id, *r[at + 1:]) for r in rows],
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return new_id

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        if self._conn is None:
            raise StoreError(f"the store {self.path} is closed; open it again with open_store()")
        with self._lock:
            try:
                return pd.read_sql_query(sql, self._conn, params=list(params))
            except (sqlite3.DatabaseError, pd.errors.DatabaseError) as err:
                raise StoreError(f"reading {self.path} failed: {err}") from err

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """The rows of a query as tuples (the fast path of :meth:`metrics`)."""
        if self._conn is None:
            raise StoreError(f"the store {self.path} is closed; open it again with open_store()")
        with self._lock:
            try:
                return self._conn.execute(sql, list(params)).fetchall()
            except sqlite3.DatabaseError as err:
                raise StoreError(f"reading {self.path} failed: {err}") from err

    def resolve(self, run: int | str) -> int:
        """The id of a run given its id or name (the latest run of that name)."""
        if isinstance(run, bool):
            raise RunNotFoundError(f"run {run!r} is not a run id or name")
        key: int | str = int(run) if hasattr(run, "__index__") else run  # numpy integers too
        if isinstance(run, str) and run.strip().isdigit():
            key = int(run)
        if isinstance(key, int):
            found = self._rows("SELECT id FROM runs WHERE id = ?", (key,))
        else:
            found = self._rows("SELECT id FROM runs WHERE name = ? ORDER BY id DESC LIMIT 1", (key,))
        if not found:
            known = self._query("SELECT id, name FROM runs ORDER BY id DESC LIMIT 8")
            listing = ", ".join(f"{r.id} ({r.name})" for r in known.itertuples()) or "none"
            raise RunNotFoundError(
                f"no run {run!r} in {self.path}; latest runs: {listing} (see `gradwatch runs`)"
            )
        return int(found[0][0])

    def runs(self) -> pd.DataFrame:
        """One row per run: id, name, status, created_at, finished_at, steps, config (dict).

        A run still marked ``running`` whose process is gone from this host shows as
        ``interrupted`` (killed, crashed, or never detached).
        """
        df = self._query(
            "SELECT r.id, r.name, r.status, r.created_at, r.updated_at, r.finished_at, r.error, "
            "r.pid, r.host, r.config, "
            "(SELECT MAX(step) FROM scalars s WHERE s.run_id = r.id) AS last_step "
            "FROM runs r ORDER BY r.id"
        )
        df["status"] = [
            run_status(st, h, None if pid is None or pid != pid else int(pid))
            for st, h, pid in zip(df["status"], df["host"], df["pid"], strict=True)
        ]
        df["config"] = [json.loads(c) for c in df["config"]]
        return df

    def run(self, run: int | str) -> dict[str, Any]:
        """One run's row of :meth:`runs` as a dict."""
        run_id = self.resolve(run)
        df = self.runs()
        return df[df["id"] == run_id].iloc[0].to_dict()

    def layers(self, run: int | str) -> pd.DataFrame:
        """The run's layers in forward order: layer_id, layer, type, kind, activation."""
        run_id = self.resolve(run)
        return self._query(
            "SELECT layer_id, name AS layer, type, kind, activation FROM layers "
            "WHERE run_id = ? ORDER BY layer_id",
            (run_id,),
        )

    def metrics(
        self,
        run: int | str,
        *,
        layers: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
        steps: tuple[int, int] | None = None,
    ) -> pd.DataFrame:
        """Per-layer metrics, one row per (step, layer), columns per metric.

        Columns: ``step, layer_id, layer, type, kind`` then the metrics (all of
        :data:`LAYER_METRICS` unless ``metrics`` picks some) and ``nonfinite``
        (True where a value was NaN). ``layer_id`` is the forward-order index.

        Args:
            run: run id or name.
            layers: only these layer names.
            metrics: only these metric columns.
            steps: ``(first, last)`` inclusive step range.
        """
        run_id = self.resolve(run)
        chosen = list(LAYER_METRICS if metrics is None else metrics)
        unknown = [m for m in chosen if m not in LAYER_METRICS]
        if unknown:
            raise StoreError(f"unknown metric(s) {unknown}; known: {', '.join(LAYER_METRICS)}")
        table = self.layers(run_id)
        # Numbers only from SQLite (layer names are joined here, from the small layers table) and
        # straight into float64 arrays: a run of 50 layers x 1,000 steps reads in about half the
        # time of a JOIN through pandas' row-wise conversion (bench/store_scale.py).
        columns_sql = ", ".join(["step", "layer_id", *chosen, "flags"])
        sql = f"SELECT {columns_sql} FROM layer_metrics WHERE run_id = ?"
        params: list[Any] = [run_id]
        if steps is not None:
            sql += " AND step BETWEEN ? AND ?"
            params += [int(steps[0]), int(steps[1])]
        if layers is not None:
            known = set(table["layer"])
            missing = [name for name in layers if name not in known]
            if missing:
                raise StoreError(f"layer(s) {missing} not in run {run_id}; known: {', '.join(sorted(known))}")
            table = table[table["layer"].isin(layers)]
            ids = [int(i) for i in table["layer_id"]]
            sql += f" AND layer_id IN ({', '.join('?' * len(ids))})"
            params += ids
        else:  # rows of declared layers only, as a join would
            sql += " AND layer_id IN (SELECT layer_id FROM layers WHERE run_id = ?)"
            params.append(run_id)
        rows = self._rows(sql + " ORDER BY step, layer_id", params)
        width = len(chosen) + 3
        values = np.fromiter(
            itertools.chain.from_iterable(rows), dtype=np.float64, count=len(rows) * width
        ).reshape(len(rows), width)  # NULL becomes NaN
        layer_id = values[:, 1].astype(np.int64)
        where = np.searchsorted(table["layer_id"].to_numpy(dtype=np.int64), layer_id)
        columns: dict[str, Any] = {"step": values[:, 0].astype(np.int64), "layer_id": layer_id}
        for name in ("layer", "type", "kind"):
            columns[name] = pd.Series(table[name].to_numpy()[where], dtype=table[name].dtype)
        for k, name in enumerate(chosen):
            columns[name] = values[:, 2 + k]
        columns["nonfinite"] = values[:, -1] != 0
        return pd.DataFrame(columns)

    def scalars(self, run: int | str, names: Sequence[str] | None = None) -> pd.DataFrame:
        """Global values per step, wide: ``step`` then one column per name (loss, lr, ...)."""
        run_id = self.resolve(run)
        sql = "SELECT step, name, value FROM scalars WHERE run_id = ?"
        params: list[Any] = [run_id]
        if names is not None:
            sql += f" AND name IN ({', '.join('?' * len(names))})"
            params += list(names)
        rows = self._rows(sql, params)
        if not rows:
            return pd.DataFrame({"step": pd.Series(dtype="int64")})
        # What df.pivot(index="step", columns="name", values="value") gives (steps ascending,
        # names sorted, NaN where a name has no value at a step), arranged by numpy: the
        # primary key (run_id, name, step) makes each cell's value unique.
        steps, step_of = np.unique(np.array([r[0] for r in rows], dtype=np.int64), return_inverse=True)
        names = sorted({r[1] for r in rows})
        column = {name: j for j, name in enumerate(names)}
        wide = np.full((len(steps), len(names)), np.nan)
        wide[step_of, [column[r[1]] for r in rows]] = np.array([r[2] for r in rows], dtype=np.float64)
        return pd.DataFrame({"step": steps, **{name: wide[:, j] for j, name in enumerate(names)}})

    def weight_samples(self, run: int | str) -> pd.DataFrame:
        """Tracked individual weights: ``step, layer_id, layer, index, value`` (empty if none)."""
        run_id = self.resolve(run)
        return self._query(
            'SELECT w.step, w.layer_id, l.name AS layer, w.idx AS "index", w.value FROM weight_samples w '
            "JOIN layers l ON l.run_id = w.run_id AND l.layer_id = w.layer_id "
            "WHERE w.run_id = ? ORDER BY w.layer_id, w.idx, w.step",
            (run_id,),
        )

    def findings(self, run: int | str) -> pd.DataFrame:
        """Stored findings of a run (empty if none), JSON columns decoded."""
        run_id = self.resolve(run)
        df = self._query(
            "SELECT kind, severity, first_step, last_step, layers, evidence, explanation, "
            "prescriptions, created_at FROM findings WHERE run_id = ? ORDER BY id",
            (run_id,),
        )
        for col in ("layers", "evidence", "prescriptions"):
            df[col] = [json.loads(v) for v in df[col]]
        return df

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"


def open_store(path: str | os.PathLike | None = None, *, create: bool = False) -> RunStore:
    """Open an existing store for reading (``create=True`` to make one).

    ``path`` defaults to ``$GRADWATCH_STORE``, else ``./gradwatch-runs/gradwatch.db``.
    """
    return RunStore(path, create=create)


# Commit what is queued when the interpreter exits normally.
_open_stores: weakref.WeakSet[RunStore] = weakref.WeakSet()


@atexit.register
def _flush_open_stores() -> None:
    for store in list(_open_stores):
        try:
            store.flush()
        except Exception:  # noqa: BLE001 - nothing useful to do at exit
            pass
