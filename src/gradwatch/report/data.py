"""What a report reads: runs from the store and, for a lab, its ``lab.json``, gathered once.

Readers only: everything here comes from :class:`~gradwatch.store.RunStore` queries
and the lab's ``lab.json`` (docs/lab-contract.md); nothing reaches back into hooks.
Per-layer time series are thinned to :data:`MAX_POINTS` logged steps per run (the
first and last kept), which is all a figure can show and keeps a report of many long
runs small and fast.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradwatch.errors import ConfigError, GradwatchError, StoreError
from gradwatch.numbers import delta_ratio, weight_layers
from gradwatch.store import RunStore, open_store

__all__ = [
    "MAX_POINTS",
    "NothingToPlot",
    "ReportData",
    "RunData",
    "load",
    "read_lab",
]

MAX_POINTS = 200
LAB_FILE = "lab.json"
# The global values the figures draw (docs/lab-contract.md); others stay in the store.
SCALARS = ("loss", "epoch", "train_loss", "test_loss", "test_acc")


class NothingToPlot(GradwatchError, LookupError):
    """A figure was asked of runs that hold none of the data it draws."""


@dataclass(frozen=True)
class RunData:
    """One run as the report sees it.

    Attributes:
        id: run id in the store.
        name: run name (user text: escape before putting it in HTML).
        status: finished, running, failed or interrupted.
        config: the run's config (the lab's keys are in docs/lab-contract.md).
        initial: per-layer metrics at the first logged step (initialisation).
        scalars: the global values the report draws (:data:`SCALARS`), every step.
        findings: stored findings (``RunStore.findings``), empty if none.
        last_step: the last step with a scalar (NaN if none).
    """

    id: int
    name: str
    status: str
    config: dict[str, Any]
    initial: pd.DataFrame = field(repr=False)
    scalars: pd.DataFrame = field(repr=False)
    findings: pd.DataFrame = field(repr=False)
    last_step: float = math.nan
    read_series: Callable[[], pd.DataFrame] | None = field(default=None, repr=False, compare=False)
    read_weights: Callable[[], pd.DataFrame] | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def weight_samples(self) -> pd.DataFrame:
        """Tracked individual weights (``RunStore.weight_samples``); empty if none were recorded."""
        if self.read_weights is None:
            return pd.DataFrame(columns=["step", "layer_id", "layer", "index", "value"])
        return self.read_weights()

    @functools.cached_property
    def metrics(self) -> pd.DataFrame:
        """Per-layer metrics over training, logged steps thinned to :data:`MAX_POINTS`.

        Read from the store on first use: only the runs a figure draws over time pay for it.
        """
        return self.read_series() if self.read_series is not None else self.initial

    @property
    def lab(self) -> dict[str, Any]:
        """The ``lab`` part of the config (empty for a run the lab did not make)."""
        lab = self.config.get("lab")
        return lab if isinstance(lab, dict) else {}

    @property
    def model(self) -> dict[str, Any]:
        """The ``model`` part of the config (empty if absent)."""
        model = self.config.get("model")
        return model if isinstance(model, dict) else {}

    @property
    def group(self) -> str:
        """Configuration key: runs with the same key are seeds of one configuration."""
        return str(self.lab.get("config_key") or f"run {self.id}")

    @property
    def label(self) -> str:
        """Human label: the lab's label, else the run name."""
        return str(self.lab.get("label") or self.name)

    @functools.cached_property
    def weight_layers(self) -> pd.DataFrame:
        """:attr:`metrics` rows of parameterised layers except normalisation (the depth axis)."""
        return weight_layers(self.metrics)

    @functools.cached_property
    def initial_profile(self) -> pd.DataFrame:
        """Weight layers at the first logged step, input side first."""
        return weight_layers(self.initial).sort_values("layer_id")

    @functools.cached_property
    def delta_ratio(self) -> float:
        """First/last weight layer delta RMS at the first logged step: the lab contract's
        number, :func:`gradwatch.numbers.delta_ratio` (what ``lab.json`` and ``gradwatch show`` give).
        """
        return delta_ratio(self.initial)

    def final(self, name: str) -> float:
        """Last recorded value of a scalar (NaN if never recorded)."""
        if name not in self.scalars:
            return math.nan
        values = self.scalars[name].dropna()
        return float(values.iloc[-1]) if len(values) else math.nan

    def epoch_of_steps(self, steps: np.ndarray) -> np.ndarray | None:
        """Fractional epochs of steps from the ``epoch`` scalar at each epoch's last step.

        None when the run logged no epochs (then figures use steps).
        """
        if "epoch" not in self.scalars:
            return None
        ends = self.scalars.dropna(subset=["epoch"])
        if ends.empty:
            return None
        xs = np.concatenate([[-1.0], ends["step"].to_numpy(float)])
        ys = np.concatenate([[ends["epoch"].iloc[0] - 1.0], ends["epoch"].to_numpy(float)])
        return np.interp(np.asarray(steps, float), xs, ys, right=np.nan)


