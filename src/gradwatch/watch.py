"""The Watcher: records per-layer gradient flow of a PyTorch model into a run store.

How it hooks the model (and why):

* One forward pre-hook and one forward hook on the **root** module, always. A
  training-mode forward with grad enabled marks step boundaries and, on logged
  steps only, *arms* per-layer hooks for the duration of that forward. On
  unlogged steps no per-layer hook exists at all, so the model runs its fast
  path and the watcher costs two Python calls per forward.
* On logged steps, a forward hook on each parameterised module records the
  output's mean/std and registers a **tensor hook on the output**, which
  receives ``dL/d(output)`` during backward: its squared norm gives
  ``delta_rms``. Full backward hooks are not used, since they raise on in-place
  ops after the module (``nn.ReLU(inplace=True)`` in ResNet blocks); a tensor
  hook registered before an in-place op still receives the gradient of the
  value the module produced.
* A forward *pre*-hook on each known activation module measures its inputs
  (saturated, green, dead fractions, mean phi'): the pre-hook sees the input
  before an in-place activation overwrites it.
* Optimizer step pre/post hooks (when an optimizer is given) take weight-gradient
  norms once per optimizer step on the accumulated (and, with a GradScaler,
  unscaled) gradient, and the update ratio ``||w_after - w_before|| / ||w_before||``.
  Without an optimizer, every training forward starts a step and gradient norms
  are taken at the end of its backward.

Everything is computed on the tensors' device; a logged step's statistics are
concatenated and moved to the host once, when the step closes (at the next
training forward, or on :meth:`Watcher.flush` / :meth:`Watcher.detach`).
"""

from __future__ import annotations

import fnmatch
import math
import os
import sys
import time
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradwatch.activations import Activation, activation_for_module
from gradwatch.errors import ConfigError, GradientWarning, WatchError
from gradwatch.stats import (
    ACTIVATION_STATS,
    activation_inputs,
    batched_region_stats,
    moments_from_sums,
    output_moments,
    sample_index,
    squared_norm,
)
from gradwatch.store import LAYER_METRICS, RunStore

__all__ = ["watch", "Watcher", "DEFAULT_EVERY"]

DEFAULT_EVERY = 10
# Steps closed without being written (unlogged steps with logged values) wait at most this long.
_MAX_WAITING_STEPS = 256
# Update ratios are measured on a fixed random sample of this many elements per weight
# (exact for smaller weights): a full copy of every weight costs more than the step.
_UPDATE_SAMPLE = 4096
_METRIC_INDEX = {name: i for i, name in enumerate(LAYER_METRICS)}
_CONV_TYPES = (nn.modules.conv._ConvNd,)

# model -> its watcher; weak on both sides so neither keeps the other alive.
_WATCHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Watcher]] = weakref.WeakKeyDictionary()


@dataclass
class _Layer:
    """One watched module: a parameterised layer or a known activation."""

    name: str
    module: nn.Module
    kind: str  # "param" | "activation"
    activation: Activation | None = None
    params: list[int] = field(default_factory=list)  # indices into Watcher._params
    layer_id: int | None = None  # forward order, assigned when first seen


@dataclass
class _Step:
    """Everything recorded during one step, on device until the step closes."""

    step: int
    logged: bool
    delta_sq: dict[int, list[Tensor]] = field(default_factory=lambda: defaultdict(list))
    delta_count: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    moments: dict[int, list[tuple[Tensor, int]]] = field(default_factory=lambda: defaultdict(list))
    act_kept: list[tuple[int, Activation, tuple[Tensor, Tensor, bool]]] = field(default_factory=list)
    grad_norms: Tensor | None = None  # per watched parameter
    weight_norms: Tensor | None = None
    update_norms: Tensor | None = None
    snapshot: list[Tensor] | None = None
    grad_present: list[int] = field(default_factory=list)  # params that had a .grad
    weight_values: list[tuple[int, Tensor]] = field(default_factory=list)  # (layer id, sampled weights)
    lr: float | Tensor | None = None
    values: dict[str, list[float | Tensor]] = field(default_factory=lambda: defaultdict(list))
    backward_queued: bool = False


def _first_grad_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor) and item.is_floating_point():
                return item
    return None


