"""The self-contained HTML page: figures as inline PNG, captions, tables; no script, no network.

Every string that comes from a user (run names, labels, layer names, config values,
findings' text) goes through :func:`html.escape` in :func:`_e`; nothing else reaches
the page unescaped. The page has no JavaScript at all.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from matplotlib.figure import Figure

from gradwatch import __version__
from gradwatch.numbers import format_number
from gradwatch.report import figures, meanfield, papers, papers_figures, verdicts
from gradwatch.report.data import NothingToPlot, ReportData, RunData

__all__ = ["render", "SECTIONS"]

_DPI = 100


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float, digits: int = 3) -> str:
    return format_number(value, digits, missing="–")


def _png(fig: Figure) -> tuple[str, int, int]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    width, height = (fig.get_size_inches() * _DPI).round().astype(int)
    return base64.b64encode(buf.getvalue()).decode("ascii"), int(width), int(height)


# --- captions: one or two sentences that say what to see ---------------------------------------


def _cap_gradient(data: ReportData) -> str:
    text = (
        "Each line is one configuration at initialisation, on a log scale: a straight slope down "
        "towards layer 1 is the exponential decay of a product of derivatives, one per layer."
    )
    worst = data.featured[:1]
    if worst and worst[0].delta_ratio > 0:
        text += (
            f" Steepest: {worst[0].label}, whose first layer receives {_num(worst[0].delta_ratio, 2)} "
            f"times the last layer's δ."
        )
    return text


def _featured_names(data: ReportData) -> str:
    runs = data.featured
    roles = ["the gradient flow furthest from healthy", "a contrast"]
    return "; ".join(f"run {r.id} ({r.label}): {role}" for r, role in zip(runs, roles, strict=False))


def _cap_heatmap(data: ReportData) -> str:
    return (
        "Each row is a weight layer (input at the bottom), each column a logged step; dark rows "
        f"receive almost no gradient and stay dark while training goes on. Shown: {_featured_names(data)}."
    )


def _cap_loss(data: ReportData) -> str:
    flat = figures.flat_loss_groups(data)
    text = (
        "“No change in the loss” is the seeds' first sign of vanishing gradients; dashed lines mark "
        f"configurations whose loss moved by less than {figures.FLAT_LOSS_CHANGE:.0%} over training."
    )
    if flat:
        labels = [data.groups[k][0].label for k in flat]
        return text + " Flat: " + ", ".join(labels) + "."
    return text + " No configuration's loss stayed flat."


def _cap_weights(data: ReportData) -> str:
    return (
        "The seeds' second sign: layers the gradient does not reach keep their weights. Their tracked "
        "individual weights run flat, their norm stays at its start (1) and their update ratio is far "
        f"below the other layers' (dark lines are layers near the input). Shown: {_featured_names(data)}."
    )


def _cap_meanfield(data: ReportData) -> str:
    act, b2, table = meanfield.meanfield_grid(data)
    deepest = table[table["depth"] == table["depth"].max()]
    best = deepest.loc[deepest["test_acc"].idxmax()]
    return (
        f"Each cell is one {act} configuration (σb² = {b2:g}), its test accuracy in percent, mean over "
        "seeds. Mean-field theory says a network trains only up to about 6 ξ_c layers, ξ_c the depth "
        "over which inputs stay distinguishable (Schoenholz et al. 2017): cells above the white curve "
        "should stay near chance, and the curve peaks at the edge of chaos, χ₁ = 1 (dashed line), "
        "where gradients neither vanish nor explode. Short training trains less than the curve "
        f"allows. At depth {int(best['depth'])} the best σw² is {best['sigma_w2']:g} "
        f"({100 * best['test_acc']:.0f}%)."
    )


@dataclass(frozen=True)
class Section:
    """One figure of the report: anchor, heading, the figure function, caption and alt text;
    ``preset`` names the lab preset whose report alone draws it (None: every report).
    """

    anchor: str
    heading: str
    draw: Callable[[ReportData], Figure]
    caption: Callable[[ReportData], str]
    alt: str
    preset: str | None = None


SECTIONS = [
    Section(
        "activations",
        "1. The sigmoid, its derivative and the green region",
        lambda data: figures.activations_figure(),
        lambda data: (
            "The sigmoid's derivative never exceeds 0.25 (red dotted line), so back-propagating "
            "through n sigmoid layers multiplies n factors of at most 0.25; only in the green region "
            "(|x| ≤ 1.76) is it at least half its maximum. Tanh, ReLU and LeakyReLU keep a "
            "derivative of 1 where they are green; ReLU's is 0 for x < 0 (dying ReLU)."
        ),
        "Plots of the sigmoid, tanh, ReLU and LeakyReLU with their derivatives; the green region is "
        "shaded and the sigmoid derivative's maximum of 0.25 is marked.",
    ),
    Section(
        "gradient-per-layer",
        "2. Gradient per layer: the exponential decay",
        figures.gradient_per_layer_figure,
        _cap_gradient,
        "Log-scale line plots of delta RMS and weight-gradient norm against layer index, one line per "
        "configuration.",
    ),
    Section(
        "heatmap",
        "3. Delta RMS over layers and steps",
        figures.delta_heatmap_figure,
        _cap_heatmap,
        "Heatmaps of log10 delta RMS with weight layers as rows and training steps as columns.",
    ),
    Section(
        "loss",
        "4. Loss and accuracy against epochs",
        figures.loss_figure,
        _cap_loss,
        "Training loss and test accuracy against epochs, one line per configuration; flat losses dashed.",
    ),
    Section(
        "weights",
        "5. Weights against epochs",
        figures.weights_figure,
        _cap_weights,
        "Individual weights, per-layer weight norm relative to its start, and update ratio against epochs.",
    ),
    Section(
        "activation-regions",
        "6. Saturated, green and dead",
        figures.activation_regions_figure,
        lambda data: (
            "Per activation layer: the fraction of inputs in the flat, saturated tails, the fraction "
            "in the green region, and the fraction of dead units (zero derivative on the whole "
            "batch). Healthy layers stay green; saturated or dead ones pass little gradient back."
        ),
        "Line plots of saturated, green and dead fractions per activation layer over training.",
    ),
    Section(
        "fixes",
        "7. The fixes side by side",
        verdicts.fixes_figure,
        lambda data: (
            "Each row is one configuration, mean ± std over its seeds: a fix works when test accuracy "
            "rises and the first/last δ ratio moves to 1 (dashed line), where the first layer "
            "gets as much gradient as the last."
        ),
        "Bar chart of test accuracy and dot plot of first-to-last delta ratio per configuration.",
    ),
    Section(
        "findings",
        "8. Findings",
        verdicts.findings_figure,
        lambda data: (
            "What gradwatch's diagnosis found in each run, over the steps where it holds (red: critical, "
            "orange: warning, blue: information, drawn only when nothing is worse); open a run below for "
            "the evidence and the prescriptions."
        ),
        "Timeline of findings per run, colored by severity.",
    ),
    Section(
        "theory",
        "9. Theory beside measurement",
        verdicts.theory_figure,
        lambda data: (
            "Dashed: mean-field theory's δ profile for each configuration's activation and "
            "initialisation (σw², σb²); dots: the measurement at initialisation. Where they agree, the "
            "decay is exactly what the initialisation must produce."
        ),
        "Log-scale plot of predicted and measured delta RMS per hidden layer, relative to the last.",
    ),
    Section(
        "meanfield",
        "10. Trainability over depth and σw²: the 6 ξ_c curve",
        meanfield.meanfield_figure,
        _cap_meanfield,
        "Heatmap of test accuracy over weight variance sigma_w^2 (x) and depth (y), with mean-field "
        "theory's trainable depth 6 xi_c drawn as a curve and the critical sigma_w^2 as a vertical line.",
    ),
    Section(
        "ioffe2015",
        "Ioffe & Szegedy 2015, Figure 1: batch normalisation keeps the sigmoids' inputs in place",
        papers_figures.ioffe_figure,
        papers_figures.ioffe_caption,
        "Test accuracy against training steps with and without batch normalisation, and the 15th, 50th "
        "and 85th percentiles of a last-layer sigmoid's inputs over training over the green region.",
        preset="ioffe2015",
    ),
    Section(
        "resnet2016",
        "He et al. 2016: plain vs residual stacks by depth, and the gradient reaching the input",
        papers_figures.resnet_figure,
        papers_figures.resnet_caption,
        "Test error and final training loss against depth for plain and residual nets, and the "
        "first-to-last layer delta RMS ratio over training on a log scale.",
        preset="resnet2016",
    ),
    Section(
        "dying-relu",
        "Lu et al. 2019: ReLU nets born dead, by width",
        papers_figures.dying_relu_figure,
        papers_figures.dying_relu_caption,
        "Fraction of nets born dead against width with published ranges, and dead-unit fraction per "
        "hidden layer at initialisation for each width.",
        preset="dying_relu",
    ),
    Section(
        "glorot2010",
        "Glorot & Bengio 2010, Figures 7-8: gradient variance per layer, standard vs normalised init",
        papers.glorot_variance_figure,
        papers.glorot_variance_caption,
        "Log-scale line plots, per hidden layer at initialisation relative to the last hidden layer, of the "
        "back-propagated gradient's variance and of the weight gradient's variance, for tanh and softsign "
        "with the standard and the normalised init, one row per data set.",
        preset="glorot2010",
    ),
    Section(
        "he2015",
        "He et al. 2015: the forward signal through ReLU layers, Xavier vs He init",
        papers.he_signal_figure,
        papers.he_signal_caption,
        "Log-scale plot of each hidden layer's output RMS at initialisation relative to the first, Xavier "
        "and He init, with the 2^(-(l-1)/2) law; and test accuracy against epochs.",
        preset="he2015",
    ),
]


# --- tables ------------------------------------------------------------------------------


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], numeric: set[int] = frozenset()) -> str:
    """A table; cells must already be escaped HTML."""
    th = "".join(f"<th scope='col'>{h}</th>" for h in head)
    body = "".join(
        "<tr>"
        + "".join(f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<div class='table-wrap'><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>"


def _runs_table(data: ReportData) -> str:
    rows = []
    for r in data.runs:
        config = _e(json.dumps(r.config, indent=1, sort_keys=True, default=str))
        rows.append(
            [
                str(r.id),
                _e(r.name),
                _e(r.label),
                _e(r.status),
                _num(r.last_step, 6),
                _num(r.final("loss")),
                _num(r.final("test_acc")),
                _num(r.delta_ratio, 2),
                f"<details><summary>config</summary><pre>{config}</pre></details>",
            ]
        )
    head = ["id", "name", "configuration", "status", "last step", "last loss", "test acc", "δ first/last", ""]
    return _table(head, rows, numeric={0, 4, 5, 6, 7})


def _claims_table(lab: dict) -> str:
    rows = []
    for c in lab.get("claims", []):
        if not isinstance(c, dict):
            continue
        held = c.get("held")
        mark = "<span class='held'>held</span>" if held else "<span class='failed'>did not hold</span>"
        rows.append([_e(c.get("claim", "")), mark if held is not None else "–", _e(c.get("evidence", ""))])
    return _table(["claim", "result", "evidence"], rows) if rows else ""


def _fixes_table(data: ReportData) -> str:
    rows = [
        [
            _e(r.section),
            _e(r.label),
            str(r.n),
            f"{_num(r.test_acc_mean)} ± {_num(r.test_acc_std, 2)}",
            f"{_num(r.delta_ratio_mean, 2)} ± {_num(r.delta_ratio_std, 2)}",
        ]
        for r in verdicts.fix_rows(data).itertuples()
    ]
    head = ["section", "configuration", "seeds", "test accuracy", "δ first/last"]
    return "<details><summary>numbers</summary>" + _table(head, rows, numeric={2, 3, 4}) + "</details>"


def _layer_names(data: ReportData) -> str:
    parts = []
    for run in data.featured:
        layers = run.weight_layers.drop_duplicates("layer_id").sort_values("layer_id")
        items = "".join(f"<li>{_e(name)}</li>" for name in layers["layer"])
        parts.append(f"<p>run {run.id} ({_e(run.label)}):</p><ol>{items}</ol>")
    return "<details><summary>layer names</summary>" + "".join(parts) + "</details>" if parts else ""


def _pairs(values: object) -> str:
    """``key = value; ...`` of a dict (numbers shortened), or the value itself, escaped."""
    if not isinstance(values, dict):
        return _e(values)
    return "; ".join(f"{_e(k)} = {_e(_num(v) if isinstance(v, float) else v)}" for k, v in values.items())


# Fields of gradwatch.diagnose.Prescription.to_dict() that are shown in words, not as pairs.
_PRESCRIPTION_FIELDS = (
    "name",
    "description",
    "title",
    "rank",
    "rationale",
    "verified",
    "applicable",
    "reason",
    "measurements",
)


def _prescription_html(p: object) -> str:
    if not isinstance(p, dict):
        return _e(p)
    title = next((p[k] for k in ("description", "title", "name") if p.get(k)), "")
    parts = [f"<strong>{_e(title)}</strong>"] if title else []
    if p.get("rationale"):
        parts.append(_e(p["rationale"]))
    if p.get("applicable") is False:
        parts.append(f"not applicable: {_e(p.get('reason', ''))}")
    if p.get("measurements"):
        parts.append(("measured: " if p.get("verified") else "") + _pairs(p["measurements"]))
    extra = {k: v for k, v in p.items() if k not in _PRESCRIPTION_FIELDS}
    if extra:
        parts.append(_pairs(extra))
    return " — ".join(parts)


def _finding_html(run: RunData, opened: bool) -> str:
    """A run's findings in a disclosure: a one-line summary, then each with evidence and fixes."""
    items, summary = [], []
    for f in run.findings.itertuples():
        steps = "–".join(_num(float(s), 6) for s in (f.first_step, f.last_step) if s is not None and s == s)
        layers = ", ".join(_e(x) for x in f.layers) if f.layers else ""
        meta = " · ".join(
            p for p in (f"steps {steps}" if steps else "", f"layers {layers}" if layers else "") if p
        )
        evidence = _pairs(f.evidence) if f.evidence else ""
        prescriptions = "".join(f"<li>{_prescription_html(p)}</li>" for p in f.prescriptions)
        kind = str(f.kind).replace("_", " ")
        summary.append(f"{_e(f.severity)}: {_e(kind)}")
        items.append(
            f"<li><strong>[{_e(f.severity)}] {_e(kind)}</strong> {meta}<br>{_e(f.explanation)}"
            + (f"<div class='evidence'>evidence: {evidence}</div>" if evidence else "")
            + (f"<div>prescriptions:<ol>{prescriptions}</ol></div>" if prescriptions else "")
            + "</li>"
        )
    return (
        f"<details{' open' if opened else ''}><summary><strong>run {run.id}: {_e(run.label)}</strong> — "
        f"{'; '.join(summary)}</summary><ul class='findings'>{''.join(items)}</ul></details>"
    )