@dataclass(frozen=True)
class ReportData:
    """Everything one report draws: the runs, in order, and the lab's summary if any.

    Attributes:
        store: path of the run store.
        runs: the runs, in the order asked (the lab's order for a lab).
        lab: the parsed ``lab.json``, or None.
        lab_dir: the lab's output directory, or None.
    """

    store: Path
    runs: list[RunData]
    lab: dict[str, Any] | None = None
    lab_dir: Path | None = None

    @functools.cached_property
    def groups(self) -> dict[str, list[RunData]]:
        """Runs by configuration key, in first-seen order."""
        out: dict[str, list[RunData]] = {}
        for run in self.runs:
            out.setdefault(run.group, []).append(run)
        return out

    @functools.cached_property
    def featured(self) -> list[RunData]:
        """Up to two runs to look at closely: the worst gradient flow, and a contrast.

        The worst is the run whose first/last delta ratio is furthest from 1 (vanishing
        or exploding); the contrast is the best test accuracy among the others of the
        same depth (any depth if none), else the ratio closest to 1.
        """
        scored = [(abs(math.log10(r.delta_ratio)), r) for r in self.runs if r.delta_ratio > 0]
        if not scored:
            return [r for r in self.runs if not r.initial.empty][:2]
        worst = max(scored, key=lambda s: s[0])[1]
        others = [(s, r) for s, r in scored if r.id != worst.id]
        if not others:
            return [worst]
        depth = len(worst.initial_profile)
        others = [(s, r) for s, r in others if len(r.initial_profile) == depth] or others  # same depth first
        accurate = [(r.final("test_acc"), r) for _, r in others if not math.isnan(r.final("test_acc"))]
        if accurate:
            contrast = max(accurate, key=lambda a: a[0])[1]
        else:
            contrast = min(others, key=lambda s: s[0])[1]
        return [worst, contrast]