Selector = str | type | Iterable[str | type]


def _selectors(value: Selector | None, what: str) -> list[str | type] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, (str, type)) else list(value)
    for item in items:
        if not isinstance(item, str) and not (isinstance(item, type) and issubclass(item, nn.Module)):
            raise ConfigError(
                f"{what} takes module-name patterns ('encoder.*') or nn.Module types (nn.Linear); "
                f"got {item!r}"
            )
    return items


def _matches(name: str, module: nn.Module, selectors: list[str | type]) -> bool:
    return any(
        fnmatch.fnmatchcase(name, s) if isinstance(s, str) else isinstance(module, s) for s in selectors
    )


def _validate_every(every: int | Callable[[int], bool]) -> Callable[[int], bool]:
    if callable(every):
        return every
    if isinstance(every, bool) or not isinstance(every, int):
        raise ConfigError(
            f"every={every!r}; expected a positive int (log every N-th step) or a callable step -> bool"
        )
    if every < 1:
        raise ConfigError(
            f"every={every}; expected a positive int: every=1 logs each step, every=10 each tenth"
        )
    return lambda step: step % every == 0


class Watcher:
    """Records gradient flow of one model into one run. Create it with :func:`watch`.

    Use it as a context manager, or call :meth:`detach` when done::

        with gradwatch.watch(model, optimizer, every=10) as watcher:
            for x, y in loader:
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                watcher.log(loss=loss)

    Attributes:
        run_id: id of the run in :attr:`store`.
        store: the :class:`~gradwatch.store.RunStore` receiving the rows.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        every: int | Callable[[int], bool],
        store: RunStore,
        owns_store: bool,
        run_name: str,
        config: dict[str, Any],
        activation_stats: bool,
        warn: bool,
        include: list[str | type] | None = None,
        exclude: list[str | type] | None = None,
        activation_sample: int = 2048,
        weight_samples: int = 8,
    ) -> None:
        self.model = model
        self._include, self._exclude = include, exclude
        self.optimizer = optimizer
        self.store = store
        self._owns_store = owns_store
        self._should_log = _validate_every(every)
        self._activation_stats = activation_stats
        self._activation_sample = activation_sample
        self._weight_samples = weight_samples
        self._tracked_index: dict[int, list[int]] = {}
        self._samples: dict[tuple, Tensor | None] = {}
        self._warn = warn
        self._params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
        self._layers = self._discover_layers(model)
        self._chosen = sorted({i for layer in self._layers for i in layer.params})
        self._chosen_pos = {i: k for k, i in enumerate(self._chosen)}
        self._next_layer_id = 0
        self._record: _Step | None = None
        self._closed: list[_Step] = []  # closed steps waiting to be written
        self._steps_started = 0
        self._optimizer_steps = 0
        self._stepped = False
        self._last_param_was_conv = False
        self._handles: list[RemovableHandle] = []
        self._armed: list[RemovableHandle] = []
        self._live_warned: set[str] = set()
        self._attached = True
        self.ui = None  # the live page's server when watch(ui=...) started one
        self.run_id = store.create_run(run_name, config)
        self.run_name = run_name

        self._handles.append(model.register_forward_pre_hook(self._on_root_pre_forward))
        self._handles.append(model.register_forward_hook(self._on_root_forward, always_call=True))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._on_optimizer_pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._on_optimizer_post_step))
        _WATCHED[model] = weakref.ref(self)

    # -- discovery -------------------------------------------------------------

    def _discover_layers(self, model: nn.Module) -> list[_Layer]:
        index = {id(p): i for i, p in enumerate(self._params)}
        layers = []
        for name, module in model.named_modules():
            name = name or type(module).__name__.lower()
            if self._include is not None and not _matches(name, module, self._include):
                continue
            if self._exclude is not None and _matches(name, module, self._exclude):
                continue
            trainable = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if trainable:
                weight = getattr(module, "weight", None)
                chosen = [weight] if isinstance(weight, nn.Parameter) and weight.requires_grad else trainable
                layers.append(_Layer(name, module, "param", params=[index[id(p)] for p in chosen]))
            elif self._activation_stats:
                activation = activation_for_module(module)
                if activation is not None:
                    layers.append(_Layer(name, module, "activation", activation=activation))
        return layers

    def _layer_id(self, layer: _Layer) -> int:
        if layer.layer_id is None:
            layer.layer_id = self._next_layer_id
            self._next_layer_id += 1
            self.store.add_layers(
                self.run_id,
                [
                    (
                        layer.layer_id,
                        layer.name,
                        type(layer.module).__name__,
                        layer.kind,
                        layer.activation.name if layer.activation else None,
                    )
                ],
            )
        return layer.layer_id

    # -- step boundaries -------------------------------------------------------

    @property
    def step(self) -> int:
        """The current step: optimizer steps taken (with an optimizer), else training forwards."""
        if self.optimizer is not None:
            return self._optimizer_steps
        return max(self._steps_started - 1, 0)

    def _open_step(self) -> _Step:
        if self.optimizer is not None:
            step = self._optimizer_steps
        else:
            step = self._steps_started
        self._steps_started += 1
        self._stepped = False
        self._record = _Step(step=step, logged=bool(self._should_log(step)))
        return self._record

    def _current(self) -> _Step:
        return self._record if self._record is not None else self._open_step()

    def _on_root_pre_forward(self, module: nn.Module, args: Any) -> None:
        if not (torch.is_grad_enabled() and module.training):
            return  # evaluation: record nothing, change no step
        if self._record is None or self._stepped or self.optimizer is None:
            self._close_step()
            self._open_step()
        if self._record.logged and not self._armed:
            self._arm()

    def _on_root_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._disarm()

    def _arm(self) -> None:
        for layer in self._layers:
            if layer.kind == "param":
                hook = self._make_param_hook(layer)
                self._armed.append(layer.module.register_forward_hook(hook))
            else:
                hook = self._make_activation_hook(layer)
                self._armed.append(layer.module.register_forward_pre_hook(hook))

    def _disarm(self) -> None:
        for handle in self._armed:
            handle.remove()
        self._armed.clear()

    # -- hooks on logged steps --------------------------------------------------

    def _make_param_hook(self, layer: _Layer) -> Callable:
        def on_forward(module: nn.Module, args: Any, output: Any) -> None:
            record = self._record
            out = _first_grad_tensor(output)
            self._last_param_was_conv = isinstance(module, _CONV_TYPES)
            if record is None or out is None or not torch.is_grad_enabled():
                return
            lid = self._layer_id(layer)
            with torch.no_grad():
                record.moments[lid].append((output_moments(out), out.numel()))
            if out.requires_grad:
                out.register_hook(self._make_delta_hook(record, lid))

        return on_forward

    def _make_delta_hook(self, record: _Step, lid: int) -> Callable[[Tensor], None]:
        def on_grad(grad: Tensor) -> None:
            with torch.no_grad():
                record.delta_sq[lid].append(squared_norm(grad))
            record.delta_count[lid] += grad.numel()
            if self.optimizer is None and not record.backward_queued:
                record.backward_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(
                    lambda: self._take_grad_stats(record)
                )

        return on_grad

    def _make_activation_hook(self, layer: _Layer) -> Callable:
        activation = layer.activation
        assert activation is not None

        def on_pre_forward(module: nn.Module, args: Any) -> None:
            record = self._record
            if record is None or not args or not isinstance(args[0], Tensor):
                return
            x = args[0]
            if not x.is_floating_point():
                return
            channels_first = x.ndim >= 4 or (x.ndim == 3 and self._last_param_was_conv)
            lid = self._layer_id(layer)
            key = ("activation", lid, x.numel(), x.device)
            if key not in self._samples:
                self._samples[key] = sample_index(x.numel(), self._activation_sample, x.device, seed=lid)
            with torch.no_grad():
                kept = activation_inputs(
                    x, activation, channels_first=channels_first, sample=self._samples[key]
                )
            record.act_kept.append((lid, activation, kept))

        return on_pre_forward

    def _take_grad_stats(self, record: _Step) -> None:
        """Norms of every parameter's (accumulated) gradient and of the layers' weights, on device."""
        with torch.no_grad():
            grads = [p.grad for p in self._params]
            present = [i for i, g in enumerate(grads) if g is not None]
            if not present:
                return
            dense = [grads[i].coalesce()._values() if grads[i].is_sparse else grads[i] for i in present]
            record.grad_norms = _stack(torch._foreach_norm(dense))
            record.grad_present = present
            weights = [self._params[i].detach() for i in self._chosen]
            record.weight_norms = _stack(torch._foreach_norm(weights))
            if self._weight_samples:
                record.weight_values = [
                    (self._layer_id(layer), self._tracked_weights(layer))
                    for layer in self._layers
                    if layer.params
                ]

    def _tracked_weights(self, layer: _Layer) -> Tensor:
        """The same few elements of a layer's weight at every logged step (the seeds' plot)."""
        flat = self._params[layer.params[0]].detach().reshape(-1)
        key = ("tracked", layer.name, flat.numel(), flat.device)
        if key not in self._samples:
            count = min(self._weight_samples, flat.numel())
            generator = torch.Generator().manual_seed(len(layer.name) * 7919 + flat.numel())
            index = torch.randperm(flat.numel(), generator=generator)[:count].sort().values
            self._samples[key] = index.to(flat.device)
            self._tracked_index[self._layer_id(layer)] = index.tolist()  # flat element indices, on the host
        return flat.take(self._samples[key])

    def _weight_sample(self, i: int) -> Tensor:
        """A fixed random sample of parameter ``i``'s elements (all of them if few), copied."""
        flat = self._params[i].detach().reshape(-1)
        key = ("weight", i, flat.numel(), flat.device)
        if key not in self._samples:
            self._samples[key] = sample_index(flat.numel(), _UPDATE_SAMPLE, flat.device, seed=i)
        index = self._samples[key]
        return flat.clone() if index is None else flat.take(index)

    def _on_optimizer_pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        record = self._current()
        if not record.logged:
            return
        self._take_grad_stats(record)
        record.lr = optimizer.param_groups[0].get("lr")
        with torch.no_grad():
            record.snapshot = [self._weight_sample(i) for i in self._chosen]

    def _on_optimizer_post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        record = self._record
        if record is not None and record.logged and record.snapshot is not None:
            with torch.no_grad():
                after = [self._weight_sample(i) for i in self._chosen]
                diffs = torch._foreach_sub(after, record.snapshot)
                # ||w_after - w_before|| / ||w_before||, both on the same sample of elements
                record.update_norms = torch.cat(
                    [_stack(torch._foreach_norm(diffs)), _stack(torch._foreach_norm(record.snapshot))]
                )
            record.snapshot = None
        self._optimizer_steps += 1
        self._stepped = True

    # -- closing a step: one transfer, rows to the store -------------------------

    @staticmethod
    def _activation_stats_of(record: _Step, gather: _Gather) -> dict[int, list[_At]]:
        """Region statistics of every activation call of the step, one batch per activation kind."""
        groups: dict[tuple, list[tuple[int, Activation, tuple]]] = defaultdict(list)
        for lid, activation, kept in record.act_kept:
            key = (activation.name, tuple(sorted(activation.params.items())), kept[0].device)
            groups[key].append((lid, activation, kept))
        where: dict[int, list[_At]] = defaultdict(list)
        with torch.no_grad():
            for members in groups.values():
                stats = batched_region_stats([kept for _, _, kept in members], members[0][1])
                at = gather.add(stats)  # row-major (calls, 4)
                for row, (lid, _, _) in enumerate(members):
                    where[lid].append(_At(at + 4 * row))
        return where

    def _close_step(self, *, write: bool = False) -> None:
        """Close the open step; write closed steps at a logged step, on request, or when many wait.

        Values logged on unlogged steps stay on their device until then, so an
        unlogged step costs no transfer and no store commit.
        """
        record, self._record = self._record, None
        if record is not None and (record.logged or record.values):
            self._closed.append(record)
        if self._closed and (write or self._closed[-1].logged or len(self._closed) >= _MAX_WAITING_STEPS):
            closed, self._closed = self._closed, []
            self._write(closed)

    def _write(self, records: list[_Step]) -> None:
        """Bring the records' device values to the host in one transfer and queue their rows."""
        gather = _Gather()
        planned = [(record, self._plan(record, gather)) for record in records]
        host = gather.to_host()
        for record, plan in planned:
            self._write_record(record, plan, host)

    def _plan(self, record: _Step, gather: _Gather) -> dict[str, Any]:
        values = {
            name: [gather.add(v) if isinstance(v, Tensor) else v for v in vals]
            for name, vals in record.values.items()
        }
        if not record.logged:
            return {"values": values}
        return {
            "values": values,
            "deltas": [(lid, [gather.add(t) for t in v]) for lid, v in record.delta_sq.items()],
            "moments": [(lid, [(gather.add(t), n) for t, n in v]) for lid, v in record.moments.items()],
            "acts": self._activation_stats_of(record, gather),
            "grad": gather.add(record.grad_norms) if record.grad_norms is not None else None,
            "tracked": [(lid, gather.add(v)) for lid, v in record.weight_values],
            "weight": gather.add(record.weight_norms) if record.weight_norms is not None else None,
            "update": gather.add(record.update_norms) if record.update_norms is not None else None,
            "lr": gather.add(record.lr) if isinstance(record.lr, Tensor) else record.lr,
            "time": time.time(),
        }

    def _write_record(self, record: _Step, plan: dict[str, Any], host: list[float]) -> None:
        scalars: list[tuple[int, str, float | None]] = []
        for name, vals in plan["values"].items():
            nums = [host[v] if isinstance(v, _At) else v for v in vals]
            scalars.append((record.step, name, sum(nums) / len(nums)))
        if not record.logged:
            self.store.add_scalars(self.run_id, scalars)
            return
        deltas, moments, acts = plan["deltas"], plan["moments"], plan["acts"]
        grad_at, weight_at, update_at, lr = plan["grad"], plan["weight"], plan["update"], plan["lr"]
        now = plan["time"]

        rows: dict[int, list[float | None]] = {}

        def put(lid: int, metric: str, value: float | None) -> None:
            rows.setdefault(lid, [None] * len(LAYER_METRICS))[_METRIC_INDEX[metric]] = value

        for lid, at in deltas:
            count = record.delta_count[lid]
            put(lid, "delta_rms", math.sqrt(sum(host[a] for a in at) / count) if count else None)
        for lid, calls in moments:
            total = sum(host[a] for a, _ in calls)
            norm_sq = sum(host[a + 1] ** 2 for a, _ in calls)
            mean, std = moments_from_sums(total, norm_sq, sum(n for _, n in calls))
            put(lid, "output_mean", mean)
            put(lid, "output_std", std)
        for lid, calls in acts.items():
            for k, metric in enumerate(ACTIVATION_STATS):
                value = sum(host[a + k] for a in calls) / len(calls)
                # NaN means "not applicable" here (no flat tails), not a non-finite value
                put(lid, metric, None if math.isnan(value) and metric == "saturated_frac" else value)

        nonfinite = 0
        if grad_at is not None:
            grad = {i: host[grad_at + k] for k, i in enumerate(record.grad_present)}
            nonfinite = sum(1 for g in grad.values() if not math.isfinite(g))
            scalars.append((record.step, "total_grad_norm", _combine_norms(grad.values())))
            scalars.append((record.step, "nonfinite_grads", float(nonfinite)))
            n_chosen = len(self._chosen)
            for layer in self._layers:
                if layer.kind != "param" or not any(i in grad for i in layer.params):
                    continue
                lid = self._layer_id(layer)
                put(lid, "grad_norm", _combine_norms(grad[i] for i in layer.params if i in grad))
                if weight_at is None:
                    continue
                slots = [self._chosen_pos[i] for i in layer.params]
                w = _combine_norms(host[weight_at + k] for k in slots)
                put(lid, "weight_norm", w)
                if update_at is not None:
                    du = _combine_norms(host[update_at + k] for k in slots)
                    ws = _combine_norms(host[update_at + n_chosen + k] for k in slots)
                    put(lid, "update_ratio", du / ws if ws else math.inf)
        if lr is not None:
            scalars.append((record.step, "lr", host[lr] if isinstance(lr, _At) else lr))
        scalars.append((record.step, "wall_time", now))

        self.store.add_layer_metrics(self.run_id, ((record.step, lid, vals) for lid, vals in rows.items()))
        if plan["tracked"]:
            self.store.add_weight_samples(
                self.run_id,
                [
                    (record.step, lid, element, host[at + k])
                    for lid, at in plan["tracked"]
                    for k, element in enumerate(self._tracked_index[lid])
                ],
            )
        self.store.add_scalars(self.run_id, scalars)
        if self._warn:
            self._live_warning(rows, scalars)

    def _live_warning(self, rows: dict[int, list[float | None]], scalars: list[tuple]) -> None:
        """At most one warning per kind (non-finite, vanishing, exploding) per run."""
        from gradwatch.diagnose import live_check

        delta = _METRIC_INDEX["delta_rms"]
        params = sorted(
            (lay for lay in self._layers if lay.kind == "param" and lay.layer_id in rows),
            key=lambda lay: lay.layer_id,
        )
        deltas = {
            lay.name: rows[lay.layer_id][delta] for lay in params if rows[lay.layer_id][delta] is not None
        }
        found = {name: value for _, name, value in scalars}
        nonfinite = int(found.get("nonfinite_grads") or 0)
        text = live_check(deltas, found.get("total_grad_norm"), nonfinite, run_id=self.run_id)
        if text is None:
            return
        kind = text.split(":")[1].strip()
        if kind not in self._live_warned:
            self._live_warned.add(kind)
            warnings.warn(text, GradientWarning, stacklevel=_user_stacklevel())

    # -- public API --------------------------------------------------------------

    def log(self, **values: float | Tensor) -> None:
        """Record scalars for the current step, e.g. ``watcher.log(loss=loss, epoch=3)``.

        Values are kept whatever the logging cadence. Tensors stay on their device
        (no sync) until the step is written; several values of one name within a
        step (micro-batches) are averaged.
        """
        if not self._attached:
            raise WatchError("this watcher is detached; create a new one with gradwatch.watch()")
        record = self._current()
        for name, value in values.items():
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise ConfigError(
                        f"log({name}=...) got a tensor of shape {tuple(value.shape)}; expected one "
                        f"number, e.g. loss.detach() or tensor.mean()"
                    )
                value = value.detach()
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(
                    f"log({name}=...) got {type(value).__name__}; expected a number or a one-element tensor"
                )
            else:
                value = float(value)
            record.values[name].append(value)

    def flush(self) -> None:
        """Write the open step and block until the store has committed every row."""
        self._close_step(write=True)
        self.store.flush()

    def detach(self, *, error: BaseException | None = None) -> None:
        """Remove every hook, write what was recorded and mark the run finished.

        Idempotent. Afterwards the model's hook dictionaries are exactly as before
        :func:`watch`. With ``error`` (an exception on its way out) the open,
        possibly half-recorded step is dropped and the run is marked failed.
        """
        if not self._attached:
            return
        self._attached = False
        self._disarm()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if _WATCHED.get(self.model) is not None and _WATCHED[self.model]() is self:
            del _WATCHED[self.model]
        if error is not None:
            self._record = None  # half-recorded: dropped
        self._close_step(write=True)
        status = "finished" if error is None else "failed"
        message = None if error is None else f"{type(error).__name__}: {error}"
        self.store.finish_run(self.run_id, status, message)
        if self._owns_store:
            self.store.close()

    @property
    def attached(self) -> bool:
        """True until :meth:`detach`."""
        return self._attached

    def metrics(self, **kwargs: Any):
        """Per-layer metrics of this run as a DataFrame (see :meth:`RunStore.metrics`)."""
        self.flush() if self._attached else None
        return self.store.metrics(self.run_id, **kwargs)

    def scalars(self, **kwargs: Any):
        """Global values of this run per step as a DataFrame (see :meth:`RunStore.scalars`)."""
        self.flush() if self._attached else None
        return self.store.scalars(self.run_id, **kwargs)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self.detach(error=exc)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return f"<Watcher run {self.run_id} {self.run_name!r}, {len(self._layers)} layers, {state}>"


