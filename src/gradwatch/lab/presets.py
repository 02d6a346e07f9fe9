"""Lab presets as data: a named grid of configurations and the claims it should show.

A :class:`Preset` is a name, a one-line description, a grid of :class:`GridEntry`
(section, config key, label, :class:`~gradwatch.lab.models.ModelConfig`,
:class:`TrainSettings`) and :class:`Claim` s. A claim is a small pure function over
the per-configuration :class:`ConfigSummary` (numbers the runner read from the
store) and the store itself, returning a :class:`Verdict`: held or not, with the
numbers. Presets say nothing about where runs execute: any backend of
:mod:`gradwatch.lab.runner` takes any grid.

A preset that reproduces a paper also carries its citation (``paper``), the paper's
numbers as :class:`Published` rows, and ``metrics``: named functions giving one value
per seed of a configuration (``"test_error_pct"`` is built in). :func:`paper_table`
puts our mean ± std beside each published number (:class:`PaperRow`).

Presets live in :data:`PRESETS` (name -> preset); :func:`register_preset` adds one,
:func:`load_preset_file` reads a grid from a JSON file (no claims).
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.errors import ConfigError, check_int
from gradwatch.lab.models import ModelConfig, describe
from gradwatch.numbers import format_number as _format_number
from gradwatch.store import RunStore

__all__ = [
    "OPTIMIZERS",
    "TrainSettings",
    "GridEntry",
    "ConfigSummary",
    "Verdict",
    "Claim",
    "MetricFn",
    "Published",
    "PaperRow",
    "Preset",
    "paper_table",
    "test_error_pct",
    "format_number",
    "PRESETS",
    "register_preset",
    "get_preset",
    "preset_names",
    "load_preset_file",
    "grid_entry",
    "fit_log_ratio_vs_depth",
    "meanfield_preset",
    "meanfield_key",
]

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainSettings:
    """How one configuration trains: part of the configuration, like the model.

    Attributes:
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``). Default: ``"adam"``.
        lr: learning rate. Default: 1e-3.
        momentum: SGD momentum (ignored by Adam). Default: 0.0.
        epochs: passes over the training split. Default: 20.
        batch_size: examples per step. Default: 64.
        every: the watcher logs every ``every``-th step (step 0, initialisation, always).
            Default: 10.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    epochs: int = 20
    batch_size: int = 64
    every: int = 10

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer={self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}"
            )
        for name, low in (("lr", 0.0), ("momentum", None)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (low is not None and value <= low) or (low is None and not 0 <= value < 1):
                expected = "a finite number > 0" if low is not None else "a number in [0, 1)"
                raise ConfigError(f"{name}={value!r}; expected {expected}")
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("every", self.every, 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, as stored in a run's config under ``train``."""
        return asdict(self)


@dataclass(frozen=True)
class GridEntry:
    """One configuration of a grid; its runs over seeds share ``config_key``.

    Attributes:
        section: the part of the story it belongs to (``"depth"``, ``"fixes"``, ...).
        config_key: unique in the preset, ``"<section>/<name>"`` by convention.
        label: one human line; :func:`gradwatch.lab.models.describe` unless named.
        model: what to build.
        train: how to train it.
        dataset: this entry's data set (a built-in name or a path), overriding the preset's
            and the user's ``--dataset``; a paper preset may train on two data sets in one
            grid. Default: None (the lab's data set).
    """

    section: str
    config_key: str
    label: str
    model: ModelConfig
    train: TrainSettings = field(default_factory=TrainSettings)
    dataset: str | None = None

    def __post_init__(self) -> None:
        for name in ("section", "config_key", "label"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"grid entry {name}={value!r}; expected a non-empty string")
        if self.dataset is not None and (not isinstance(self.dataset, str) or not self.dataset.strip()):
            raise ConfigError(f"grid entry {self.config_key!r}: dataset={self.dataset!r}; expected "
                              "None (the lab's data set) or a data set name such as 'mnist1d'")
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"grid entry {self.config_key!r}: model must be a ModelConfig")
        if not isinstance(self.train, TrainSettings):
            raise ConfigError(f"grid entry {self.config_key!r}: train must be TrainSettings")


def grid_entry(section: str, name: str, model: ModelConfig, train: TrainSettings,
               label: str | None = None, dataset: str | None = None) -> GridEntry:
    """A :class:`GridEntry` keyed ``section/name`` and labelled by ``describe(model)``."""
    return GridEntry(section, f"{section}/{name}", label or describe(model), model, train, dataset)


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (std 0 for one value)."""
    vals = _finite(values)
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


@dataclass(frozen=True)
class ConfigSummary:
    """One configuration's finished runs, one value per seed, read from the store.

    Attributes:
        entry: the grid entry.
        run_ids: the finished runs, one per seed, in seed order.
        seeds: their seeds.
        test_acc: final test accuracy (fraction).
        delta_ratio: first/last weight layer delta RMS at initialisation
            (:func:`gradwatch.numbers.delta_ratio`, the lab contract).
        nonfinite: whether the run's loss or gradients went non-finite.
        dead_frac: mean dead-unit fraction of the activation layers at the last logged step
            (:func:`gradwatch.numbers.dead_fraction`).
        findings: each run's main finding (e.g. ``"vanishing gradients"``).
    """

    entry: GridEntry
    run_ids: tuple[int, ...]
    seeds: tuple[int, ...]
    test_acc: tuple[float, ...]
    delta_ratio: tuple[float, ...]
    nonfinite: tuple[bool, ...]
    dead_frac: tuple[float, ...]
    findings: tuple[str, ...]

    @property
    def config_key(self) -> str:  # noqa: D102
        return self.entry.config_key

    @property
    def label(self) -> str:  # noqa: D102
        return self.entry.label

    @property
    def test_acc_mean(self) -> float:  # noqa: D102
        return _mean_std(self.test_acc)[0]

    @property
    def test_acc_std(self) -> float:  # noqa: D102
        return _mean_std(self.test_acc)[1]

    @property
    def delta_ratio_mean(self) -> float:
        """Arithmetic mean over seeds (what lab.json holds); see :attr:`delta_ratio_geomean`."""
        return _mean_std(self.delta_ratio)[0]

    @property
    def delta_ratio_std(self) -> float:  # noqa: D102
        return _mean_std(self.delta_ratio)[1]

    @property
    def delta_ratio_geomean(self) -> float:
        """exp(mean(log ratio)) over seeds with a finite positive ratio: the typical ratio."""
        logs = [math.log(v) for v in _finite(self.delta_ratio) if v > 0]
        return math.exp(statistics.fmean(logs)) if logs else math.nan

    @property
    def dead_frac_mean(self) -> float:  # noqa: D102
        return _mean_std(self.dead_frac)[0]

    @property
    def any_nonfinite(self) -> bool:  # noqa: D102
        return any(self.nonfinite)

    @property
    def main_finding(self) -> str:
        """The finding most seeds share (the first seen on a tie)."""
        if not self.findings:
            return "no finished run"
        return Counter(self.findings).most_common(1)[0][0]


@dataclass(frozen=True)
class Verdict:
    """A claim's outcome: ``held`` and the numbers that decided it."""

    held: bool
    evidence: str


ClaimCheck = Callable[[Mapping[str, ConfigSummary], RunStore], Verdict]


@dataclass(frozen=True)
class Claim:
    """A statement the preset should show and its check over the summaries and store.

    ``check`` raises :class:`KeyError` when a configuration it needs did not finish; the
    runner reports that as not held.
    """

    text: str
    check: ClaimCheck = field(repr=False)


MetricFn = Callable[[ConfigSummary, RunStore], tuple[float, ...]]
"""A number per seed of one configuration (NaN where a seed lacks it), e.g. test error in %."""


def test_error_pct(summary: ConfigSummary, store: RunStore) -> tuple[float, ...]:
    """Test error in percent, ``100 * (1 - test_acc)``, per seed: built into every preset."""
    return tuple(100.0 * (1.0 - a) for a in summary.test_acc)


test_error_pct.__test__ = False  # type: ignore[attr-defined]  # pytest: not a test


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Published:
    """One number a paper reports, and the grid entry whose result sits beside it.

    Attributes:
        config_key: the grid entry it is compared with, or None for a reference row
            with no counterpart in our grid (e.g. ResNet-110 on CIFAR-10).
        metric: a key of the preset's ``metrics`` (e.g. ``"test_error_pct"``).
        value: the published number, or a published range ``(low, high)``.
        label: the paper's name for the row (e.g. ``"Tanh N"``).
        source: where in the paper (e.g. ``"Table 1, Shapeset-3x2"``).
    """

    config_key: str | None
    metric: str
    value: float | tuple[float, float]
    label: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.config_key is not None and (not isinstance(self.config_key, str) or not self.config_key):
            raise ConfigError(f"published row {self.label!r}: config_key={self.config_key!r}; expected "
                              "a grid entry's key or None")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"published row {self.label!r}: metric={self.metric!r}; expected a "
                              "metric name such as 'test_error_pct'")
        value = self.value
        if isinstance(value, (tuple, list)):
            if len(value) != 2 or not all(_is_number(v) for v in value) or value[0] > value[1]:
                raise ConfigError(f"published row {self.label!r}: value={value!r}; expected a number "
                                  "or a range (low, high) with low <= high")
            object.__setattr__(self, "value", (float(value[0]), float(value[1])))
        elif not _is_number(value):
            raise ConfigError(f"published row {self.label!r}: value={value!r}; expected a finite "
                              "number or a range (low, high)")
        if not isinstance(self.label, str) or not self.label.strip():
            raise ConfigError(f"published row label={self.label!r}; expected the paper's row name")

    def value_text(self) -> str:
        """The published value as text: ``"15.6"`` or a range ``"0.82-0.88"``."""
        if isinstance(self.value, tuple):
            return f"{format_number(self.value[0])}-{format_number(self.value[1])}"
        return format_number(self.value)


