"""``gradwatch runs`` and ``gradwatch show``: read the run store in the terminal."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.table import Table
from rich.text import Text

from gradwatch.cli import app, console, handle_errors
from gradwatch.diagnose import Thresholds
from gradwatch.errors import StoreError
from gradwatch.numbers import delta_ratio, delta_ratio_series, delta_table, format_number
from gradwatch.store import STORE_ENV, open_store

# A layer whose back-propagated delta is this many times below the last weight layer's is
# highlighted as vanishing: the threshold gradwatch.diagnose reports with.
VANISHING_RATIO = Thresholds().vanishing_ratio

StoreOption = Annotated[
    Path | None,
    typer.Option(
        "--store", "-s", help=f"Run store file or directory (default: ${STORE_ENV} or ./gradwatch-runs)."
    ),
]


def _fmt(value: float | None, digits: int = 3) -> str:
    """``digits`` decimals between 0.001 and 10^4 (trailing zeros dropped), else scientific."""
    return format_number(value, digits, fixed=True)


def _when(ts: float | None) -> str:
    if ts is None or (isinstance(ts, float) and math.isnan(ts)):
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _ratio_line(metrics: pd.DataFrame, step: int) -> Text:
    """The run's delta ratio (:func:`gradwatch.numbers.delta_ratio`) at ``step`` and at the first
    logged step: the number lab.json, diagnose and the report give.
    """
    series = delta_ratio_series(metrics)
    first = int(series.index[0]) if len(series) else None
    text = f"first/last weight layer delta: {_fmt(delta_ratio(metrics, step))} at step {step}"
    if first is not None and first != step:
        text += f", {_fmt(delta_ratio(metrics))} at the first logged step {first}"
    return Text(text)


@app.command()
@handle_errors
def runs(store: StoreOption = None) -> None:
    """List the runs in the store: id, name, status, steps, start time."""
    with open_store(store) as st:
        df = st.runs()
        if df.empty:
            raise StoreError(f"the store {st.path} holds no runs yet; watch a training run first")
        table = Table(title=f"runs in {st.path}")
        for col in ("id", "name", "status", "last step", "started", "finished"):
            table.add_column(col, justify="right" if col in ("id", "last step") else "left")
        colors = {"finished": "green", "running": "cyan", "failed": "red", "interrupted": "yellow"}
        for row in df.itertuples():
            last = "-" if pd.isna(row.last_step) else str(int(row.last_step))
            table.add_row(
                str(row.id),
                Text(str(row.name)),
                Text(row.status, style=colors.get(row.status, "")),
                last,
                _when(row.created_at),
                _when(row.finished_at),
            )
        console.print(table)


@app.command()
@handle_errors
def show(
    run: Annotated[str, typer.Argument(help="Run id or name (the latest run of that name).")],
    step: Annotated[int | None, typer.Option(help="Step to show (default: the latest logged step).")] = None,
    store: StoreOption = None,
) -> None:
    """Per-layer table of one step of a run; layers whose gradient vanished are red."""
    with open_store(store) as st:
        info = st.run(run)
        metrics = st.metrics(info["id"])
        if metrics.empty:
            raise StoreError(
                f"run {info['id']} ({info['name']}) has no per-layer metrics yet; it recorded "
                f"no logged training step (is the model's forward called in training mode?)"
            )
        steps = sorted(metrics["step"].unique())
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise StoreError(
                f"run {info['id']} has no logged step {chosen}; logged steps run from {steps[0]} to "
                f"{steps[-1]} ({len(steps)} in all)"
            )
        at = metrics[metrics["step"] == chosen]
        params = at[at["kind"] == "param"]
        weights = delta_table(at)  # the delta ratio's layers: the reference is the last weight layer
        reference = float(weights.iloc[0, -1]) if weights.size else math.nan

        title = f"run {info['id']} {info['name']!s} ({info['status']}), step {chosen}"
        table = Table(title=title + ": parameterised layers")
        for col in ("#", "layer", "type", "grad norm", "delta rms", "delta/last", "weight norm", "update/w"):
            table.add_column(col, justify="left" if col in ("layer", "type") else "right")
        for row in params.itertuples():
            ratio = row.delta_rms / reference if reference and not math.isnan(row.delta_rms) else math.nan
            style = "red" if ratio < VANISHING_RATIO else ""
            table.add_row(
                str(row.layer_id),
                Text(str(row.layer), style=style),
                Text(str(row.type)),
                _fmt(row.grad_norm),
                _fmt(row.delta_rms),
                Text(_fmt(ratio), style=style),
                _fmt(row.weight_norm),
                _fmt(row.update_ratio),
            )
        console.print(table)
        console.print(_ratio_line(metrics, int(chosen)))
        acts = at[at["kind"] == "activation"]
        if not acts.empty:
            table = Table(
                title="activations (fractions of inputs; dead = units with phi' = 0 on the whole batch)"
            )
            for col in ("#", "layer", "type", "saturated", "green", "dead", "mean phi'"):
                table.add_column(col, justify="left" if col in ("layer", "type") else "right")
            for row in acts.itertuples():
                table.add_row(
                    str(row.layer_id),
                    Text(str(row.layer)),
                    Text(str(row.type)),
                    _fmt(row.saturated_frac, 2),
                    _fmt(row.green_frac, 2),
                    _fmt(row.dead_frac, 2),
                    _fmt(row.mean_derivative),
                )
        console.print(table)
        scalars = st.scalars(info["id"])
        row = scalars[scalars["step"] == chosen]
        if not row.empty:
            parts = [
                f"{c} {_fmt(float(row[c].iloc[0]))}" for c in row.columns if c not in ("step", "wall_time")
            ]
            console.print(Text("  ".join(parts)))
        vanishing = sum(
            1
            for r in params.itertuples()
            if reference and not math.isnan(r.delta_rms) and r.delta_rms / reference < VANISHING_RATIO
        )
        if vanishing:
            console.print(
                f"[red]{vanishing} layer(s) receive a gradient over {1 / VANISHING_RATIO:.0f}x "
                f"weaker than the last layer's: the gradient vanishes on its way to the input.[/]"
            )
        findings = st.findings(info["id"])
        for f in findings.itertuples():
            console.print(Text(f"[{f.severity}] {f.kind}: {f.explanation}"))