def read_lab(lab_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``lab.json`` of a lab output directory.

    Raises:
        ConfigError: the directory or its ``lab.json`` is missing or not valid JSON.
    """
    directory = Path(lab_dir).expanduser()
    path = directory / LAB_FILE
    if not directory.is_dir():
        raise ConfigError(
            f"lab directory {directory} does not exist; pass the OUT directory of a lab "
            f"run (it holds {LAB_FILE} and gradwatch.db)"
        )
    if not path.is_file():
        raise ConfigError(
            f"no {LAB_FILE} in {directory}; the lab writes it when its grid finishes. Run "
            f"`gradwatch lab` to the end, or report runs by id: gradwatch report RUN ..."
        )
    try:
        lab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not readable JSON ({err}); rerun the lab to write it again") from err
    if not isinstance(lab, dict) or not isinstance(lab.get("configs", []), list):
        raise ConfigError(
            f"{path} does not follow the lab contract: expected an object with a 'configs' "
            f"list (docs/lab-contract.md)"
        )
    return lab


def _lab_run_ids(lab: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    for config in lab.get("configs", []):
        for run_id in config.get("run_ids", []) if isinstance(config, dict) else []:
            if run_id not in ids:
                ids.append(run_id)
    return ids


def _thin(metrics: pd.DataFrame, max_points: int) -> pd.DataFrame:
    steps = np.unique(metrics["step"].to_numpy())
    if len(steps) <= max_points:
        return metrics.reset_index(drop=True)
    keep = steps[np.unique(np.linspace(0, len(steps) - 1, max_points).round().astype(int))]
    return metrics[metrics["step"].isin(keep)].reset_index(drop=True)


def _read_initial(st: RunStore, run_id: int, first_scalar_step: float) -> pd.DataFrame:
    """Per-layer rows of the first logged step, reading no more than the steps up to it."""
    head = pd.DataFrame()
    if not math.isnan(first_scalar_step):  # watch() writes scalars on every logged step
        head = st.metrics(run_id, steps=(-(2**62), int(first_scalar_step)))
    if head.empty:
        head = st.metrics(run_id)
    return head[head["step"] == head["step"].min()].reset_index(drop=True)


def _series_reader(source: RunStore | Path, run_id: int, max_points: int) -> Callable[[], pd.DataFrame]:
    def read() -> pd.DataFrame:
        if isinstance(source, RunStore):
            return _thin(source.metrics(run_id), max_points)
        with open_store(source) as st:
            return _thin(st.metrics(run_id), max_points)

    return read


def _weights_reader(source: RunStore | Path, run_id: int) -> Callable[[], pd.DataFrame]:
    def read() -> pd.DataFrame:
        if isinstance(source, RunStore):
            return source.weight_samples(run_id)
        with open_store(source) as st:
            return st.weight_samples(run_id)

    return read


def _load_run(st: RunStore, source: RunStore | Path, info: dict[str, Any], max_points: int) -> RunData:
    run_id = int(info["id"])
    scalars = st.scalars(run_id, names=SCALARS)
    first = float(scalars["step"].min()) if len(scalars) else math.nan
    return RunData(
        id=run_id,
        name=str(info["name"]),
        status=str(info["status"]),
        config=info["config"] if isinstance(info["config"], dict) else {},
        initial=_read_initial(st, run_id, first),
        scalars=scalars,
        findings=st.findings(run_id),
        last_step=float(info["last_step"]) if pd.notna(info["last_step"]) else math.nan,
        read_series=_series_reader(source, run_id, max_points),
        read_weights=_weights_reader(source, run_id),
    )


def load(
    store: RunStore | str | os.PathLike | None = None,
    runs: Sequence[int | str] | None = None,
    lab_dir: str | os.PathLike | None = None,
    *,
    max_points: int = MAX_POINTS,
) -> ReportData:
    """Read the runs a report draws.

    Args:
        store: a :class:`RunStore` or its path. Default: the lab's store for a lab
            (``lab.json``'s ``store``, relative to ``lab_dir``), else ``$GRADWATCH_STORE``
            or ``./gradwatch-runs/gradwatch.db``.
        runs: run ids or names. Default: the lab's runs, else every run in the store.
        lab_dir: a lab output directory holding ``lab.json``. Default: none.
        max_points: logged steps kept per run for the time-series figures. Default: 200.

    Raises:
        ConfigError: ``lab_dir`` has no readable ``lab.json``.
        StoreError: no store at the path, or a store with no runs.
        RunNotFoundError: a run id or name the store does not hold.
    """
    lab = read_lab(lab_dir) if lab_dir is not None else None
    if store is None and lab is not None:
        store = Path(lab_dir).expanduser() / str(lab.get("store") or "gradwatch.db")
    owned = not isinstance(store, RunStore)
    st = open_store(store) if owned else store
    try:
        table = st.runs()
        if table.empty:
            raise StoreError(
                f"the store {st.path} holds no runs yet; watch a training run "
                f"(gradwatch.watch) or run `gradwatch lab` first"
            )
        if runs:
            wanted: Sequence[int | str] = runs
        elif lab is not None:
            wanted = _lab_run_ids(lab)
            if not wanted:
                raise ConfigError(
                    f"{Path(lab_dir) / LAB_FILE} lists no run ids in its configs; rerun the lab, "
                    f"or report runs by id: gradwatch report RUN ..."
                )
        else:
            wanted = table["id"].tolist()
        ids = list(dict.fromkeys(st.resolve(r) for r in wanted))
        by_id = {int(row["id"]): row for row in table.to_dict("records")}
        source = st if not owned else st.path  # a store we opened is closed below, reopened on demand
        loaded = [_load_run(st, source, by_id[i], max_points) for i in ids]
    finally:
        if owned:
            st.close()
    return ReportData(
        store=st.path,
        runs=loaded,
        lab=lab,
        lab_dir=Path(lab_dir).expanduser() if lab_dir is not None else None,
    )
