"""``gradwatch theory``: mean-field predictions, optionally beside a measurement."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from gradwatch import theory as mf
from gradwatch.cli import app, console, handle_errors
from gradwatch.errors import ConfigError
from gradwatch.numbers import format_number

if TYPE_CHECKING:
    from gradwatch.lab.meanfield import DeltaMeasurement

_REGIME_STYLE = {"ordered": "yellow", "critical": "green", "chaotic": "red"}
_REGIME_MEANING = {
    "ordered": "gradients vanish towards the input",
    "critical": "edge of chaos: gradients neither vanish nor explode",
    "chaotic": "gradients explode towards the input",
}
_MAX_ROWS = 24  # layers shown in the per-layer table; deeper nets show a sample


def _fmt(value: float, digits: int = 4) -> str:
    """``digits`` significant digits at any magnitude (the general format)."""
    return format_number(value, digits, plain=(0.0, math.inf))


def _prediction_table(p: mf.MeanFieldPrediction, depth: int, critical: float | None) -> Table:
    title = f"mean-field theory: {p.activation}, sigma_w2={p.sigma_w2:g}, sigma_b2={p.sigma_b2:g}"
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    q_note = "pre-activation variance at the fixed point"
    if math.isinf(p.q_star):
        q_note = "no fixed point: the forward signal grows without bound"
    style = _REGIME_STYLE[p.regime]
    rows = [
        ("q*", _fmt(p.q_star), q_note),
        ("chi_1", _fmt(p.chi1), escape("factor on E[delta^2] per layer towards the input")),
        ("depth scale xi", _fmt(p.depth_scale, 3), "layers per e-fold of delta^2 (1/|ln chi_1|)"),
        ("correlation depth xi_c", _fmt(p.correlation_depth_scale, 3), "Schoenholz et al. 2017"),
        ("trainable depth", _fmt(p.trainable_depth, 3), "about 6 xi_c layers"),
        ("regime", f"[{style}]{p.regime}[/]", _REGIME_MEANING[p.regime]),
        (f"first/last delta, depth {depth}", _fmt(p.ratio(depth), 3), "chi_1 ** ((depth - 1) / 2)"),
    ]
    if critical is not None:
        rows.append(("critical sigma_w2", _fmt(critical), f"chi_1 = 1 at sigma_b2={p.sigma_b2:g}"))
    for row in rows:
        table.add_row(*row)
    return table


def _shown_layers(depth: int) -> list[int]:
    if depth <= _MAX_ROWS:
        return list(range(depth))
    return sorted({int(round(i)) for i in np.linspace(0, depth - 1, _MAX_ROWS)})


def _comparison_table(measured: DeltaMeasurement, predicted: np.ndarray) -> Table:
    per_seed = measured.delta_rms / measured.delta_rms[:, -1:]
    table = Table(title=f"delta RMS / last layer's: {measured.delta_rms.shape[0]} seeds, width "
                        f"{measured.width}, q0={measured.q0:.4g}")
    for name in ("layer", "predicted", "measured", "+/- (seeds)", "measured / predicted"):
        table.add_column(name, justify="right")
    for layer in _shown_layers(measured.depth):
        mean = per_seed[:, layer].mean()
        table.add_row(
            f"fc{layer + 1}", _fmt(predicted[layer]), _fmt(mean), _fmt(per_seed[:, layer].std(), 2),
            _fmt(mean / predicted[layer], 3),
        )
    return table


def _grid_limits(p: mf.MeanFieldPrediction, critical: float | None) -> tuple[np.ndarray, np.ndarray]:
    top_w = max(4.0, 1.3 * p.sigma_w2, 1.3 * (critical or 0.0))
    top_b = max(0.3, 1.5 * p.sigma_b2)
    return np.linspace(top_w / 80, top_w, 40), np.linspace(0.0, top_b, 31)  # cells reach 0


def _draw(
    path: Path,
    p: mf.MeanFieldPrediction,
    critical: float | None,
    measured: DeltaMeasurement | None,
    predicted: np.ndarray | None,
) -> None:
    """Phase diagram (log chi_1 over sigma_w2 x sigma_b2, the chi_1 = 1 line, this point) and profile."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg canvas

    w2s, b2s = _grid_limits(p, critical)
    diagram = mf.phase_diagram(p.activation, w2s, b2s)
    fig = Figure(figsize=(11 if measured is not None else 6, 4.5), layout="constrained")
    axes = fig.subplots(1, 2 if measured is not None else 1, squeeze=False)[0]
    ax = axes[0]
    logs = np.log(np.clip(diagram.chi1, 1e-6, None))
    norm = TwoSlopeNorm(0.0, min(float(logs.min()), -1e-3), max(float(logs.max()), 1e-3))
    mesh = ax.pcolormesh(w2s, b2s, logs, cmap="coolwarm", shading="auto", norm=norm)
    fig.colorbar(mesh, ax=ax, label="ln chi_1  (< 0 vanishing, > 0 exploding)")
    ax.plot(diagram.critical_sigma_w2, b2s, "k-", lw=2, label="chi_1 = 1 (edge of chaos)")
    ax.plot([p.sigma_w2], [p.sigma_b2], "k*", ms=14, label=f"this init: chi_1 = {p.chi1:.3g}")
    if measured is not None:
        ax.plot([p.sigma_w2], [p.sigma_b2], "o", mfc="none", mec="lime", ms=18, mew=2,
                label=f"measured: chi_1 = {measured.chi1:.3g}")
    ax.set(xlabel="sigma_w^2", ylabel="sigma_b^2", xlim=(0.0, w2s[-1]), ylim=(-0.02 * b2s[-1], b2s[-1]),
           title=f"{p.activation}: ordered and chaotic phases")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8)
    if measured is not None and predicted is not None:
        ax = axes[1]
        layers = np.arange(1, measured.depth + 1)
        per_seed = measured.delta_rms / measured.delta_rms[:, -1:]
        for k, row in enumerate(per_seed):
            ax.semilogy(layers, row, color="tab:blue", alpha=0.3, lw=1,
                        label="measured, per seed" if k == 0 else None)
        ax.semilogy(layers, per_seed.mean(axis=0), "o", color="tab:blue", ms=3, label="measured, mean")
        ax.semilogy(layers, predicted, "k-", lw=2, label="mean-field prediction")
        ax.set(xlabel="layer", ylabel="delta RMS / last layer's",
               title=f"per-layer delta at initialisation (width {measured.width})")
        ax.legend(fontsize=8)
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise ConfigError(
            f"cannot write the plot to {path}: {err.strerror or err}; pass --plot a writable .png path"
        ) from err


