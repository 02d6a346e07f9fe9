"""What the lab's runners share: tasks, results, events, the one watched run, the backends.

A :class:`RunTask` is one configuration at one seed; :meth:`RunTask.run` trains it under
:func:`gradwatch.watch` and returns a :class:`RunResult`. A :class:`Backend` runs work
items (anything with ``run_name``, ``entry`` and ``run(on_epoch, should_stop)``: a
:class:`RunTask`, or a seed group of :mod:`gradwatch.lab.vectorized`) and reports
:class:`RunEvent` s. :mod:`gradwatch.lab.runner` plans the grid and reads the store
back; :mod:`gradwatch.lab.vectorized` trains several seeds as one batched network.
Both import this module and neither needs the other's internals.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import torch

from gradwatch.config import WatchConfig
from gradwatch.lab.data import Dataset, iterate_minibatches, load_dataset
from gradwatch.lab.models import build_model
from gradwatch.lab.presets import GridEntry, TrainSettings
from gradwatch.store import RunStore
from gradwatch.watch import watch

__all__ = [
    "STOP_MESSAGE",
    "RunTask",
    "RunResult",
    "RunEvent",
    "StoppedByUser",
    "train_task",
    "Work",
    "Backend",
    "InProcessBackend",
    "LocalBackend",
    "task_dataset",
    "make_optimizer",
    "watch_settings",
    "diagnoser",
    "diagnose_run",
    "default_workers",
]

STOP_MESSAGE = "stopped by the user before the run finished"


def default_workers() -> int:
    """The number of cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


