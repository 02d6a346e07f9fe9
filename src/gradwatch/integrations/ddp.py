"""Watch a model trained on several processes (``torchrun``, DistributedDataParallel).

**Which gradient is recorded.** DDP all-reduces (averages) gradients during backward,
so when ``optimizer.step()`` runs every rank holds the same ``.grad``. The watcher
measures weight gradients in the optimizer's pre-step hook: ``grad_norm``,
``total_grad_norm`` and ``update_ratio`` are **post-reduce**, the gradient the
optimizer applies, identical on every rank. That is why rank 0 alone records by
default. Local to each rank are the values measured during its own forward and
backward on its own shard of the batch: ``delta_rms`` (the back-propagated error,
pre-reduce), the output moments, and the activation statistics.

``all_ranks=True`` records every rank, each as its own run in the one store (SQLite
in WAL mode takes several writers; no row is dropped): named ``NAME/rank{r}``, with
``config["ddp"] = {"rank", "world_size", "group", "records"}``. :func:`rank_metrics`
reads a group back as one DataFrame with a ``rank`` column.

Errors are shared: if rank 0 cannot open the store (or, with ``all_ranks``, any rank
cannot), every rank raises the same clear error instead of waiting forever in the
next collective.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import pandas as pd
import torch
from torch import nn

from gradwatch.errors import StoreError, WatchError
from gradwatch.store import RunStore
from gradwatch.watch import Watcher, watch

__all__ = ["rank_info", "watch_ddp", "IdleWatcher", "rank_runs", "rank_metrics", "rank_scalars"]


def rank_info() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: from ``torch.distributed`` when it is
    initialised, else from torchrun's ``RANK``/``WORLD_SIZE``, else ``(0, 1)``.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class IdleWatcher:
    """What a rank that does not record gets: the :class:`~gradwatch.Watcher` calls a
    training loop makes, doing nothing. ``run_id`` is rank 0's run.
    """

    def __init__(self, run_id: int | None, rank: int) -> None:
        self.run_id = run_id
        self.rank = rank
        self.store = None
        self._attached = True

    @property
    def attached(self) -> bool:
        """True until :meth:`detach`."""
        return self._attached

    def log(self, **values: Any) -> None:
        """Nothing: rank 0 records."""

    def flush(self) -> None:
        """Nothing: rank 0 records."""

    def detach(self, *, error: BaseException | None = None) -> None:
        """Nothing to remove; idempotent."""
        self._attached = False

    def __enter__(self) -> IdleWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"<IdleWatcher rank {self.rank}; rank 0 records run {self.run_id}>"


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (its forward calls ours, hooks fire, and
    layer names carry no ``module.`` prefix).
    """
    inner = getattr(model, "module", None)
    if isinstance(model, nn.parallel.DistributedDataParallel) and isinstance(inner, nn.Module):
        return inner
    return model


