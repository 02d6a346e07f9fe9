"""Ray: the lab's grid as Ray tasks (``gradwatch lab --backend ray [--address ...]``).

:class:`RayBackend` is a :class:`~gradwatch.lab.runner.Backend`. Each
:class:`~gradwatch.lab.runner.RunTask` runs as a Ray task (one CPU) through the same
:func:`~gradwatch.lab.runner.run_task` as the local backends, writing into a store of
its own in the worker's temporary directory. The task returns its rows; the driver
alone writes them into the lab's store, so no SQLite file is shared across machines
and the numbers are the local backend's for the same seeds. Progress (start, epochs)
and Ctrl-C reach the workers through one small actor.

Pointing it at a cluster: start one (``ray start --head --port 6379`` on the head,
``ray start --address HEAD:6379`` on the others), install the same gradwatch and torch
on every node, then ``gradwatch lab --backend ray --address HEAD:6379`` (or ``auto`` on a
cluster node). Built-in data sets are generated on the workers; a ``.npz``/``.csv``
data set must sit at the same path on every node. Without ``--address`` a local
cluster is started on this machine for the lab and stopped after it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gradwatch.errors import ConfigError, GradwatchError, StoreError, check_int
from gradwatch.integrations import require
from gradwatch.lab.runner import RunEvent, RunResult, RunTask, run_task
from gradwatch.store import RunStore

__all__ = ["RayBackend", "RayConnectionError", "cli_backend", "dump_run", "load_run", "BACKENDS"]

BACKENDS = ("local", "ray")


class RayConnectionError(GradwatchError, ConnectionError):
    """No Ray cluster answers at the address given."""


# --- a run's rows, from a worker's store to the driver's --------------------------------------


def dump_run(path: str | os.PathLike, run_id: int) -> bytes:
    """Run ``run_id`` of the store at ``path`` as the bytes of a store file holding only it.

    Bytes pickle to the driver whatever the cluster; :func:`load_run` copies the run out of
    them with :meth:`RunStore.copy_run`, so every table the store has, tracked weights
    included, arrives as recorded.
    """
    with tempfile.TemporaryDirectory(prefix="gradwatch-run-") as tmp:
        file = Path(tmp) / "run.db"
        with RunStore(path, create=False) as store:
            store.copy_run(run_id, file)
        return file.read_bytes()


def load_run(store: RunStore, data: bytes) -> int:
    """Copy the run :func:`dump_run` packed into ``store``; returns its new id.

    A run still marked ``running`` there (its worker died before finishing it) is stored as
    ``failed``, so that a resume runs it again.
    """
    with tempfile.TemporaryDirectory(prefix="gradwatch-run-") as tmp:
        file = Path(tmp) / "run.db"
        file.write_bytes(data)
        with RunStore(file, create=False) as packed:
            ids = packed.runs()["id"].tolist()
            if len(ids) != 1:
                raise StoreError(f"a packed run holds one run; got {len(ids)}")
            unfinished = packed.run(int(ids[0]))["status"] in ("running", "interrupted")
            run_id = packed.copy_run(int(ids[0]), store)
    if unfinished:
        store.finish_run(run_id, "failed", "the worker stopped before the run finished")
    return run_id


# --- the worker side ---------------------------------------------------------------------------


class _Channel:
    """An actor: run events from the workers to the driver, and the driver's stop request."""

    def __init__(self) -> None:
        self._events: list[RunEvent] = []
        self._stop = False

    def put(self, event: RunEvent) -> None:
        self._events.append(event)

    def drain(self) -> list[RunEvent]:
        events, self._events = self._events, []
        return events

    def stop(self) -> None:
        self._stop = True

    def stopped(self) -> bool:
        return self._stop


def _cache_dir(wanted: str | None, scratch: str) -> str:
    """The driver's data cache when this node can use it (a local cluster), else scratch."""
    if wanted:
        try:
            Path(wanted).mkdir(parents=True, exist_ok=True)
            if os.access(wanted, os.W_OK):
                return wanted
        except OSError:
            pass
    return str(Path(scratch) / "data")


def _run_on_worker(index: int, task: RunTask, channel: Any) -> tuple[RunResult, dict[str, Any] | None]:
    """A Ray task: run ``task`` into a scratch store and return its result and rows."""
    import ray
    import torch

    torch.set_num_threads(1)  # as the local backend's workers: same numbers, no oversubscription
    name, epochs = task.run_name, task.entry.train.epochs
    sent = []

    def send(event: RunEvent) -> None:
        sent.append(channel.put.remote(event))

    with tempfile.TemporaryDirectory(prefix="gradwatch-ray-") as scratch:
        local = replace(task, store=str(Path(scratch) / "gradwatch.db"),
                        cache_dir=_cache_dir(task.cache_dir, scratch))
        send(RunEvent(index, "start", name, 0, epochs))
        result = run_task(local, lambda e, acc: send(RunEvent(index, "epoch", name, e, epochs, acc)),
                          lambda: ray.get(channel.stopped.remote()))
        rows = dump_run(local.store, result.run_id) if result.run_id is not None else None
    ray.wait(sent, num_returns=len(sent), timeout=30)  # the driver drains them before this run's end
    return replace(result, task=task), rows


# --- the driver side ---------------------------------------------------------------------------


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r}; expected auto, HOST:PORT or ray://HOST:PORT")
    return host, int(port)


