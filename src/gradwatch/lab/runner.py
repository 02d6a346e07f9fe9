"""The lab's runner: a preset's grid x seeds as watched training runs in one store.

:func:`run_lab` is the whole lab: check the inputs, skip runs the store already
finished (resume), run the rest on a :class:`Backend`, then read every run back
from the store into per-configuration :class:`~gradwatch.lab.presets.ConfigSummary`
s, check the preset's claims and write ``OUT/lab.json`` (docs/lab-contract.md).

The backend boundary: a backend gets picklable :class:`RunTask` s and calls
:func:`run_task` for each wherever it likes, forwarding :class:`RunEvent` s to the
driver. :class:`LocalBackend` uses a process pool on this machine; a Ray backend
needs only the same two functions. Each run writes its own rows to the shared
SQLite store (WAL, several writers), so the store holds every finished run even
when the driver is stopped.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch

from gradwatch.errors import ConfigError, GradwatchError
from gradwatch.lab.data import BUILTIN_DATASETS, Dataset, iterate_minibatches, load_dataset
from gradwatch.lab.models import build_model
from gradwatch.lab.presets import (
    ConfigSummary,
    GridEntry,
    PaperRow,
    Preset,
    TrainSettings,
    Verdict,
    get_preset,
    paper_table,
)
from gradwatch.store import RunStore
from gradwatch.watch import watch

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
_STOP_MESSAGE = "stopped by the user before the run finished"


def default_out_dir(preset: str) -> Path:
    """``./gradwatch-runs/lab-<preset>``."""
    return Path("gradwatch-runs") / f"lab-{Path(preset).stem if preset.endswith('.json') else preset}"


def default_workers() -> int:
    """The number of cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


# --- one run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunTask:
    """One configuration at one seed: everything a worker needs, picklable.

    Attributes:
        preset: the preset's name (stored in the run's config).
        entry: the configuration.
        seed: seeds the train/test split, the weights and the batch order.
        dataset: a built-in name or an absolute path.
        store: path of the shared store file.
        cache_dir: where generated data sets are cached.
    """

    preset: str
    entry: GridEntry
    seed: int
    dataset: str
    store: str
    cache_dir: str | None = None

    @property
    def run_name(self) -> str:  # noqa: D102
        return f"{self.preset}/{self.entry.config_key}/seed{self.seed}"

    def config(self) -> dict[str, Any]:
        """The run's config as docs/lab-contract.md lays it out."""
        e = self.entry
        return {
            "lab": {"preset": self.preset, "section": e.section, "label": e.label,
                    "config_key": e.config_key, "seed": self.seed},
            "model": e.model.to_dict(),
            "train": e.train.to_dict(),
            "dataset": self.dataset,
        }


@dataclass(frozen=True)
class RunResult:
    """What became of a task: ``finished``, ``failed`` (an error) or ``stopped`` (Ctrl-C)."""

    task: RunTask
    status: str
    run_id: int | None = None
    test_acc: float | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class RunEvent:
    """Progress of task ``index`` (run ``name``): ``start``, ``epoch`` (``epoch`` of ``epochs``
    done, with its test accuracy), ``end`` (with the :class:`RunResult`), or ``resumed``
    (finished in the store before: not run again).
    """

    index: int
    kind: str
    name: str = ""
    epoch: int = 0
    epochs: int = 0
    test_acc: float | None = None
    result: RunResult | None = None


class StoppedByUser(Exception):
    """Raised inside a run at an epoch boundary when the driver asks to stop."""


@lru_cache(maxsize=8)
def _dataset(name: str, seed: int, cache_dir: str | None) -> Dataset:
    return load_dataset(name, seed=seed, cache_dir=cache_dir)


def _optimizer(train: TrainSettings, params) -> torch.optim.Optimizer:
    # foreach: one fused call over all parameters; torch picks it only for CUDA by default.
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, foreach=True)
    return torch.optim.Adam(params, lr=train.lr, foreach=True)


