"""``gradwatch probe``: train a short watched run of your model, say what is wrong, prove a fix."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from gradwatch.cli import app, console, handle_errors
from gradwatch.diagnose import KINDS, Finding
from gradwatch.numbers import format_number
from gradwatch.prescribe import TRIALS, PrescriptionTable, load_factory, prescribe
from gradwatch.store import STORE_ENV, default_store_path

_SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
_SHORT = {
    "relu_he": "ReLU + He init",
    "leaky_relu": "LeakyReLU + He init",
    "tanh": "tanh + Xavier init",
    "relu": "ReLU, same init",
    "reinit": "re-init (He/Xavier)",
    "batch_norm": "BatchNorm before activations",
    "residual": "residual connections",
    "fewer_layers": "fewer layers (a quarter)",
    "clip_grad_norm": "clip gradient norm at 1",
    "lower_lr": "learning rate / 10",
}
_NUMERIC = ("#", "loss", "test acc", "first/last delta")


def _num(value: Any, digits: int = 3) -> str:
    """Floats with ``digits`` significant digits at any magnitude; other values as they print."""
    if value is None or isinstance(value, float):
        return format_number(value, digits, plain=(0.0, math.inf))
    return str(value)


def _clean(obj: Any) -> Any:
    """JSON has no NaN or inf: they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _print_findings(findings: list[Finding]) -> None:
    if not findings:
        console.print("[green]No problem found[/]: gradients reach the input at a healthy strength.")
        return
    for f in findings:
        style = _SEVERITY_STYLE.get(f.severity, "")
        steps = "" if f.first_step is None else f" (steps {f.first_step}-{f.last_step})"
        head = Text.assemble((f"[{f.severity}] ", style), (f.title, "bold"), steps)
        if f.layers:
            shown = ", ".join(f.layers[:4]) + (f", ... ({len(f.layers)} layers)" if len(f.layers) > 4 else "")
            head.append(f": {shown}")
        console.print(head)
        console.print(Text(f.explanation), style="dim" if f.severity == "info" else "")
        console.print()


def _print_table(table: PrescriptionTable) -> None:
    base = table.baseline
    out = Table(title=f"what-if trials, {table.steps} steps each, same data and seed "
                      f"(ranked by the loss reached; first/last delta: 1 is healthy)")
    for col in ("#", "change", "loss", "test acc", "first/last delta", "loss vs unchanged"):
        out.add_column(col, justify="right" if col in _NUMERIC else "left")
    found = ", ".join(KINDS.get(k, k) for k in base.findings) or "no finding"
    out.add_row("", Text("unchanged model", style="bold"), _num(base.loss), _num(base.test_acc),
                _num(base.delta_ratio, 2), Text(found))
    for p in table.rows:
        if p.verified:
            m = p.measurements
            style = "green" if m.get("improved") else ""
            gain = m.get("loss_gain")
            verdict = f"{-gain:+.0%}" if isinstance(gain, float) and math.isfinite(gain) else "-"
            out.add_row(str(p.rank), Text(_SHORT.get(p.name, p.name), style=style), _num(m.get("loss")),
                        _num(m.get("test_acc")), _num(m.get("delta_ratio"), 2),
                        Text(verdict + ("" if m.get("improved") else " (no gain)"), style=style))
        else:
            out.add_row("-", Text(_SHORT.get(p.name, p.name), style="dim"), "", "", "",
                        Text(("not applicable: " if not p.applicable else "") + p.reason, style="dim"))
    console.print(out)
    best = table.best
    if best is not None:
        console.print(f"[bold green]Prescription:[/] {escape(best.description)} "
                      f"(loss {_num(best.measurements['loss'])} vs {_num(base.loss)} unchanged).")
    else:
        console.print("No change beat the unchanged model clearly within this budget.")


@app.command()
@handle_errors
def probe(
    factory: Annotated[str, typer.Argument(help="Model factory, package.module:function (no arguments).")],
    data: Annotated[str, typer.Option("--data", "-d", help="digits, mnist1d, .npz or .csv.")] = "digits",
    steps: Annotated[int, typer.Option(help="Optimizer steps per trial.")] = 200,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 3e-3,
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = "adam",
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of weights, split and batch order.")] = 0,
    trials: Annotated[bool, typer.Option("--trials/--no-trials", help="Run the what-if trials.")] = True,
    workers: Annotated[int, typer.Option(help="Processes for the trials.")] = 2,
    store: Annotated[Path | None, typer.Option(
        "--store", "-s", help=f"Run store (default: ${STORE_ENV} or ./gradwatch-runs).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Train your model briefly under watch, diagnose it, and measure which fix works."""
    load_factory(factory)  # fail fast, before loading data, on a path that does not import
    store_path = store if store is not None else default_store_path()
    table = prescribe(factory, data, steps=steps, lr=lr, optimizer=optimizer, batch_size=batch_size,
                      seed=seed, trials=list(TRIALS) if trials else [], workers=workers,
                      store=store_path, run_name=f"probe-{factory}", progress=not as_json)
    if as_json:
        payload = {"factory": factory, "data": data, "store": str(store_path),
                   "run_id": table.baseline.run_id, **table.to_dict()}
        typer.echo(json.dumps(_clean(payload), indent=2))
        return
    console.print(Text.assemble(("probe ", "bold"), factory, f" on {data}: {table.steps} steps, run ",
                                str(table.baseline.run_id), f" in {store_path}"))
    console.print()
    _print_findings(table.findings)
    if trials:
        _print_table(table)
    console.print(f"Per-layer detail: gradwatch show {table.baseline.run_id} --store {store_path}")