def _extra(anchor: str, data: ReportData) -> str:
    if anchor == "heatmap":
        return _layer_names(data)
    if anchor == "weights" and all(r.weight_samples.empty for r in data.runs[:3]):
        return (
            "<p class='note'>These runs recorded no individual weights (watch(weight_samples=0)); "
            "the norm per layer stands in for the seeds' plot of weights against epochs.</p>"
        )
    if anchor == "fixes":
        return _fixes_table(data)
    if anchor == "findings":
        runs = [r for r in data.runs if not r.findings.empty]
        return "".join(_finding_html(r, opened=len(runs) <= 3) for r in runs)
    return ""


# --- the page ----------------------------------------------------------------------------

_CSS = """
:root{color-scheme:light}
*{box-sizing:border-box}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
 color:#1b1b1b;background:#f6f6f4}
header,main,footer{max-width:1160px;margin:0 auto;padding:0 16px}
header{padding-top:20px}
h1{margin:.2em 0;font-size:1.8rem} h2{font-size:1.3rem;margin:.2em 0 .5em} h3{font-size:1.05rem}
section{background:#fff;border:1px solid #e2e2dd;border-radius:8px;padding:14px 18px;margin:18px 0}
figure{margin:0} img{display:block;max-width:100%;height:auto}
figcaption{color:#3d3d3d;margin-top:8px}
p,li,figcaption,summary{overflow-wrap:anywhere} td{overflow-wrap:break-word}
.table-wrap{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.9rem}
th,td{padding:4px 8px;border-bottom:1px solid #ecece8;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
pre{font-size:.8rem;max-width:60ch;white-space:pre-wrap;overflow-wrap:anywhere}
nav ol{columns:2;padding-left:1.2em} .note,.muted{color:#5a5a5a;font-size:.92rem}
.held{color:#1f7a1f;font-weight:600} .failed{color:#b22222;font-weight:600}
.evidence{color:#444;font-size:.92rem}
details{margin:6px 0} summary{cursor:pointer} td summary{white-space:nowrap}
footer{color:#666;font-size:.85rem;padding-bottom:24px}
.figure-scroll{overflow-x:auto} .swipe-hint{display:none;margin:4px 0 0}
@media (max-width:640px){body{font-size:15px} section{padding:10px} nav ol{columns:1} h1{font-size:1.4rem}
 .figure-scroll img{width:720px;max-width:none} .swipe-hint{display:block;color:#666;font-size:.85rem}}
"""