def run_task(
    task: RunTask,
    on_epoch: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunResult:
    """Train one configuration at one seed under :func:`gradwatch.watch`; never raises.

    Scalars follow docs/lab-contract.md: ``loss`` every step, and at each epoch's last
    step ``epoch``, ``train_loss``, ``test_loss`` and ``test_acc``. After the run,
    :func:`gradwatch.diagnose` (when installed) stores its findings.

    Args:
        task: what to run; a :class:`~gradwatch.lab.vectorized.SeedGroup` (several seeds
            of one configuration) goes to :func:`~gradwatch.lab.vectorized.run_group`,
            which trains them as one batched network and returns a ``GroupResult``.
        on_epoch: called with ``(epoch, test_acc)`` after each epoch.
        should_stop: polled after each epoch; True ends the run as ``stopped``
            (the run is marked failed in the store, so a resume runs it again).
    """
    if not isinstance(task, RunTask):  # a SeedGroup
        from gradwatch.lab.vectorized import run_group

        return run_group(task, on_epoch, should_stop)
    start = time.perf_counter()
    run_id = None
    if should_stop is not None and should_stop():
        return RunResult(task, "stopped", None, None, 0.0, _STOP_MESSAGE)
    try:
        data = _dataset(task.dataset, task.seed, task.cache_dir)
        model = build_model(task.entry.model, data.input_shape, data.n_classes, seed=task.seed)
        train = task.entry.train
        optimizer = _optimizer(train, model.parameters())
        order = torch.Generator().manual_seed(task.seed)
        loss_fn = torch.nn.functional.cross_entropy
        with RunStore(task.store) as store:
            # window=True: the lab records every step's gradient-norm extremes on the CPU too
            # (its runs are small; lab.vectorized records the same)
            with watch(model, optimizer, every=train.every, store=store, run_name=task.run_name,
                       config=task.config(), warn=False, window=True) as watcher:
                run_id = watcher.run_id
                for epoch in range(1, train.epochs + 1):
                    model.train()
                    losses = []
                    for xb, yb in iterate_minibatches(data.x_train, data.y_train, train.batch_size, order):
                        optimizer.zero_grad(set_to_none=True)
                        loss = loss_fn(model(xb), yb)
                        loss.backward()
                        optimizer.step()
                        losses.append(loss.detach())
                        watcher.log(loss=losses[-1])
                    model.eval()
                    with torch.no_grad():
                        logits = model(data.x_test)
                        test_loss = loss_fn(logits, data.y_test).item()
                        acc = (logits.argmax(1) == data.y_test).float().mean().item()
                    watcher.log(epoch=epoch, train_loss=torch.stack(losses).mean(), test_loss=test_loss,
                                test_acc=acc)
                    if on_epoch is not None:
                        on_epoch(epoch, acc)
                    if should_stop is not None and should_stop() and epoch < train.epochs:
                        raise StoppedByUser(_STOP_MESSAGE)
            note = _diagnose(store, run_id)
        return RunResult(task, "finished", run_id, acc, time.perf_counter() - start, note)
    except StoppedByUser:
        return RunResult(task, "stopped", run_id, None, time.perf_counter() - start, _STOP_MESSAGE)
    except Exception as err:  # noqa: BLE001 - one broken run must not end the grid
        return RunResult(task, "failed", run_id, None, time.perf_counter() - start,
                         f"{type(err).__name__}: {err}")


def _diagnoser() -> Callable | None:
    """``gradwatch.diagnose.diagnose`` when that module exists, else None."""
    try:
        from gradwatch.diagnose import diagnose
    except ModuleNotFoundError as err:
        if err.name == "gradwatch.diagnose":
            return None
        raise
    return diagnose


def _diagnose(store: RunStore, run_id: int) -> str | None:
    """Diagnose a finished run, storing its findings; a note if the diagnosis failed."""
    diagnose = _diagnoser()
    if diagnose is None:
        return None
    try:
        diagnose(run_id, store=store)  # saves the findings in the store (replacing older ones)
    except Exception as err:  # noqa: BLE001 - the run itself finished; keep it
        return f"diagnose failed: {type(err).__name__}: {err}"
    return None


# --- backends ----------------------------------------------------------------------------------


class Backend(Protocol):
    """Where runs execute. ``run`` calls :func:`run_task` for every task.

    It calls ``notify`` in the caller's thread with each :class:`RunEvent` (``start``,
    ``epoch``, ``end`` with the :class:`RunResult`). On ``KeyboardInterrupt`` it starts
    no new task, asks running ones to stop at their next epoch, ``notify``s every
    result it has, and re-raises.
    """

    workers: int

    def run(self, tasks: Sequence[RunTask], notify: Callable[[RunEvent], None]) -> None:
        """Run every task, reporting through ``notify``."""


_events: Any = None
_stop: Any = None


def _init_worker(events: Any, stop: Any) -> None:
    global _events, _stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides how to stop
    torch.set_num_threads(1)
    _events, _stop = events, stop


def _work(index: int, task: RunTask) -> RunResult:
    epochs, name = task.entry.train.epochs, task.run_name
    _events.put(RunEvent(index, "start", name, 0, epochs))
    return run_task(task, lambda e, acc: _events.put(RunEvent(index, "epoch", name, e, epochs, acc)),
                    _stop.is_set)


@dataclass
class InProcessBackend:
    """Runs tasks one after another in this process (debugging, tests, notebooks).

    Ctrl-C interrupts the run in progress (marked failed in the store) and re-raises.
    """

    workers: int = 1

    def run(self, tasks: Sequence[RunTask], notify: Callable[[RunEvent], None]) -> None:  # noqa: D102
        for i, task in enumerate(tasks):
            name = task.run_name
            notify(RunEvent(i, "start", name, 0, task.entry.train.epochs))

            def on_epoch(epoch: int, acc: float, i: int = i, task: RunTask = task) -> None:
                notify(RunEvent(i, "epoch", task.run_name, epoch, task.entry.train.epochs, acc))

            notify(RunEvent(i, "end", name, result=run_task(task, on_epoch)))


def _result(future: Future, task: RunTask | None) -> RunResult | None:
    """The future's result; a worker that died (e.g. out of memory) gives a failed result."""
    try:
        return future.result()
    except Exception as err:  # noqa: BLE001 - BrokenProcessPool and the like
        return None if task is None else RunResult(task, "failed", error=f"{type(err).__name__}: {err}")


@dataclass
class LocalBackend:
    """A process pool on this machine, one torch thread per worker.

    Attributes:
        workers: processes. Default: the number of cores.
        grace_s: after Ctrl-C, how long running tasks get to stop at an epoch boundary
            before their processes are ended. Default: 30.
    """

    workers: int = field(default_factory=default_workers)
    grace_s: float = 30.0

    def run(self, tasks: Sequence[RunTask], notify: Callable[[RunEvent], None]) -> None:  # noqa: D102
        if not tasks:
            return
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe once torch has threads
        events, stop = ctx.Queue(), ctx.Event()
        pool = ProcessPoolExecutor(min(self.workers, len(tasks)), mp_context=ctx,
                                   initializer=_init_worker, initargs=(events, stop))
        futures: dict[Future, int] = {pool.submit(_work, i, t): i for i, t in enumerate(tasks)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                self._drain(events, notify)
                for f in done:
                    notify(RunEvent(futures[f], "end", tasks[futures[f]].run_name,
                                         result=_result(f, tasks[futures[f]])))
            pool.shutdown(wait=True)
        except KeyboardInterrupt:
            stop.set()
            for f in pending:
                f.cancel()
            self._wind_down(pool, pending, futures, events, notify)
            try:
                # Join the pool's manager thread now (its workers have stopped or were ended): left
                # running, CPython 3.11's exit hook races it on a closing wake-up pipe and prints
                # "OSError: [Errno 9] Bad file descriptor" after our clean stop.
                pool.shutdown(wait=True, cancel_futures=True)
            except KeyboardInterrupt:  # a further Ctrl-C: do not wait
                pass
            raise
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            self._drain(events, notify)

    def _wind_down(self, pool: ProcessPoolExecutor, pending: set[Future], futures: dict[Future, int],
                   events: Any, notify: Callable[[RunEvent], None]) -> None:
        """Collect what running tasks return as they stop; end them after ``grace_s``."""
        running = {f for f in pending if not f.cancelled()}
        deadline = time.monotonic() + self.grace_s
        try:
            while running and time.monotonic() < deadline:
                done, running = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
                self._drain(events, notify)
                for f in done:
                    result = None if f.cancelled() else _result(f, None)
                    if result is not None:
                        notify(RunEvent(futures[f], "end", result.task.run_name, result=result))
        except KeyboardInterrupt:  # a second Ctrl-C: do not wait
            pass
        if running:  # their runs stay unfinished in the store; a resume runs them again
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()

    @staticmethod
    def _drain(events: Any, notify: Callable[[RunEvent], None]) -> None:
        while True:
            try:
                event = events.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            notify(event)


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


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}; expected an integer >= 1")


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
    _check_count("seeds", seeds)
    if epochs is not None:
        _check_count("epochs", epochs)
    if workers is not None:
        _check_count("workers", workers)
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
    from gradwatch.lab.vectorized import plan_runs  # it builds on this module

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
            _diagnose(store, run_ids[i])
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