def _exchange(obj: Any, distributed: bool, world: int) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` outside torch.distributed)."""
    if not distributed:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _raise_shared(statuses: list[tuple[str, str, str] | None], rank: int,
                  own_error: list[BaseException]) -> None:
    """Raise the first failing rank's error on every rank (the original one on that rank)."""
    for r, status in enumerate(statuses):
        if status is not None and status[0] == "error":
            if r == rank and own_error:
                raise own_error[0]
            _, kind, message = status
            cls = StoreError if kind == "StoreError" else WatchError
            raise cls(f"rank {r} could not start watching: {message}")


def watch_ddp(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    all_ranks: bool = False,
    store: RunStore | str | os.PathLike | None = None,
    run_name: str | None = None,
    config: dict[str, Any] | None = None,
    **watch_kwargs: Any,
) -> Watcher | IdleWatcher:
    """:func:`gradwatch.watch` for a process group: call it on **every** rank.

    Args:
        model: the model, or its ``DistributedDataParallel`` wrapper (unwrapped).
        optimizer: as for :func:`~gradwatch.watch`.
        all_ranks: record every rank (one run per rank). Default: False, rank 0 records
            and the other ranks get an :class:`IdleWatcher`.
        store: a path shared by the ranks (the same file on one machine, or a shared
            file system). Default: ``$GRADWATCH_STORE``, else ``./gradwatch-runs``.
        run_name: the run's name (``NAME/rank{r}`` with ``all_ranks``). Default: the
            model's class name and rank 0's time.
        config: stored with the run; ``ddp`` is added (rank, world_size, group, records).
        **watch_kwargs: ``every``, ``include``, ... passed to :func:`~gradwatch.watch`.

    Returns:
        The rank's :class:`~gradwatch.Watcher`, or an :class:`IdleWatcher` on ranks
        that do not record.

    Raises:
        StoreError, WatchError: on every rank, when the recording rank(s) cannot start
            (an unwritable store path, a model without parameters, ...).
    """
    rank, world = rank_info()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    model = _unwrap(model)
    if not all_ranks and any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise WatchError(
            "watch_ddp() got a sharded model (FSDP2 / DTensor parameters): its norms are "
            "collectives in which every rank must take part, so rank 0 alone cannot record them. "
            "Call gradwatch.watch(model, optimizer, run_name=f'NAME/rank{rank}') on every rank, "
            "or watch_ddp(..., all_ranks=True)"
        )
    if isinstance(store, RunStore):
        store = store.path  # each process opens its own connection
    # rank 0 names the run and the group, so that every rank agrees
    name = run_name or f"{type(model).__name__}-{time.strftime('%Y%m%d-%H%M%S')}"
    plan = _exchange((name, uuid.uuid4().hex[:12]) if rank == 0 else None, distributed, world)[0]
    name, group = plan if plan is not None else (name, "")
    records = all_ranks or rank == 0

    own_error: list[BaseException] = []

    def start(previous_ok: bool) -> tuple[Watcher | None, tuple[str, str, str] | None]:
        if not (records and previous_ok):
            return None, None
        full = {**(config or {}),
                "ddp": {"rank": rank, "world_size": world, "group": group,
                        "records": "all_ranks" if all_ranks else "rank0"}}
        try:
            watcher = watch(model, optimizer, store=store, config=full,
                            run_name=f"{name}/rank{rank}" if all_ranks else name, **watch_kwargs)
        except Exception as err:  # every rank must hear of it, or the others wait forever
            own_error.append(err)
            return None, ("error", type(err).__name__, str(err))
        return watcher, ("ok", str(watcher.run_id), "")

    # Rank 0 first: it creates the store file, so the others never race on the schema.
    watcher, status = start(rank == 0)
    first = _exchange(status if rank == 0 else None, distributed, world)
    _raise_shared(first, rank, own_error)
    if all_ranks and world > 1:
        late, late_status = start(rank != 0)
        watcher = watcher or late
        statuses = _exchange(late_status, distributed, world)
        if any(s is not None and s[0] == "error" for s in statuses) and watcher is not None:
            watcher.detach(error=WatchError("another rank could not start watching"))
        _raise_shared(statuses, rank, own_error)
    if watcher is not None:
        return watcher
    run_id = int(first[0][1]) if first[0] is not None and first[0][0] == "ok" else None
    return IdleWatcher(run_id, rank)


def rank_runs(store: RunStore, run: int | str) -> dict[int, int]:
    """Rank -> run id of every run in ``run``'s DDP group (``run``: any rank's id or name)."""
    info = store.run(run)
    ddp = info["config"].get("ddp") if isinstance(info["config"], dict) else None
    if not isinstance(ddp, dict) or not ddp.get("group"):
        raise StoreError(
            f"run {run!r} was not recorded by watch_ddp (its config has no 'ddp' group); "
            f"read it with store.metrics({info['id']})"
        )
    runs = store.runs()
    out = {}
    for row in runs.itertuples():
        other = row.config.get("ddp") if isinstance(row.config, dict) else None
        if isinstance(other, dict) and other.get("group") == ddp["group"]:
            out[int(other["rank"])] = int(row.id)
    return dict(sorted(out.items()))


def rank_metrics(store: RunStore, run: int | str, **kwargs: Any) -> pd.DataFrame:
    """:meth:`RunStore.metrics` of every rank of ``run``'s group, with a ``rank`` column."""
    frames = [store.metrics(rid, **kwargs).assign(rank=r) for r, rid in rank_runs(store, run).items()]
    return pd.concat(frames, ignore_index=True)


def rank_scalars(store: RunStore, run: int | str, names: list[str] | None = None) -> pd.DataFrame:
    """:meth:`RunStore.scalars` of every rank of ``run``'s group, with a ``rank`` column."""
    frames = [store.scalars(rid, names).assign(rank=r) for r, rid in rank_runs(store, run).items()]
    return pd.concat(frames, ignore_index=True)