def _probe(address: str, timeout_s: float) -> None:
    """Wait until ``HOST:PORT`` accepts a TCP connection, at most ``timeout_s`` seconds.

    Ray's own connect retries for minutes against an address where nothing listens.
    """
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(2.0, left)):
                return
        except OSError as err:
            last = err
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    reason = f" ({last.strerror or last})" if last is not None else ""
    raise RayConnectionError(
        f"no Ray cluster answers at {address}{reason} after waiting {timeout_s:g} s; start one there with "
        f"`ray start --head --port {port}`, check the address, or leave --address out to run a local cluster"
    )


def _failed(task: RunTask, err: BaseException) -> RunResult:
    cause = getattr(err, "cause", None) or err  # a RayTaskError carries the worker's exception
    return RunResult(task, "failed", error=f"{type(cause).__name__}: {cause}")


@dataclass
class RayBackend:
    """Runs a lab grid's tasks on a Ray cluster; the driver alone writes the store.

    Attributes:
        address: ``None`` starts a local cluster (stopped afterwards); ``"auto"`` joins the
            cluster this machine belongs to; ``"HOST:PORT"`` or ``"ray://HOST:PORT"``
            connects to one. Ignored when Ray is already initialised in this process.
        workers: at most this many runs at once; 0: as many as the cluster's CPUs allow
            (each run takes one CPU). A local cluster gets this many CPUs (0: all).
        connect_timeout_s: how long an address may take to answer. Default: 10.
        grace_s: after Ctrl-C, how long running tasks get to stop at an epoch boundary
            before they are cancelled. Default: 30.
        init_kwargs: more ``ray.init`` arguments (``runtime_env``, ``namespace``, ...).
    """

    address: str | None = None
    workers: int = 0
    connect_timeout_s: float = 10.0
    grace_s: float = 30.0
    init_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.address not in (None, "auto"):
            _host_port(self.address)
        check_int("workers", self.workers, 0, "0: the cluster decides")

    def connect(self) -> bool:
        """Initialise Ray unless it is; True when this call did (and so should shut it down)."""
        ray = require("ray", "ray")
        if ray.is_initialized():
            return False
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, **self.init_kwargs}
        if self.address is None:
            # a cluster of this machine alone needs no other interface than loopback
            options.setdefault("_node_ip_address", "127.0.0.1")
            if self.workers:
                options.setdefault("num_cpus", self.workers)
        elif self.address != "auto":
            _probe(self.address, self.connect_timeout_s)
        try:
            ray.init(address=self.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = "this machine" if self.address in (None, "auto") else self.address
            raise RayConnectionError(
                f"cannot connect to a Ray cluster at {where}: {err}; start one with `ray start --head`, "
                f"or pass its HOST:PORT with --address"
            ) from err
        return True

    def run(self, tasks: Sequence[RunTask], notify: Callable[[RunEvent], None]) -> None:  # noqa: D102
        if not tasks:
            return
        started = self.connect()
        import ray

        channel = ray.remote(num_cpus=0)(_Channel).remote()
        remote = ray.remote(num_cpus=1, max_retries=0)(_run_on_worker)
        waiting = list(range(len(tasks)))
        running: dict[Any, int] = {}
        ended: set[int] = set()
        stores: dict[str, RunStore] = {}

        def submit() -> None:
            while waiting and (not self.workers or len(running) < self.workers):
                i = waiting.pop(0)
                running[remote.remote(i, tasks[i], channel)] = i

        def drain() -> None:
            try:
                events = ray.get(channel.drain.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - progress only; results come with the tasks
                return
            for event in events:
                if event.index not in ended:  # a late start/epoch of a run already ended
                    notify(event)

        def collect(ref: Any) -> None:
            i = running.pop(ref)
            try:
                result, rows = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - the worker died or raised outside run_task
                result, rows = _failed(tasks[i], err), None
            drain()
            if rows is not None:
                path = tasks[i].store
                store = stores.get(path) or stores.setdefault(path, RunStore(path))
                result = replace(result, run_id=load_run(store, rows))
            ended.add(i)
            notify(RunEvent(i, "end", tasks[i].run_name, result=result))

        try:
            submit()
            while running:
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
                drain()
                for ref in done:
                    collect(ref)
                submit()
        except KeyboardInterrupt:
            waiting.clear()
            channel.stop.remote()
            self._wind_down(running, collect)
            raise
        finally:
            for store in stores.values():
                store.close()
            ray.kill(channel)
            if started:
                ray.shutdown()

    def _wind_down(self, running: dict[Any, int], collect: Callable[[Any], None]) -> None:
        """Collect what running tasks return as they stop; cancel them after ``grace_s``."""
        import ray

        deadline = time.monotonic() + self.grace_s
        try:
            while running and time.monotonic() < deadline:
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
                for ref in done:
                    collect(ref)
        except KeyboardInterrupt:  # a second Ctrl-C: do not wait
            pass
        for ref in list(running):  # their runs are not in the store; a resume runs them again
            ray.cancel(ref, force=True)


def cli_backend(backend: str, address: str | None, workers: int | None) -> RayBackend | None:
    """The backend ``gradwatch lab --backend NAME [--address ...]`` asks for (None: local)."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "local":
        if address is not None:
            raise ConfigError("--address is for --backend ray; add --backend ray or leave --address out")
        return None
    require("ray", "ray")
    return RayBackend(address=address, workers=workers or 0)