def format_number(x: float) -> str:
    """Three significant digits between 0.01 and 10^4, else two (``"3.1e-05"``, ``"0.004"``):
    :func:`gradwatch.numbers.format_number` as the lab's texts write numbers; ``"-"`` for
    None, NaN and infinities.
    """
    if x is not None and math.isinf(x):
        return "-"
    return _format_number(x, 3, plain=(0.01, 1e4), sci_digits=2, general=True)


@dataclass(frozen=True)
class PaperRow:
    """A published number beside ours: one row of a paper preset's table.

    Attributes:
        metric: the metric's name (a key of the preset's ``metrics``).
        config_key: our grid entry, or None for a reference row.
        label: our configuration's label ("" for a reference row).
        values: our value per finished seed (NaN where a seed has none); empty when the
            configuration has no finished run or there is none to compare.
        published: the paper's number.
        note: why there are no values when the metric failed ("" otherwise).
    """

    metric: str
    config_key: str | None
    label: str
    values: tuple[float, ...]
    published: Published
    note: str = ""

    @property
    def mean(self) -> float:  # noqa: D102
        return _mean_std(self.values)[0]

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        return _mean_std(self.values)[1]

    @property
    def n(self) -> int:
        """Seeds with a finite value."""
        return len(_finite(self.values))

    def ours_text(self) -> str:
        """``"mean ± std"`` of our values, ``"-"`` when there are none."""
        if not self.n:
            return f"- ({self.note})" if self.note else "-"
        return f"{format_number(self.mean)} ± {format_number(self.std)}"

    def cells(self) -> tuple[str, str, str, str, str]:
        """``(metric, our label, our mean ± std, published label, published value)``."""
        return (self.metric, self.label or "(reference only)", self.ours_text(), self.published.label,
                self.published.value_text())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (as ``lab.json`` holds it under ``paper.table``)."""
        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        value = self.published.value
        return {"metric": self.metric, "config_key": self.config_key, "label": self.label,
                "values": [num(v) for v in self.values], "mean": num(self.mean), "std": num(self.std),
                "n": self.n, "ours": self.ours_text(),
                "published_label": self.published.label,
                "published_value": list(value) if isinstance(value, tuple) else value,
                "published": self.published.value_text(), "source": self.published.source,
                "note": self.note}


@dataclass(frozen=True)
class Preset:
    """A named grid of configurations plus the claims it should show.

    Attributes:
        name: what ``gradwatch lab --preset`` takes.
        description: one line for ``gradwatch lab --list``.
        grid: the configurations (unique ``config_key``).
        claims: what the results should show.
        dataset: the default data set. Default: ``"digits"``.
        seeds: default seeds per configuration. Default: 3.
        paper: the full citation of the paper the preset reproduces. Default: "".
        published: the paper's numbers, each beside a grid entry (see :func:`paper_table`).
            Default: none.
        metrics: name -> :data:`MetricFn`, the numbers compared with ``published``;
            ``"test_error_pct"`` (:func:`test_error_pct`) is always there. Default: only it.
    """

    name: str
    description: str
    grid: tuple[GridEntry, ...]
    claims: tuple[Claim, ...] = ()
    dataset: str = "digits"
    seeds: int = 3
    paper: str = ""
    published: tuple[Published, ...] = ()
    metrics: Mapping[str, MetricFn] = field(default_factory=dict, repr=False, hash=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"preset name={self.name!r}; expected a non-empty string")
        object.__setattr__(self, "grid", tuple(self.grid))
        object.__setattr__(self, "claims", tuple(self.claims))
        object.__setattr__(self, "published", tuple(self.published))
        object.__setattr__(self, "metrics", {"test_error_pct": test_error_pct, **dict(self.metrics)})
        if not self.grid:
            raise ConfigError(f"preset {self.name!r} has an empty grid; give it at least one entry")
        keys = [e.config_key for e in self.grid]
        repeated = sorted(k for k, n in Counter(keys).items() if n > 1)
        if repeated:
            raise ConfigError(f"preset {self.name!r} repeats config key(s) {', '.join(repeated)}")
        check_int("seeds", self.seeds, 1)
        for row in self.published:
            if not isinstance(row, Published):
                raise ConfigError(f"preset {self.name!r}: published holds {row!r}; expected Published rows")
            if row.metric not in self.metrics:
                raise ConfigError(f"preset {self.name!r}: published row {row.label!r} uses metric "
                                  f"{row.metric!r}; known: {', '.join(self.metrics)} (add it to metrics)")
            if row.config_key is not None and row.config_key not in keys:
                raise ConfigError(f"preset {self.name!r}: published row {row.label!r} sits beside "
                                  f"config {row.config_key!r}, which is not in the grid")

    def entry(self, config_key: str) -> GridEntry:
        """The grid entry with this key."""
        for e in self.grid:
            if e.config_key == config_key:
                return e
        raise ConfigError(f"no config {config_key!r} in preset {self.name!r}")


def paper_table(preset: Preset, summaries: Sequence[ConfigSummary] | Mapping[str, ConfigSummary],
                store: RunStore) -> list[PaperRow]:
    """One :class:`PaperRow` per published number of ``preset``, in the preset's order:
    our label and values (``preset.metrics[row.metric]`` over the entry's finished seeds)
    beside the paper's label and value. A reference row (``config_key`` None) and an
    entry with no finished run get no values; a metric that raises gets none either, and
    the row's ``note`` says why. Empty for a preset with nothing published.
    """
    by_key = summaries if isinstance(summaries, Mapping) else {s.config_key: s for s in summaries}
    rows = []
    for pub in preset.published:
        s = by_key.get(pub.config_key) if pub.config_key is not None else None
        values: tuple[float, ...] = ()
        note = ""
        if s is not None and s.run_ids:
            try:
                values = tuple(float(v) for v in preset.metrics[pub.metric](s, store))
            except (KeyError, IndexError, ValueError, ZeroDivisionError) as err:
                note = f"{pub.metric} failed: {type(err).__name__}: {err}"
        elif pub.config_key is not None:
            note = "no finished run"
        label = s.label if s is not None else (preset.entry(pub.config_key).label if pub.config_key else "")
        rows.append(PaperRow(pub.metric, pub.config_key, label, values, pub, note))
    return rows


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset, *, replace_existing: bool = False) -> Preset:
    """Add ``preset`` to :data:`PRESETS` under its name; returns it."""
    if preset.name in PRESETS and not replace_existing:
        raise ConfigError(f"a preset named {preset.name!r} exists; pass replace_existing=True")
    PRESETS[preset.name] = preset
    return preset


def preset_names() -> list[str]:
    """Registered preset names, in registration order."""
    return list(PRESETS)


def get_preset(name: str | os.PathLike) -> Preset:
    """A registered preset by name, or a preset read from a ``.json`` file by path.

    Raises:
        ConfigError: unknown name (the message lists the valid ones) or a bad file.
    """
    key = os.fspath(name)
    if key in PRESETS:
        return PRESETS[key]
    if key.lower().endswith(".json"):
        return load_preset_file(key)
    raise ConfigError(
        f"unknown preset {key!r}; valid: {', '.join(PRESETS)} (or a .json grid file); "
        "see `gradwatch lab --list`"
    )


def load_preset_file(path: str | os.PathLike) -> Preset:
    """Read a preset (a grid, no claims) from JSON::

        {"name": "mine", "description": "...", "dataset": "digits", "seeds": 3,
         "train": {"epochs": 10},
         "grid": [{"section": "s", "name": "relu-d20",
                   "model": {"depth": 20, "activation": "relu", "init": "he"},
                   "train": {"lr": 0.01}}]}

    ``train`` at the top sets every entry's defaults; an entry's ``train`` overrides them.
    An entry's optional ``dataset`` overrides the preset's for that entry.

    Raises:
        ConfigError: unreadable file, bad JSON, unknown field, or a bad value (the
            message names the entry).
    """
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read preset file {p}: {err.strerror}") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"preset file {p} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("grid"), list):
        raise ConfigError(f"preset file {p}: expected an object with a list 'grid'")
    unknown = sorted(set(data) - {"name", "description", "dataset", "seeds", "train", "grid"})
    if unknown:
        raise ConfigError(f"preset file {p}: unknown field(s) {', '.join(unknown)}")
    base = _train_from(data.get("train", {}), TrainSettings(), f"preset file {p}, train")
    entries = []
    for i, item in enumerate(data["grid"]):
        where = f"preset file {p}, grid[{i}]"
        if not isinstance(item, dict) or "name" not in item or "model" not in item:
            raise ConfigError(f"{where}: expected an object with 'name' and 'model'")
        extra = sorted(set(item) - {"section", "name", "label", "model", "train", "dataset"})
        if extra:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(extra)}")
        try:
            model = ModelConfig.from_dict(item["model"])
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"{where} ({item['name']}), model: {err}") from err
        train = _train_from(item.get("train", {}), base, where)
        entries.append(grid_entry(str(item.get("section", "grid")), str(item["name"]), model, train,
                                  label=item.get("label"), dataset=item.get("dataset")))
    return Preset(name=str(data.get("name", p.stem)), description=str(data.get("description", str(p))),
                  grid=tuple(entries), dataset=str(data.get("dataset", "digits")),
                  seeds=data.get("seeds", 3))


def _train_from(data: object, base: TrainSettings, where: str) -> TrainSettings:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: train must be an object")
    known = [f.name for f in fields(TrainSettings)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown train field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    try:
        return replace(base, **data)
    except ConfigError as err:
        raise ConfigError(f"{where}, train: {err}") from err


# --- claims: small pure checks -------------------------------------------------------------


def fit_log_ratio_vs_depth(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares fit of ``ln(ratio) = a + b * depth``: returns ``(exp(b), R^2)``.

    ``exp(b)`` is the per-layer factor by which the delta shrinks (or grows) going one
    layer toward the input: the seeds' product of derivatives, one factor per layer.
    """
    pts = [(d, math.log(r)) for d, r in points if r is not None and math.isfinite(r) and r > 0]
    if len({d for d, _ in pts}) < 2:
        raise ValueError("need finite positive ratios at two depths or more to fit")
    x = np.array([d for d, _ in pts], dtype=float)
    y = np.array([v for _, v in pts], dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else 1.0
    return math.exp(slope), r2


def _points(summaries: Mapping[str, ConfigSummary], keys: Sequence[str]) -> list[tuple[int, float]]:
    return [(summaries[k].entry.model.depth, r) for k in keys for r in summaries[k].delta_ratio]


def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:.0f}%"


def _decay_claim(keys: Sequence[str], max_factor: float, min_r2: float) -> ClaimCheck:
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        factor, r2 = fit_log_ratio_vs_depth(_points(summaries, keys))
        held = r2 >= min_r2 and factor <= max_factor
        return Verdict(held, f"ln(first/last delta) vs depth: R^2 = {r2:.3f} (need >= {min_r2}), "
                             f"per-layer factor {factor:.3f} (need <= {max_factor})")
    return check


def _fastest_decay_claim(by_activation: Mapping[str, Sequence[str]], fastest: str) -> ClaimCheck:
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        factors = {act: fit_log_ratio_vs_depth(_points(summaries, keys))[0]
                   for act, keys in by_activation.items()}
        others = {a: f for a, f in factors.items() if a != fastest}
        held = all(factors[fastest] < f for f in others.values())
        listing = ", ".join(f"{a} {f:.2f}" for a, f in sorted(factors.items(), key=lambda kv: kv[1]))
        return Verdict(held, f"per-layer factors: {listing}")
    return check


def _ratio_within_claim(key: str, low: float, high: float) -> ClaimCheck:
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        s = summaries[key]
        g = s.delta_ratio_geomean
        seeds = ", ".join(f"{r:.3g}" for r in s.delta_ratio)
        return Verdict(low <= g <= high, f"{s.label}: first/last delta {g:.3g} (seeds: {seeds}), "
                                         f"need within [{low:g}, {high:g}]")
    return check


def _beats_baseline_claim(baseline: str, fixes: Sequence[str], margin: float) -> ClaimCheck:
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        base = summaries[baseline].test_acc_mean
        parts, held = [], True
        for key in fixes:
            s = summaries[key]
            gain = s.test_acc_mean - base
            ok = gain >= margin
            held &= ok
            verdict = "" if ok else ", FALLS SHORT"
            parts.append(f"{s.label} {_pct(s.test_acc_mean)} ({100 * gain:+.0f} pts{verdict})")
        return Verdict(held, f"baseline {_pct(base)}; " + "; ".join(parts))
    return check


def _half_fix_claim(baseline: str, pairs: Sequence[tuple[str, str]], margin: float) -> ClaimCheck:
    """Each half-fix ends ``margin`` below the full fix it imitates; say which beat the baseline."""
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        base = summaries[baseline].test_acc_mean
        parts, held = [], True
        for half, full in pairs:
            h, f = summaries[half], summaries[full]
            short = f.test_acc_mean - h.test_acc_mean
            held &= short >= margin
            fixed = "beats" if h.test_acc_mean - base >= 0.3 else "does NOT beat"
            parts.append(f"{h.label} {_pct(h.test_acc_mean)} vs {f.label} {_pct(f.test_acc_mean)} "
                         f"({100 * short:.0f} pts short; {fixed} the baseline by 30 pts)")
        return Verdict(held, "; ".join(parts))
    return check


def _exploding_claim(keys: Sequence[str], min_ratio: float) -> ClaimCheck:
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        parts, held = [], True
        for key in keys:
            s = summaries[key]
            grows = s.delta_ratio_geomean > min_ratio or s.any_nonfinite
            says = any(w in s.main_finding.lower() for w in ("explod", "non-finite", "nonfinite"))
            held &= grows and says
            parts.append(f"{s.label}: first/last delta {s.delta_ratio_geomean:.3g}, "
                         f"non-finite in {sum(s.nonfinite)}/{len(s.nonfinite)} seeds, "
                         f"finding '{s.main_finding}'")
        return Verdict(held, "; ".join(parts))
    return check


def _dying_claim(relu: str, leaky: str, min_dead: float) -> ClaimCheck:
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        r, k = summaries[relu], summaries[leaky]
        held = r.dead_frac_mean >= min_dead and k.dead_frac_mean == 0.0
        return Verdict(held, f"dead units at the end: {r.label} {_pct(r.dead_frac_mean)} "
                             f"(need >= {_pct(min_dead)}), {k.label} {_pct(k.dead_frac_mean)} (need 0); "
                             f"test accuracy {_pct(r.test_acc_mean)} vs {_pct(k.test_acc_mean)}")
    return check


# --- the seed preset -------------------------------------------------------------------------

_DEPTHS = (2, 5, 10, 20)
_ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu")
# Five epochs of Adam keep the whole default lab near a minute on two cores; every=5
# logs about five times an epoch. See the runner's docs for the measured times.
SEED_TRAIN = TrainSettings(optimizer="adam", lr=3e-3, epochs=5, batch_size=64, every=5)
DYING_LR = 0.03


def _seed_preset() -> Preset:
    t = SEED_TRAIN
    grid = [grid_entry("depth", f"{a}-d{d}-default", ModelConfig(depth=d, activation=a), t)
            for a in _ACTIVATIONS for d in _DEPTHS]
    fixes = [
        ("relu-he", ModelConfig(depth=20, activation="relu", init="he")),
        ("leaky_relu-he", ModelConfig(depth=20, activation="leaky_relu", init="he")),
        ("sigmoid-batchnorm", ModelConfig(depth=20, activation="sigmoid", batch_norm=True)),
        ("sigmoid-residual", ModelConfig(depth=20, activation="sigmoid", residual=True)),
        ("sigmoid-d3", ModelConfig(depth=3, activation="sigmoid")),
        ("tanh-xavier", ModelConfig(depth=20, activation="tanh", init="xavier")),
    ]
    grid += [grid_entry("fixes", name, m, t) for name, m in fixes]
    grid.append(grid_entry("half-fixes", "sigmoid-xavier",
                           ModelConfig(depth=20, activation="sigmoid", init="xavier"), t))
    # sigma_w2 = 8 makes each ReLU layer multiply the delta by about sqrt(8 / 2) = 2, so the
    # delta grows ~1e4-1e5 times toward the input (sigma_w2 = 4 gives ~7e2, which the
    # diagnosis's 1e3 threshold does not call exploding).
    grid.append(grid_entry("exploding", "relu-scaled8",
                           ModelConfig(depth=20, activation="relu", init="scaled", sigma_w2=8.0), t))
    # Dying ReLU: a narrow net trained with a large step; units whose inputs go negative
    # for every example stop passing gradient and never come back.
    fast = replace(t, lr=DYING_LR)
    for act in ("relu", "leaky_relu"):
        model = ModelConfig(depth=10, width=8, activation=act, init="he")
        grid.append(grid_entry("dying-relu", f"{act}-narrow", model, fast,
                               label=f"{describe(model)}, Adam lr {DYING_LR:g}"))

    baseline = "depth/sigmoid-d20-default"
    by_act = {a: [f"depth/{a}-d{d}-default" for d in _DEPTHS] for a in _ACTIVATIONS}
    claims = (
        Claim("sigmoid at default init: ln(first/last delta) falls linearly with depth, "
              "by a per-layer factor <= 0.25 (the sigmoid derivative's maximum)",
              _decay_claim(by_act["sigmoid"], max_factor=0.25, min_r2=0.9)),
        Claim("the sigmoid's delta shrinks fastest per layer of the four activations",
              _fastest_decay_claim(by_act, "sigmoid")),
        Claim("ReLU with He init at depth 20 keeps the first/last delta within [0.1, 10]",
              _ratio_within_claim("fixes/relu-he", 0.1, 10.0)),
        Claim("at depth 20 each fix beats the sigmoid baseline's test accuracy by >= 30 points",
              _beats_baseline_claim(baseline, [f"fixes/{n}" for n, _ in fixes], margin=0.30)),
        Claim("the half-fixes fall >= 10 points short of the fixes they imitate",
              _half_fix_claim(baseline, [("depth/relu-d20-default", "fixes/relu-he"),
                                         ("half-fixes/sigmoid-xavier", "fixes/tanh-xavier")],
                              margin=0.10)),
        Claim("too large an initialisation makes gradients grow toward the input "
              "(first/last delta > 10, or non-finite) and the run says so",
              _exploding_claim(["exploding/relu-scaled8"], min_ratio=10.0)),
        Claim("a narrow deep ReLU net ends with many dead units; LeakyReLU beside it has none",
              _dying_claim("dying-relu/relu-narrow", "dying-relu/leaky_relu-narrow", min_dead=0.3)),
    )
    return Preset(
        name="seed",
        description="the seeds' story: depth sweep, the fixes and half-fixes at depth 20, "
                    "exploding gradients, dying ReLU",
        grid=tuple(grid),
        claims=claims,
        dataset="digits",
        seeds=3,
    )


register_preset(_seed_preset())


# --- the meanfield preset ----------------------------------------------------------------------

# Schoenholz et al. 2017, "Deep information propagation", figure 5: tanh networks train up to
# about 6 xi_c layers, xi_c the correlation depth scale of mean-field theory; the deepest
# trainable nets sit at the edge of chaos, chi_1 = 1 (sigma_w2 = 1.76 at sigma_b2 = 0.05).
MEANFIELD_SIGMA_B2 = 0.05
MEANFIELD_SIGMA_W2 = (0.5, 1.0, 1.5, 1.76, 2.5, 3.0, 4.0)
MEANFIELD_DEPTHS = (5, 10, 20, 40, 60)
# Three epochs of Adam: short training, as the paper's heatmap is of a fixed, small budget;
# the whole grid (35 configurations x 2 seeds) stays within a few minutes on two cores.
MEANFIELD_TRAIN = TrainSettings(optimizer="adam", lr=1e-3, epochs=3, batch_size=64, every=10)
TRAINED_ACC = 0.3  # digits has 10 classes: chance is 10%; below 30% a run did not train


@functools.lru_cache(maxsize=256)
def _trainable_depth(activation: str, sigma_w2: float, sigma_b2: float) -> float:
    from gradwatch.theory import predict  # here, not at import: the lab runs without scipy's cost

    return predict(activation, sigma_w2, sigma_b2).trainable_depth


def _trainable_depths(summaries: Mapping[str, ConfigSummary]) -> dict[str, float]:
    """6 xi_c of each scaled-init configuration's (activation, sigma_w2, sigma_b2)."""
    return {key: _trainable_depth(s.entry.model.activation, s.entry.model.sigma_w2, s.entry.model.sigma_b2)
            for key, s in summaries.items() if s.entry.model.init == "scaled"}


def _cell(s: ConfigSummary, limit: float) -> str:
    m = s.entry.model
    return f"sigma_w2 {m.sigma_w2:g} depth {m.depth} ({_pct(s.test_acc_mean)}, 6 xi_c {limit:.0f})"


def _beyond_claim(keys: Sequence[str], min_share: float) -> ClaimCheck:
    """Of the configurations deeper than 6 xi_c, at least ``min_share`` end below TRAINED_ACC."""
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        chosen = {k: summaries[k] for k in keys}
        limits = _trainable_depths(chosen)
        beyond = [k for k in keys if chosen[k].entry.model.depth > limits[k]]
        trained = [k for k in beyond if chosen[k].test_acc_mean >= TRAINED_ACC]
        share = 1 - len(trained) / len(beyond) if beyond else math.nan
        exceptions = "; ".join(_cell(chosen[k], limits[k]) for k in trained) or "none"
        return Verdict(bool(beyond) and share >= min_share,
                       f"{len(beyond) - len(trained)} of {len(beyond)} configurations deeper than 6 xi_c "
                       f"end below {_pct(TRAINED_ACC)} (need >= {_pct(min_share)}); "
                       f"trained anyway: {exceptions}")
    return check


def _agreement_claim(keys: Sequence[str], min_share: float) -> ClaimCheck:
    """The 6 xi_c curve classifies at least ``min_share`` of the configurations (trained or not)."""
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        chosen = {k: summaries[k] for k in keys}
        limits = _trainable_depths(chosen)
        wrong = [k for k in keys
                 if (chosen[k].entry.model.depth <= limits[k]) != (chosen[k].test_acc_mean >= TRAINED_ACC)]
        share = 1 - len(wrong) / len(keys)
        listing = "; ".join(_cell(chosen[k], limits[k]) for k in wrong) or "none"
        return Verdict(share >= min_share,
                       f"{len(keys) - len(wrong)} of {len(keys)} configurations agree "
                       f"({_pct(share)}, need >= {_pct(min_share)}); disagree: {listing}")
    return check


def _best_near_critical_claim(keys: Sequence[str], sigma_b2: float, factor: float) -> ClaimCheck:
    """At the largest depth, the best sigma_w2 is within ``factor`` of the critical one."""
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        from gradwatch.theory import critical_sigma_w2

        chosen = [summaries[k] for k in keys]
        deepest = max(s.entry.model.depth for s in chosen)
        row = sorted((s for s in chosen if s.entry.model.depth == deepest),
                     key=lambda s: s.entry.model.sigma_w2)
        best = max(row, key=lambda s: s.test_acc_mean)
        critical = critical_sigma_w2(best.entry.model.activation, sigma_b2)
        w2 = best.entry.model.sigma_w2
        listing = ", ".join(f"{s.entry.model.sigma_w2:g}: {_pct(s.test_acc_mean)}" for s in row)
        return Verdict(critical / factor <= w2 <= critical * factor,
                       f"depth {deepest}: best sigma_w2 {w2:g} ({_pct(best.test_acc_mean)}); critical "
                       f"{critical:.3g}, need within [{critical / factor:.3g}, {critical * factor:.3g}]; "
                       f"accuracy by sigma_w2: {listing}")
    return check


def meanfield_key(sigma_w2: float, depth: int) -> str:
    """The meanfield preset's config key of one grid cell, ``grid/tanh-w<sigma_w2>-d<depth>``."""
    return f"grid/tanh-w{sigma_w2:g}-d{depth}"


def meanfield_preset(
    sigma_w2: Sequence[float] = MEANFIELD_SIGMA_W2,
    depths: Sequence[int] = MEANFIELD_DEPTHS,
    *,
    train: TrainSettings = MEANFIELD_TRAIN,
    seeds: int = 2,
) -> Preset:
    """The ``meanfield`` preset: tanh MLPs, ``init='scaled'``, sigma_b2 = 0.05, over
    ``depths`` x ``sigma_w2``, with claims over that grid (smaller grids for tests).
    """
    grid = tuple(
        grid_entry("grid", meanfield_key(w2, d).split("/", 1)[1],
                   ModelConfig(depth=d, activation="tanh", init="scaled", sigma_w2=w2,
                               sigma_b2=MEANFIELD_SIGMA_B2), train)
        for d in depths for w2 in sigma_w2
    )
    keys = [e.config_key for e in grid]
    claims = (
        Claim(f"tanh nets deeper than 6 xi_c fail to train: >= 80% of them end below "
              f"{_pct(TRAINED_ACC)} test accuracy (chance 10%)", _beyond_claim(keys, 0.8)),
        Claim(f"the 6 xi_c curve separates the grid: >= 80% of configurations train (>= {_pct(TRAINED_ACC)}) "
              "exactly when shallower than 6 xi_c", _agreement_claim(keys, 0.8)),
        Claim("at the largest depth the best sigma_w2 is near the critical one (chi_1 = 1), "
              "within a factor 1.5", _best_near_critical_claim(keys, MEANFIELD_SIGMA_B2, 1.5)),
    )
    return Preset(
        name="meanfield",
        description="tanh trainability over depth x sigma_w2 (scaled init, sigma_b2 0.05, 3 epochs) "
                    "against mean-field theory's 6 xi_c (Schoenholz et al. 2017); about 3.5 min on 2 cores",
        grid=grid,
        claims=claims,
        dataset="digits",
        seeds=seeds,
    )


register_preset(meanfield_preset())