@app.command()
@handle_errors
def theory(
    activation: Annotated[
        str, typer.Option("--activation", "-a", help="Activation from the registry: tanh, relu, sigmoid, ...")
    ] = "tanh",
    sigma_w2: Annotated[
        float, typer.Option("--sigma-w2", help="Weight variance times fan-in: W ~ N(0, sigma_w2 / fan_in).")
    ] = 1.0,
    sigma_b2: Annotated[float, typer.Option("--sigma-b2", help="Bias variance: b ~ N(0, sigma_b2).")] = 0.0,
    depth: Annotated[int, typer.Option("--depth", "-d", help="Number of weight layers.")] = 50,
    measure: Annotated[
        bool, typer.Option("--measure", help="Also measure random networks at initialisation with watch().")
    ] = False,
    width: Annotated[int, typer.Option("--width", help="Units per layer of the measured networks.")] = 512,
    seeds: Annotated[int, typer.Option("--seeds", help="Networks measured (one per seed).")] = 3,
    batch: Annotated[int, typer.Option("--batch", help="Inputs per measured network.")] = 64,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write the phase diagram (and the profile) as PNG here.")
    ] = None,
) -> None:
    """Mean-field prediction of gradient flow at initialisation: q*, chi_1, depth scale, regime.

    Poole et al. 2016, Schoenholz et al. 2017: chi_1 < 1 makes gradients vanish
    exponentially with depth, chi_1 > 1 makes them explode.
    """
    if plot is not None and not plot.parent.is_dir():
        raise ConfigError(f"cannot write the plot to {plot}: no directory {plot.parent}; create it first")
    prediction = mf.predict(activation, sigma_w2, sigma_b2)
    mf.predicted_delta_profile(activation, sigma_w2, sigma_b2, depth)  # validates depth early
    try:
        critical: float | None = mf.critical_sigma_w2(activation, sigma_b2)
    except ConfigError:
        critical = None
    console.print(_prediction_table(prediction, depth, critical))
    if critical is not None and prediction.regime != "critical":
        console.print(f"The edge of chaos at sigma_b2={sigma_b2:g} is sigma_w2={critical:.4g}.")

    measured = predicted = None
    if measure:
        from gradwatch.lab.meanfield import measure_delta_profile  # trains under watch(): only when asked

        with console.status(f"measuring {seeds} random {activation} networks of width {width}..."):
            measured = measure_delta_profile(activation, sigma_w2, sigma_b2, depth, width=width,
                                             seeds=seeds, batch=batch)
        predicted = mf.predicted_delta_profile(activation, sigma_w2, sigma_b2, depth, q0=measured.q0)
        console.print(_comparison_table(measured, predicted))
        middle = measured.middle_layers
        off = measured.chi1 / prediction.chi1 - 1.0
        console.print(
            f"chi_1 measured: {_fmt(measured.chi1)} (mean delta_l^2 / delta_(l+1)^2 over layers "
            f"{middle.start + 1}-{middle.stop}, {seeds} seeds) vs predicted {_fmt(prediction.chi1)}: "
            f"{off:+.1%}"
        )
    if plot is not None:
        with console.status("drawing the phase diagram..."):
            _draw(plot, prediction, critical, measured, predicted)
        console.print(f"wrote {plot}")