_INTERNAL_DIRS = (os.path.dirname(__file__), os.path.dirname(torch.__file__))


def _user_stacklevel() -> int:
    """Stack level of the first caller outside gradwatch and torch (warnings point at user code)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class _At(int):
    """An offset into a step's host values (distinguishes gathered values from plain floats)."""


class _Gather:
    """Collects a step's device tensors and brings them to the host in one transfer per device."""

    def __init__(self) -> None:
        self._parts: list[Tensor] = []
        self._size = 0

    def add(self, tensor: Tensor) -> _At:
        flat = tensor.detach().reshape(-1)
        self._parts.append(flat)
        self._size += flat.numel()
        return _At(self._size - flat.numel())

    def to_host(self) -> list[float]:
        if not self._parts:
            return []
        devices = {t.device for t in self._parts}
        if len(devices) == 1:
            return torch.cat([t.float() for t in self._parts]).cpu().tolist()
        # model parallel: one transfer per device, then back in order
        out: list[float] = [0.0] * self._size
        offsets = [0]
        for t in self._parts:
            offsets.append(offsets[-1] + t.numel())
        for device in devices:
            idx = [k for k, t in enumerate(self._parts) if t.device == device]
            flat = torch.cat([self._parts[k].float() for k in idx]).cpu().tolist()
            pos = 0
            for k in idx:
                n = self._parts[k].numel()
                out[offsets[k] : offsets[k] + n] = flat[pos : pos + n]
                pos += n
        return out


