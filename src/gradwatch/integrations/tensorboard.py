"""A run from the store as TensorBoard event files (``gradwatch export RUN --to tensorboard DIR``).

What is written, under ``DIR/<id>-<name>/`` (so one log directory holds many runs):

* a scalar per layer and metric, tagged ``<metric>/<layer>`` (``delta_rms/encoder.0``):
  TensorBoard groups each metric's layers in one section;
* every global value under its own name (``loss``, ``lr``, ``total_grad_norm``, ...);
* per logged step, a histogram across layers of ``log10`` of ``grad_norm``, ``delta_rms``
  and ``update_ratio`` (the spread of gradient magnitudes over depth: a wide one is
  vanishing or exploding), and of ``dead_frac`` and ``saturated_frac`` across activations,
  tagged ``layers/<name>``;
* the run's config and findings as text.

Wall times come from the run's ``wall_time`` values, so TensorBoard's relative-time
axis shows the real training time. Missing values are left out; a value stored as
non-finite is written as NaN in a series that has finite values elsewhere.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradwatch.integrations import require
from gradwatch.store import LAYER_METRICS, RunStore

__all__ = ["export_tensorboard", "run_folder", "HISTOGRAMS"]

# histogram tag -> (metric, layer kind, log10)
HISTOGRAMS = {
    "layers/log10_grad_norm": ("grad_norm", "param", True),
    "layers/log10_delta_rms": ("delta_rms", "param", True),
    "layers/log10_update_ratio": ("update_ratio", "param", True),
    "layers/dead_frac": ("dead_frac", "activation", False),
    "layers/saturated_frac": ("saturated_frac", "activation", False),
}


def run_folder(out: str | Path, run_id: int, name: str) -> Path:
    """``out/<id>-<name>`` with the name made safe for a file system."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"
    return Path(out).expanduser() / f"{run_id}-{safe[:80]}"


def _wall_times(scalars: pd.DataFrame, steps: list[int], start: float) -> dict[int, float]:
    """Step -> wall time: the run's ``wall_time`` values, carried to steps without one."""
    if "wall_time" in scalars.columns:
        known = scalars.set_index("step")["wall_time"].dropna()
    else:
        known = pd.Series(dtype="float64")
    index = sorted(set(steps) | set(known.index))
    times = known.reindex(index).ffill().bfill().fillna(start)
    return {int(s): float(t) for s, t in times.items()}


def _markdown(run: dict[str, Any], findings: pd.DataFrame) -> tuple[str, str]:
    config = "```\n" + json.dumps(run["config"], indent=2, sort_keys=True, default=str) + "\n```"
    if findings.empty:
        found = "No findings stored (run `gradwatch show RUN` after a diagnosis)."
    else:
        found = "\n".join(
            f"- **{f.kind}** ({f.severity}, steps {f.first_step}-{f.last_step}): {f.explanation}"
            for f in findings.itertuples()
        )
    return config, found


def export_tensorboard(store: RunStore, run: int | str, out: str | Path) -> Path:
    """Write run ``run`` of ``store`` as TensorBoard events; returns the run's folder.

    Raises:
        RunNotFoundError: no such run.
        MissingExtraError: tensorboard is not installed (``pip install 'gradwatch[tensorboard]'``).
    """
    run_id = store.resolve(run)
    info = store.run(run_id)
    writer_module = require("torch.utils.tensorboard", "tensorboard")
    metrics = store.metrics(run_id)
    scalars = store.scalars(run_id)
    folder = run_folder(out, run_id, info["name"])
    steps = [int(s) for s in pd.concat([metrics["step"], scalars["step"]]).unique()]
    when = _wall_times(scalars, steps, float(info["created_at"]))

    writer = writer_module.SummaryWriter(log_dir=str(folder))
    try:
        for column in scalars.columns:
            if column == "step":
                continue
            for step, value in zip(scalars["step"], scalars[column], strict=True):
                if not math.isnan(value):
                    writer.add_scalar(column, value, int(step), walltime=when[int(step)])
        for (layer, metric), series in _layer_series(metrics).items():
            for step, value in series:
                writer.add_scalar(f"{metric}/{layer}", value, step, walltime=when[step])
        for tag, (metric, kind, log) in HISTOGRAMS.items():
            rows = metrics[(metrics["kind"] == kind)]
            for step, values in rows.groupby("step")[metric]:
                v = values.to_numpy(dtype="float64")
                v = v[np.isfinite(v) & (v > 0)] if log else v[np.isfinite(v)]
                if v.size:
                    writer.add_histogram(tag, np.log10(v) if log else v, int(step), walltime=when[int(step)])
        config, found = _markdown(info, store.findings(run_id))
        writer.add_text("config", config, 0)
        writer.add_text("findings", found, 0)
    finally:
        writer.close()
    return folder


def _layer_series(metrics: pd.DataFrame) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(layer, metric) -> [(step, value)] for every metric a layer has a finite value of;
    NaN only where the store flagged a non-finite value in such a series.
    """
    out: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for layer, rows in metrics.groupby("layer", sort=False):
        for metric in LAYER_METRICS:
            values = rows[metric].to_numpy(dtype="float64")
            if not np.isfinite(values).any():
                continue
            keep = ~np.isnan(values) | rows["nonfinite"].to_numpy()
            out[(str(layer), metric)] = [
                (int(s), float(v)) for s, v, k in zip(rows["step"], values, keep, strict=True) if k
            ]
    return out
