"""A run from the store as files: TensorBoard events, CSV or Parquet.

:func:`export_run` writes under ``DIR/<id>-<name>/`` (so one directory holds many runs):

* ``tensorboard``: event files (see :mod:`gradwatch.integrations.tensorboard`);
* ``csv`` / ``parquet``: ``metrics`` (one row per step and layer, a column per metric
  and ``nonfinite``, as :meth:`RunStore.metrics`), ``scalars`` (one row per step, a
  column per value), ``layers`` (forward order), and ``run.json`` (name, status,
  config, times, findings).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gradwatch.errors import ConfigError, StoreError
from gradwatch.integrations import require
from gradwatch.integrations.tensorboard import export_tensorboard, run_folder
from gradwatch.store import RunStore

__all__ = ["FORMATS", "export_run", "export_tables"]

FORMATS = ("tensorboard", "csv", "parquet")


def _plain(value: Any) -> Any:
    """JSON-safe: NaN to None, numpy numbers to Python ones."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def export_tables(store: RunStore, run: int | str, out: str | Path, fmt: str = "csv") -> Path:
    """Write a run's metrics, scalars and layers as ``fmt`` (``csv`` or ``parquet``) files
    and ``run.json``; returns the run's folder.
    """
    if fmt not in ("csv", "parquet"):
        raise ConfigError(f"table format {fmt!r}; expected 'csv' or 'parquet'")
    run_id = store.resolve(run)
    if fmt == "parquet":
        require("pyarrow", "parquet")
    info = store.run(run_id)
    folder = run_folder(out, run_id, info["name"])
    _mkdir(folder)
    tables = {"metrics": store.metrics(run_id), "scalars": store.scalars(run_id),
              "layers": store.layers(run_id)}
    for name, df in tables.items():
        path = folder / f"{name}.{fmt}"
        if fmt == "csv":
            df.to_csv(path, index=False)
        else:
            df.to_parquet(path, index=False)
    findings = store.findings(run_id)
    meta = {k: _plain(v) for k, v in info.items() if k != "config"}
    meta["config"] = info["config"]
    meta["findings"] = [{k: _plain(v) for k, v in row.items()} for row in findings.to_dict("records")]
    (folder / "run.json").write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    return folder


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"cannot create the export directory {folder}: {err.strerror}; choose another DIR") \
            from err


def export_run(store: RunStore | str | Path | None, run: int | str, to: str, out: str | Path) -> Path:
    """Export run ``run`` (id or name) of ``store`` to ``out`` as ``to`` (one of :data:`FORMATS`).

    Args:
        store: a :class:`RunStore` or the path of an existing one. None: ``$GRADWATCH_STORE``,
            else ``./gradwatch-runs``.
        run: run id or name.
        to: ``"tensorboard"``, ``"csv"`` or ``"parquet"``.
        out: the directory that receives ``<id>-<name>/``.

    Returns:
        The run's folder.

    Raises:
        ConfigError: an unknown format.
        StoreError, RunNotFoundError: no such store or run.
        MissingExtraError: the format's package is not installed (the message names the extra).
    """
    if to not in FORMATS:
        raise ConfigError(f"export format {to!r}; expected one of {', '.join(FORMATS)}")
    if isinstance(store, RunStore):
        return _export(store, run, to, out)
    with RunStore(store, create=False) as opened:
        return _export(opened, run, to, out)


def _export(store: RunStore, run: int | str, to: str, out: str | Path) -> Path:
    if to == "tensorboard":
        store.resolve(run)  # an unknown run fails before anything is written
        _mkdir(Path(out).expanduser())
        return export_tensorboard(store, run, out)
    return export_tables(store, run, out, to)