def _header(data: ReportData, shown: list[Section]) -> tuple[str, str]:
    """The page header (title, summary, contents) and the page title."""
    if data.lab:
        lab = data.lab
        title = f"gradwatch lab report: {lab.get('preset', 'lab')}"
        description = str(lab.get("description", "")).strip()
        if description and description[-1] not in ".!?":
            description += "."
        lead = (
            f"{_e(description[:1].upper() + description[1:])} Data set {_e(lab.get('dataset', '?'))}, "
            f"{_e(lab.get('seeds', '?'))} seed(s), {_e(lab.get('epochs', '?'))} epoch(s), "
            f"{len(data.runs)} runs."
        )
    else:
        title = "gradwatch report"
        lead = f"{len(data.runs)} run(s) from the store {_e(data.store)}."
    toc = "".join(f"<li><a href='#{s.anchor}'>{_e(s.heading)}</a></li>" for s in shown)
    return (
        f"<header><h1>{_e(title)}</h1><p>{lead} Vanishing gradients as the seeds explain them: "
        f"a product of derivatives, one per layer, shrinks towards the input.</p>"
        f"<nav aria-label='contents'><ol>{toc}<li><a href='#runs'>Runs</a></li></ol></nav></header>"
    ), title


def render(data: ReportData) -> str:
    """The report page for ``data`` as one HTML string."""
    shown, skipped, blocks = [], [], []
    preset = data.lab.get("preset") if data.lab else None
    for section in SECTIONS:
        if section.preset is not None and section.preset != preset:
            continue  # another paper preset's figure: not "not shown", just not this report's
        try:
            fig = section.draw(data)
        except NothingToPlot as why:
            skipped.append((section, str(why)))
            continue
        image, width, height = _png(fig)
        shown.append(section)
        blocks.append(
            f"<section id='{section.anchor}'><h2>{_e(section.heading)}</h2><figure>"
            f"<div class='figure-scroll'><img src='data:image/png;base64,{image}' width='{width}' "
            f"height='{height}' alt='{_e(section.alt)}'></div><p class='swipe-hint'>Swipe sideways to see "
            f"the whole figure.</p><figcaption>{_e(section.caption(data))}</figcaption></figure>"
            f"{_extra(section.anchor, data)}</section>"
        )
    header, title = _header(data, shown)
    claims = _claims_table(data.lab) if data.lab else ""
    if claims:
        blocks.insert(0, f"<section id='claims'><h2>What the lab checked</h2>{claims}</section>")
    paper = papers.paper_html(data.lab)
    if paper:
        blocks.insert(0, paper)
    if skipped:
        items = "".join(f"<li>{_e(s.heading)}: {_e(why)}</li>" for s, why in skipped)
        blocks.append(f"<section id='not-shown'><h2>Not shown</h2><ul class='muted'>{items}</ul></section>")
    blocks.append(f"<section id='runs'><h2>Runs</h2>{_runs_table(data)}</section>")
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{header}<main>"
        + "".join(blocks)
        + f"</main><footer>Made by gradwatch {_e(__version__)} on {when} from {_e(data.store)}.</footer>"
        "</body></html>\n"
    )
