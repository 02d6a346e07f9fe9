"""The lab's runner: a preset's grid x seeds as watched training runs in one store.

:func:`run_lab` is the whole lab: check the inputs, skip runs the store already
finished (resume), run the rest on a :class:`Backend`, then read every run back
from the store into per-configuration :class:`~gradwatch.lab.presets.ConfigSummary`
s, check the preset's claims and write ``OUT/lab.json`` (docs/lab-contract.md).

The backend boundary: a backend gets picklable work items (:class:`RunTask` s, or
seed groups of :mod:`gradwatch.lab.vectorized`; :class:`~gradwatch.lab.tasks.Work`)
and runs each wherever it likes (``item.run(...)``, or :func:`run_task`), forwarding
:class:`RunEvent` s to the driver. The task types and the backends live in
:mod:`gradwatch.lab.tasks`, which both runners import. :class:`LocalBackend` uses a
process pool on this machine; a Ray backend needs only the same two functions. Each
run writes its own rows to the shared SQLite store (WAL, several writers), so the
store holds every finished run even when the driver is stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gradwatch.errors import ConfigError, GradwatchError, check_int
from gradwatch.lab.data import BUILTIN_DATASETS, load_dataset
from gradwatch.lab.presets import (
    ConfigSummary,
    PaperRow,
    Preset,
    Verdict,
    get_preset,
    paper_table,
)
from gradwatch.lab.tasks import (
    Backend,
    InProcessBackend,
    LocalBackend,
    RunEvent,
    RunResult,
    RunTask,
    default_workers,
    diagnose_run,
    train_task,
)
from gradwatch.lab.vectorized import SeedGroup, plan_runs, run_group
from gradwatch.store import RunStore

__all__ = [
    "LAB_FILE",
    "STORE_FILE",
    "RunTask",
    "RunEvent",
    "RunResult",
    "Backend",
    "LocalBackend",
    "InProcessBackend",
    "LabInterrupted",
    "LabResult",
    "run_task",
    "plan_tasks",
    "finished_runs",
    "summarize",
    "check_claims",
    "run_lab",
    "default_out_dir",
    "default_workers",
]

LAB_FILE = "lab.json"
STORE_FILE = "gradwatch.db"


def default_out_dir(preset: str) -> Path:
    """``./gradwatch-runs/lab-<preset>``."""
    return Path("gradwatch-runs") / f"lab-{Path(preset).stem if preset.endswith('.json') else preset}"


# --- one run ----------------------------------------------------------------------------------


def run_task(
    task: RunTask | SeedGroup,
    on_epoch: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunResult:
    """:func:`gradwatch.lab.tasks.train_task` of a task, or :func:`run_group` of a seed group.

    Never raises; the run's scalars and findings are those of ``train_task``.

    Args:
        task: what to run; a :class:`~gradwatch.lab.vectorized.SeedGroup` (several seeds
            of one configuration) goes to :func:`~gradwatch.lab.vectorized.run_group`,
            which trains them as one batched network and returns a ``GroupResult``.
        on_epoch: called with ``(epoch, test_acc)`` after each epoch.
        should_stop: polled after each epoch; True ends the run as ``stopped``
            (the run is marked failed in the store, so a resume runs it again).
    """
    if isinstance(task, SeedGroup):
        return run_group(task, on_epoch, should_stop)
    return train_task(task, on_epoch, should_stop)


# --- planning and resume -----------------------------------------------------------------------


def _dataset_key(dataset: str) -> str:
    """Built-in names lower-case; files by absolute path (what the run's config stores)."""
    if dataset.lower() in BUILTIN_DATASETS and not Path(dataset).is_file():
        return dataset.lower()
    return str(Path(dataset).expanduser().resolve())


def plan_tasks(preset: Preset, *, dataset: str, seeds: int, epochs: int | None, store: Path,
               cache_dir: Path | None = None) -> list[RunTask]:
    """Every (configuration, seed) of the grid, with ``epochs`` overriding the preset's.

    An entry with its own ``dataset`` trains on it; the others on ``dataset``.
    """
    tasks = []
    for entry in preset.grid:
        if epochs is not None:
            entry = replace(entry, train=replace(entry.train, epochs=epochs))
        data = _dataset_key(entry.dataset) if entry.dataset is not None else dataset
        for seed in range(seeds):
            tasks.append(RunTask(preset.name, entry, seed, data, str(store),
                                 None if cache_dir is None else str(cache_dir)))
    return tasks


def _resume_key(config: dict[str, Any]) -> tuple | None:
    lab = config.get("lab")
    if not isinstance(lab, dict):
        return None
    model, train = config.get("model", {}), config.get("train", {})
    return (lab.get("config_key"), lab.get("seed"), config.get("dataset"), train.get("epochs"),
            json.dumps(model, sort_keys=True), json.dumps(train, sort_keys=True))


def _task_key(task: RunTask) -> tuple:
    return _resume_key(json.loads(json.dumps(task.config(), default=str)))  # type: ignore[return-value]


def finished_runs(store: RunStore, tasks: Sequence[RunTask]) -> dict[int, int]:
    """Task index -> id of a finished run in ``store`` with the same config key, seed,
    dataset, epochs (and model and training settings): what a resume skips.
    """
    runs = store.runs()
    done: dict[tuple, int] = {}
    for row in runs[runs["status"] == "finished"].itertuples():
        key = _resume_key(row.config)
        if key is not None:
            done[key] = int(row.id)  # the latest finished run wins
    return {i: done[k] for i, t in enumerate(tasks) if (k := _task_key(t)) in done}


# --- reading the store back ------------------------------------------------------------------


def _delta_ratio(metrics) -> float:
    """The run's delta ratio at the first logged step: :func:`gradwatch.numbers.delta_ratio`
    (first/last weight layer, normalisation layers not counted; docs/lab-contract.md).
    """
    from gradwatch.numbers import delta_ratio

    return delta_ratio(metrics)


def _dead_fraction(metrics) -> float:
    """Mean dead-unit fraction of the activation layers at the last logged step
    (:func:`gradwatch.numbers.dead_fraction`).
    """
    from gradwatch.numbers import dead_fraction

    return dead_fraction(metrics, "last")


try:
    from gradwatch.diagnose import KINDS as _KIND_TITLES
except ModuleNotFoundError as _err:  # until the diagnosis is installed
    if _err.name != "gradwatch.diagnose":
        raise
    _KIND_TITLES = {}
_SEVERITY = {"critical": 4, "error": 3, "high": 3, "warning": 2, "medium": 2, "info": 1, "low": 1}


def _main_finding(store: RunStore, run_id: int, ratio: float, nonfinite: bool, dead: float,
                  acc: float) -> str:
    """The most severe stored finding's title, else "no problem found".

    Every finished run is diagnosed (:func:`_diagnose`), so the stored findings are the one
    judgement of the run's numbers, with :class:`gradwatch.diagnose.Thresholds`; ``ratio``,
    ``nonfinite``, ``dead`` and ``acc`` are not judged a second time here.
    """
    findings = store.findings(run_id)
    if not findings.empty:
        rank = findings["severity"].map(lambda s: _SEVERITY.get(str(s).lower(), 0))
        kind = str(findings.loc[rank.idxmax(), "kind"])
        return _KIND_TITLES.get(kind, kind.replace("_", " "))
    return "no problem found"


def summarize(store: RunStore, preset: Preset, tasks: Sequence[RunTask],
              run_ids: dict[int, int]) -> list[ConfigSummary]:
    """One :class:`ConfigSummary` per grid entry from the finished runs ``run_ids``
    (task index -> run id), every number read from the store.
    """
    by_key: dict[str, list[tuple[int, int]]] = {}
    for i, task in enumerate(tasks):
        if i in run_ids:
            by_key.setdefault(task.entry.config_key, []).append((task.seed, run_ids[i]))
    out = []
    for entry in preset.grid:
        entry = next((t.entry for t in tasks if t.entry.config_key == entry.config_key), entry)
        cols: dict[str, list] = {k: [] for k in ("ids", "seeds", "acc", "ratio", "nonfinite", "dead", "find")}
        for seed, rid in sorted(by_key.get(entry.config_key, [])):
            metrics = store.metrics(rid, metrics=["delta_rms", "dead_frac"])
            scalars = store.scalars(rid, names=["loss", "test_acc", "nonfinite_grads"])
            acc = float(scalars["test_acc"].dropna().iloc[-1]) if "test_acc" in scalars else math.nan
            nonfinite = bool(
                ("nonfinite_grads" in scalars and (scalars["nonfinite_grads"] > 0).any())
                or ("loss" in scalars and not scalars["loss"].map(math.isfinite).all())
            )
            ratio, dead = _delta_ratio(metrics), _dead_fraction(metrics)
            for k, v in zip(cols, (rid, seed, acc, ratio, nonfinite, dead,
                                   _main_finding(store, rid, ratio, nonfinite, dead, acc)), strict=True):
                cols[k].append(v)
        out.append(ConfigSummary(entry, *(tuple(v) for v in cols.values())))
    return out


def check_claims(preset: Preset, summaries: Sequence[ConfigSummary], store: RunStore
                 ) -> list[tuple[str, Verdict]]:
    """Each claim's verdict; a claim whose configurations did not all finish is not held."""
    by_key = {s.config_key: s for s in summaries if s.run_ids}
    verdicts = []
    for claim in preset.claims:
        try:
            verdict = claim.check(by_key, store)
        except KeyError as err:
            verdict = Verdict(False, f"cannot check: configuration {err.args[0]} has no finished run")
        except (ValueError, ZeroDivisionError) as err:
            verdict = Verdict(False, f"cannot check: {err}")
        verdicts.append((claim.text, verdict))
    return verdicts


# --- the whole lab -------------------------------------------------------------------------


class LabInterrupted(GradwatchError):
    """Ctrl-C stopped the lab; every finished run is in the store and a rerun resumes."""

    def __init__(self, finished: int, total: int, store: Path) -> None:
        self.finished, self.total, self.store = finished, total, store
        super().__init__(
            f"stopped: {finished} of {total} runs are finished and kept in {store}; run the "
            f"same command again to resume"
        )


@dataclass
class LabResult:
    """A finished lab: summaries, claim verdicts, and where everything was written."""

    preset: Preset
    dataset: str
    seeds: int
    epochs: int
    out: Path
    store: Path
    summaries: list[ConfigSummary]
    claims: list[tuple[str, Verdict]]
    ran: int
    resumed: int
    failed: list[RunResult]
    seconds: float
    paper_rows: list[PaperRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """``lab.json`` as docs/lab-contract.md lays it out."""
        def num(x: float) -> float | None:
            return None if x is None or not math.isfinite(x) else x

        return {
            "preset": self.preset.name,
            "description": self.preset.description,
            "dataset": self.dataset,
            "seeds": self.seeds,
            "epochs": self.epochs,
            "store": os.path.relpath(self.store, self.out),
            "configs": [
                {"config_key": s.config_key, "section": s.entry.section, "label": s.label,
                 "run_ids": list(s.run_ids), "test_acc_mean": num(s.test_acc_mean),
                 "test_acc_std": num(s.test_acc_std), "delta_ratio_mean": num(s.delta_ratio_mean),
                 "delta_ratio_std": num(s.delta_ratio_std), "main_finding": s.main_finding}
                for s in self.summaries
            ],
            "claims": [{"claim": text, "held": v.held, "evidence": v.evidence} for text, v in self.claims],
            **({"paper": {"citation": self.preset.paper, "table": [r.to_dict() for r in self.paper_rows]}}
               if self.preset.paper or self.paper_rows else {}),
        }

    def write_json(self) -> Path:
        """Write ``OUT/lab.json`` (atomically) and return its path."""
        path = self.out / LAB_FILE
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        partial.replace(path)
        return path


def run_lab(
    preset: str | Preset = "seed",
    *,
    dataset: str | None = None,
    seeds: int | None = None,
    epochs: int | None = None,
    workers: int | None = None,
    out: str | os.PathLike | None = None,
    backend: Backend | None = None,
    notify: Callable[[RunEvent], None] | None = None,
    vectorize: bool | None = None,
) -> LabResult:
    """Run a preset's grid (resuming), summarise it from the store, check its claims,
    write ``OUT/lab.json``.

    Every input is checked before any training starts.

    Args:
        preset: a registered name, a ``.json`` grid file, or a :class:`Preset`. Default: ``"seed"``.
        dataset: ``"digits"``, ``"mnist1d"`` or a ``.npz``/``.csv`` path. Default: the preset's.
        seeds: seeds per configuration (0, 1, ...). Default: the preset's.
        epochs: overrides every configuration's epochs. Default: the preset's.
        workers: processes of the default :class:`LocalBackend`. Default: the number of cores.
        out: directory of the store (``gradwatch.db``), ``lab.json`` and generated data.
            Default: ``./gradwatch-runs/lab-<preset>``.
        backend: where runs execute. Default: ``LocalBackend(workers)``.
        notify: receives every :class:`RunEvent` (a progress display).
        vectorize: train the seeds of an MLP configuration together as one batched
            network (:mod:`gradwatch.lab.vectorized`: the same stored numbers, several
            times the throughput). Default: None, on with the default process pool, off
            with other backends.

    Raises:
        ConfigError: unknown preset (the message lists them), seeds/epochs/workers < 1,
            ``vectorize=True`` with a backend that runs single tasks only.
        DataError: the data set cannot be loaded.
        LabInterrupted: Ctrl-C; finished runs stay in the store.
    """
    started = time.perf_counter()
    spec = preset if isinstance(preset, Preset) else get_preset(preset)
    seeds = spec.seeds if seeds is None else seeds
    check_int("seeds", seeds, 1)
    if epochs is not None:
        check_int("epochs", epochs, 1)
    if workers is not None:
        check_int("workers", workers, 1)
    out_dir = Path(out) if out is not None else default_out_dir(spec.name)
    out_dir = out_dir.expanduser()
    cache_dir = out_dir / "data"
    name = _dataset_key(os.fspath(dataset if dataset is not None else spec.dataset))
    own = [_dataset_key(e.dataset) for e in spec.grid if e.dataset is not None]
    for data in dict.fromkeys([name, *own]):
        if data != "digits":  # load it once here: a bad file fails now, and MNIST-1D is cached
            load_dataset(data, seed=0, cache_dir=cache_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the output directory {out_dir}: {err.strerror}") from err
    store_path = out_dir / STORE_FILE
    tasks = plan_tasks(spec, dataset=name, seeds=seeds, epochs=epochs, store=store_path,
                       cache_dir=cache_dir)
    with RunStore(store_path) as store:
        run_ids = finished_runs(store, tasks)
    resumed = sorted(run_ids)
    todo = [i for i in range(len(tasks)) if i not in run_ids]
    plan = plan_runs([tasks[i] for i in todo], vectorize=vectorize, backend=backend)
    failed: list[RunResult] = []

    def on_event(event: RunEvent) -> None:
        index = todo[event.index]
        if event.kind == "end" and event.result is not None:
            if event.result.status == "finished" and event.result.run_id is not None:
                run_ids[index] = event.result.run_id
            elif event.result.status == "failed":
                failed.append(event.result)
        if notify is not None:
            notify(replace(event, index=index))

    if notify is not None:
        for i in resumed:
            notify(RunEvent(i, "resumed", tasks[i].run_name))
    runner = backend if backend is not None else LocalBackend(workers or default_workers())
    try:
        runner.run(plan.items, lambda event: [on_event(e) for e in plan.expand(event)])
    except KeyboardInterrupt:
        raise LabInterrupted(len(run_ids), len(tasks), store_path) from None

    with RunStore(store_path) as store:
        for i in resumed:  # diagnosed when they ran, perhaps by an older diagnosis
            diagnose_run(store, run_ids[i])
        summaries = summarize(store, spec, tasks, run_ids)
        verdicts = check_claims(spec, summaries, store)
        paper_rows = paper_table(spec, summaries, store)
    all_epochs = [t.entry.train.epochs for t in tasks]
    result = LabResult(
        preset=spec, dataset=", ".join(dict.fromkeys(t.dataset for t in tasks)) or name, seeds=seeds,
        epochs=max(set(all_epochs), key=all_epochs.count),
        out=out_dir, store=store_path, summaries=summaries, claims=verdicts,
        ran=len(todo), resumed=len(tasks) - len(todo), failed=failed,
        seconds=time.perf_counter() - started, paper_rows=paper_rows,
    )
    result.write_json()
    return result