def _stack(norms: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Stack 0-d norms into one float32 vector, on the first one's device."""
    try:
        return torch.stack(list(norms)).float()
    except RuntimeError:  # parameters on several devices
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).float()


def _combine_norms(norms: Iterable[float]) -> float | None:
    values = list(norms)
    if not values:
        return None
    return math.sqrt(sum(v * v for v in values))


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    every: int | Callable[[int], bool] = DEFAULT_EVERY,
    store: RunStore | str | None = None,
    run_name: str | None = None,
    config: dict[str, Any] | None = None,
    activation_stats: bool = True,
    warn: bool = True,
    include: Selector | None = None,
    exclude: Selector | None = None,
    activation_sample: int = 2048,
    weight_samples: int = 8,
    ui: bool | int = False,
) -> Watcher:
    """Watch a model's gradient flow; returns a :class:`Watcher` (also a context manager).

    Recorded per logged step (DESIGN.md "What is measured"): for each module with
    trainable parameters, ``grad_norm`` and ``weight_norm`` of its weight,
    ``update_ratio = ||w_after - w_before|| / ||w_before||`` (with an optimizer),
    ``delta_rms = sqrt(mean((dL/d output)^2))`` (the back-propagated error, which
    vanishes even when weight gradients stay level: Glorot & Bengio 2010), and
    the output's mean and std; for each known activation the saturated, green
    and dead fractions and the mean derivative at its inputs; globally
    ``total_grad_norm`` (equal to ``torch.nn.utils.get_total_norm``), ``lr``,
    ``nonfinite_grads``, ``wall_time``, and whatever :meth:`Watcher.log` is given.

    Args:
        model: the module to watch. Its forward must be called for steps to be seen.
        optimizer: recommended. Steps are then optimizer steps (gradient
            accumulation works) and update ratios are recorded, through the
            optimizer's step hooks: no manual call needed.
        every: log every N-th step (``step % every == 0``), or a callable
            ``step -> bool``. Default: 10. Unlogged steps do no tensor work.
        store: a :class:`RunStore` or a path. Default: ``$GRADWATCH_STORE``,
            else ``./gradwatch-runs/gradwatch.db``.
        run_name: name of the run. Default: the model's class name and the time.
        config: JSON-able dict stored with the run (hyper-parameters).
        activation_stats: measure activation modules (saturation, green, dead).
        activation_sample: the saturated and green fractions and the mean derivative
            are averaged over a fixed random sample of this many inputs per
            activation (standard error at most ``0.5 / sqrt(n)``: 1.1 points for
            2048); 0 averages over every input. Dead fractions are always exact.
        ui: serve the live page beside training (``True``: port 8765, or a port
            number, 0 for any free one), in a background thread of this process; its address is printed.
            A failure to start it (port taken, ``gradwatch[ui]`` not installed) warns
            and training goes on. ``gradwatch ui`` in its own process does the same.
        weight_samples: record the values of this many fixed, randomly chosen
            elements of each layer's weight at every logged step: the seeds' "plots of
            weights against epochs" (``RunStore.weight_samples``). 0 turns it off.
        warn: warn (:class:`~gradwatch.errors.GradientWarning`, once per kind per run)
            when a logged step shows non-finite, vanishing or exploding gradients, by
            :func:`gradwatch.diagnose.live_check`'s thresholds, pointing to ``gradwatch show``.
        include: watch only these modules: name patterns (``fnmatch``, e.g.
            ``"encoder.layer.*"``) or module types (``nn.Linear``). Default: all.
        exclude: do not watch these modules (same forms). ``total_grad_norm`` always
            covers every trainable parameter of the model.

    Raises:
        WatchError: ``model`` is not a module, has no trainable parameters, or is
            already watched.
        ConfigError: ``every`` is not a positive int or callable, or ``optimizer``
            is not a torch optimizer.
    """
    if not isinstance(model, nn.Module):
        raise WatchError(
            f"watch() needs a torch.nn.Module; got {type(model).__name__}. Pass the model "
            f"itself, e.g. gradwatch.watch(model, optimizer)"
        )
    if not any(p.requires_grad for p in model.parameters()):
        what = "no parameters" if not list(model.parameters()) else "no parameter that requires grad"
        raise WatchError(
            f"{type(model).__name__} has {what}, so it has no gradients to watch; watch the "
            f"model you train (unfreeze some parameters with p.requires_grad_(True))"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}. Pass "
            f"it as the second argument, or leave it out"
        )
    _validate_every(every)
    if isinstance(weight_samples, bool) or not isinstance(weight_samples, int) or weight_samples < 0:
        raise ConfigError(f"weight_samples={weight_samples!r}; expected a count >= 0 (0: none)")
    if isinstance(activation_sample, bool) or not isinstance(activation_sample, int) or activation_sample < 0:
        raise ConfigError(
            f"activation_sample={activation_sample!r}; expected a sample size >= 0 (0: every input)"
        )
    previous = _WATCHED.get(model)
    if previous is not None and previous() is not None and previous().attached:
        raise WatchError(
            f"this {type(model).__name__} is already watched by run {previous().run_id}; call "
            f"detach() on that watcher first (or use it as a context manager)"
        )
    include_list = _selectors(include, "include")
    exclude_list = _selectors(exclude, "exclude")
    if include_list is not None:
        named = [(n or type(m).__name__.lower(), m) for n, m in model.named_modules()]
        if not any(_matches(n, m, include_list) for n, m in named):
            sample = ", ".join(n for n, _ in named[:8])
            raise ConfigError(
                f"include={include!r} matches no module of the model; its modules: {sample}, ..."
            )
    if isinstance(store, RunStore):
        run_store, owns = store, False
    else:
        run_store, owns = RunStore(store), True
    name = run_name or f"{type(model).__name__}-{time.strftime('%Y%m%d-%H%M%S')}"
    full_config = dict(config or {})
    full_config.setdefault(
        "gradwatch",
        {
            "every": every if isinstance(every, int) else getattr(every, "__name__", "callable"),
            "model": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        },
    )
    try:
        watcher = Watcher(
            model,
            optimizer,
            every=every,
            store=run_store,
            owns_store=owns,
            run_name=name,
            config=full_config,
            activation_stats=activation_stats,
            warn=warn,
            include=include_list,
            exclude=exclude_list,
            activation_sample=activation_sample,
            weight_samples=weight_samples,
        )
    except BaseException:
        if owns:
            run_store.close()
        raise
    if ui is True or (isinstance(ui, int) and not isinstance(ui, bool)):  # ui=0: any free port
        _start_ui(watcher, 8765 if ui is True else ui)
    return watcher


def _start_ui(watcher: Watcher, port: int) -> None:
    from gradwatch.errors import GradwatchError

    try:
        from gradwatch.ui import serve_in_background

        server = serve_in_background(watcher.store.path, port=port)
    except (GradwatchError, ImportError, OSError) as err:
        warnings.warn(f"gradwatch: live view not started: {err}", stacklevel=3)
        return
    watcher.ui = server
    print(f"gradwatch: live view at {server.url}#run={watcher.run_id}", file=sys.stderr)