# --- tasks, results, events ----------------------------------------------------------------------


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
    def run_name(self) -> str:
        """``preset/config_key/seedN``: the run's name in the store."""
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

    def run(self, on_epoch: Callable[[int, float], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> RunResult:
        """Train this task under :func:`gradwatch.watch`; never raises (see :func:`train_task`)."""
        return train_task(self, on_epoch, should_stop)


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


class Work(Protocol):
    """What a :class:`Backend` runs: a :class:`RunTask`, or a group of them trained together."""

    @property
    def run_name(self) -> str:
        """The name the progress display shows."""

    @property
    def entry(self) -> GridEntry:
        """The configuration (its ``train.epochs`` sizes the progress display)."""

    def run(self, on_epoch: Callable[[int, float], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> RunResult:
        """Train; never raises (a broken run comes back as a ``failed`` result)."""


# --- what every run needs ------------------------------------------------------------------------


@lru_cache(maxsize=8)
def task_dataset(name: str, seed: int, cache_dir: str | None) -> Dataset:
    """:func:`gradwatch.lab.data.load_dataset`, cached per process: the seeds of a grid
    that share a worker load (or generate) each split once.
    """
    return load_dataset(name, seed=seed, cache_dir=cache_dir)


def watch_settings(train: TrainSettings) -> WatchConfig:
    """How a lab run is recorded, by both runners: the configuration's cadence, no live
    alerts (each run is diagnosed once it ends), and the window on the CPU too (lab runs are
    small, and every step's gradient-norm extremes are part of the lab contract).
    """
    return WatchConfig(every=train.every, warn=False, window=True)


def make_optimizer(train: TrainSettings, params) -> torch.optim.Optimizer:
    """The lab's optimizer: SGD (with ``train.momentum``) or Adam, at ``train.lr``."""
    # foreach: one fused call over all parameters; torch picks it only for CUDA by default.
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, foreach=True)
    return torch.optim.Adam(params, lr=train.lr, foreach=True)


def diagnoser() -> Callable | None:
    """``gradwatch.diagnose.diagnose`` when that module exists, else None."""
    try:
        from gradwatch.diagnose import diagnose
    except ModuleNotFoundError as err:
        if err.name == "gradwatch.diagnose":
            return None
        raise
    return diagnose


def diagnose_run(store: RunStore, run_id: int) -> str | None:
    """Diagnose a finished run, storing its findings; a note if the diagnosis failed."""
    diagnose = diagnoser()
    if diagnose is None:
        return None
    try:
        diagnose(run_id, store=store)  # saves the findings in the store (replacing older ones)
    except Exception as err:  # noqa: BLE001 - the run itself finished; keep it
        return f"diagnose failed: {type(err).__name__}: {err}"
    return None


# --- one run -------------------------------------------------------------------------------------


def train_task(
    task: RunTask,
    on_epoch: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunResult:
    """Train one configuration at one seed under :func:`gradwatch.watch`; never raises.

    Scalars follow docs/lab-contract.md: ``loss`` every step, and at each epoch's last
    step ``epoch``, ``train_loss``, ``test_loss`` and ``test_acc``. After the run,
    :func:`gradwatch.diagnose` (when installed) stores its findings.

    Args:
        task: what to run.
        on_epoch: called with ``(epoch, test_acc)`` after each epoch.
        should_stop: polled after each epoch; True ends the run as ``stopped``
            (the run is marked failed in the store, so a resume runs it again).
    """
    start = time.perf_counter()
    run_id = None
    if should_stop is not None and should_stop():
        return RunResult(task, "stopped", None, None, 0.0, STOP_MESSAGE)
    try:
        data = task_dataset(task.dataset, task.seed, task.cache_dir)
        model = build_model(task.entry.model, data.input_shape, data.n_classes, seed=task.seed)
        train = task.entry.train
        optimizer = make_optimizer(train, model.parameters())
        order = torch.Generator().manual_seed(task.seed)
        loss_fn = torch.nn.functional.cross_entropy
        with RunStore(task.store) as store:
            with watch(model, optimizer, store=store, run_name=task.run_name, config=task.config(),
                       settings=watch_settings(train)) as watcher:
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
                        raise StoppedByUser(STOP_MESSAGE)
            note = diagnose_run(store, run_id)
        return RunResult(task, "finished", run_id, acc, time.perf_counter() - start, note)
    except StoppedByUser:
        return RunResult(task, "stopped", run_id, None, time.perf_counter() - start, STOP_MESSAGE)
    except Exception as err:  # noqa: BLE001 - one broken run must not end the grid
        return RunResult(task, "failed", run_id, None, time.perf_counter() - start,
                         f"{type(err).__name__}: {err}")


# --- backends ------------------------------------------------------------------------------------


class Backend(Protocol):
    """Where runs execute. ``run`` calls each item's ``run`` (:class:`Work`).

    It calls ``notify`` in the caller's thread with each :class:`RunEvent` (``start``,
    ``epoch``, ``end`` with the :class:`RunResult`). On ``KeyboardInterrupt`` it starts
    no new task, asks running ones to stop at their next epoch, ``notify``s every
    result it has, and re-raises.
    """

    workers: int

    def run(self, tasks: Sequence[Work], notify: Callable[[RunEvent], None]) -> None:
        """Run every task, reporting through ``notify``."""


_events: Any = None
_stop: Any = None


def _init_worker(events: Any, stop: Any) -> None:
    global _events, _stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides how to stop
    torch.set_num_threads(1)
    _events, _stop = events, stop


def _work(index: int, task: Work) -> RunResult:
    epochs, name = task.entry.train.epochs, task.run_name
    _events.put(RunEvent(index, "start", name, 0, epochs))
    return task.run(lambda e, acc: _events.put(RunEvent(index, "epoch", name, e, epochs, acc)),
                    _stop.is_set)


@dataclass
class InProcessBackend:
    """Runs tasks one after another in this process (debugging, tests, notebooks).

    Ctrl-C interrupts the run in progress (marked failed in the store) and re-raises.
    """

    workers: int = 1

    def run(self, tasks: Sequence[Work], notify: Callable[[RunEvent], None]) -> None:  # noqa: D102
        for i, task in enumerate(tasks):
            name = task.run_name
            notify(RunEvent(i, "start", name, 0, task.entry.train.epochs))

            def on_epoch(epoch: int, acc: float, i: int = i, task: Work = task) -> None:
                notify(RunEvent(i, "epoch", task.run_name, epoch, task.entry.train.epochs, acc))

            notify(RunEvent(i, "end", name, result=task.run(on_epoch)))


def _result(future: Future, task: Work | None) -> RunResult | None:
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

    def run(self, tasks: Sequence[Work], notify: Callable[[RunEvent], None]) -> None:  # noqa: D102
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
