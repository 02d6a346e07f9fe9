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
* Small outputs and activation inputs wait for the end of the forward and are measured
  stacked by shape, a few ops for all the layers (on the CPU each small op in a training
  step costs 2-4x its own time); a layer whose tensor is changed in place after its hook
  is measured in the hook (:mod:`gradwatch._defer`).
* At the end of every backward pass of a training step (a ``queue_callback`` from a
  tensor hook on the model's output), the norm of every parameter's gradient, on
  device, in one ``torch._foreach_norm``: the last backward of a step sees the
  accumulated gradient, before any clipping; with a ``GradScaler`` the norms are
  divided by the scale that backward used. On unlogged steps these norms only
  update the **window** (running max/min per parameter and of the total, and the
  first step with a non-finite gradient), on device, so a spike between two
  logged steps is never lost; ``window=False`` turns that off and unlogged steps
  then do no tensor work at all.
* Optimizer step pre/post hooks (when an optimizer is given): weight norms, the
  update ratio ``||w_after - w_before|| / ||w_before||`` and, after the step, the
  norm of the gradient the optimizer applied (after unscaling and clipping).
  A ``GradScaler``'s ``update`` is wrapped so that a step it skipped is recorded as
  skipped, not as data. Without an optimizer, every training forward starts a step.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradwatch._defer import Deferral
from gradwatch._step import StepRecord, WeightBlocks
from gradwatch._transfer import Gather, Handle, Host
from gradwatch.activations import Activation, activation_for_module
from gradwatch.alerts import Action, Alert, resolve_alerts
from gradwatch.config import Selector, WatchConfig, should_log
from gradwatch.errors import ConfigError, GradientWarning, TrainingStopped, WatchError
from gradwatch.norms import NormPlans, is_dtensor, square_sum, squares, stack_norms, take
from gradwatch.recorder import (
    DEFAULT_EVERY,
    ActivationCalls,
    LayerRows,
    ParamLayout,
    Window,
    activation_stat_rows,
    gradwatch_config,
    step_scalars,
    tracked_columns,
    tracked_elements,
)
from gradwatch.stats import weight_block
from gradwatch.store import RunStore
from gradwatch.thresholds import step_alerts

__all__ = ["watch", "Watcher", "DEFAULT_EVERY"]

# Steps closed without being written (unlogged steps with logged values) wait at most this long.
_MAX_WAITING_STEPS = 256
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


def _first_grad_tensor(output: Any) -> Tensor | None:
    """The first floating-point tensor of a module's output (a tensor, tuple, list or dict)."""
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, Mapping):  # e.g. transformers' ModelOutput
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor) and item.is_floating_point():
                return item
    return None


def _matches(name: str, module: nn.Module, selectors: list[str | type]) -> bool:
    return any(
        fnmatch.fnmatchcase(name, s) if isinstance(s, str) else isinstance(module, s) for s in selectors
    )


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
        settings: WatchConfig,
        store: RunStore,
        owns_store: bool,
        run_name: str,
        config: dict[str, Any],
        scaler: Any = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.optimizer = optimizer
        self.store = store
        self._owns_store = owns_store
        self._should_log = should_log(settings.every)
        self._tracked_index: dict[int, list[int]] = {}
        self._tracked_columns: tuple[list[int], list[int]] | None = None  # _tracked_index as two columns
        self._samples: dict[tuple, Tensor | None] = {}  # element indices of the weight samples
        self._deferral = Deferral(settings.activation_sample)
        self._norms = NormPlans()
        self._alerts = resolve_alerts(settings.alerts, settings.warn)
        self._ratio_ignored = all(self._alerts[k] == "ignore" for k in ("vanishing", "exploding"))
        self._window: Window | None = None
        self._present_index: dict[tuple[int, ...], Tensor] = {}
        # A compiled model (torch.compile) runs its layers inside a graph: hooks there would
        # break it, so only the parameter-level metrics are recorded (see watch()).
        inner = getattr(model, "_orig_mod", None)
        self.compiled = isinstance(inner, nn.Module)
        self._params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
        self._layers = self._discover_layers(inner if self.compiled else model)
        index = {id(p): i for i, p in enumerate(self._params)}
        self._param_layer = {  # each trainable parameter of a watched layer (weight and bias) -> layer
            index[id(p)]: layer
            for layer in self._layers
            if layer.kind == "param"
            for p in layer.module.parameters(recurse=False)
            if id(p) in index
        }
        self._layer_of = {i: layer.name for i, layer in self._param_layer.items()}  # for the alerts
        self._chosen = sorted({i for layer in self._layers for i in layer.params})
        self._chosen_pos = {i: k for k, i in enumerate(self._chosen)}
        self._chosen_params = [self._params[i] for i in self._chosen]
        self._param_layers = [layer for layer in self._layers if layer.kind == "param"]
        self._layout: tuple | None = None  # see _param_layout
        self._next_layer_id = 0
        self._record: StepRecord | None = None
        self._closed: list[StepRecord] = []  # closed steps waiting to be written
        self._steps_started = 0
        self._optimizer_steps = 0
        self._stepped = False
        self._last_param_was_conv = False
        self._handles: list[RemovableHandle] = []
        self._armed: list[RemovableHandle] = []
        self._in_forward = False  # inside the root module's training forward of a logged step
        self._blocks: WeightBlocks | None = None
        self._live_warned: set[str] = set()
        self._stop_alert: Alert | None = None
        self._attached = True
        self.ui = None  # the live page's server when watch(ui=...) started one
        self.run_id = store.create_run(run_name, config)
        self.run_name = run_name
        self._scaler = None
        self._scaler_looked = scaler is not None
        self._restore_scaler: Callable[[], None] | None = None
        if scaler is not None:
            self._attach_scaler(scaler)

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
            if self.settings.include is not None and not _matches(name, module, self.settings.include):
                continue
            if self.settings.exclude is not None and _matches(name, module, self.settings.exclude):
                continue
            trainable = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if trainable:
                weight = getattr(module, "weight", None)
                chosen = [weight] if isinstance(weight, nn.Parameter) and weight.requires_grad else trainable
                layers.append(_Layer(name, module, "param", params=[index[id(p)] for p in chosen]))
            elif self.settings.activation_stats and not self.compiled:
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

    def _open_step(self) -> StepRecord:
        if self.optimizer is not None:
            step = self._optimizer_steps
        else:
            step = self._steps_started
        self._steps_started += 1
        self._stepped = False
        self._record = StepRecord(step=step, logged=bool(self._should_log(step)))
        return self._record

    def _current(self) -> StepRecord:
        return self._record if self._record is not None else self._open_step()

    def _window_on(self) -> bool:
        """Whether unlogged steps feed the window (``watch(window=...)``; None: where it is cheap)."""
        if self.settings.window is not None:  # None: where it is cheap or needed
            return self.settings.window
        if self._alerts["nonfinite"] not in ("warn", "ignore"):
            return True  # "stop" or a callback: every step must be checked
        return self._params[0].device.type != "cpu"

    def _on_root_pre_forward(self, module: nn.Module, args: Any) -> None:
        if not (torch.is_grad_enabled() and module.training):
            if self._armed:
                self._disarm()  # evaluation: record nothing, change no step
            return
        if self._record is None or self._stepped or self.optimizer is None:
            self._close_step()
            self._open_step()
        if self._record.logged and not self.compiled:
            if not self._armed:
                self._arm()  # the hooks stay on while consecutive steps are logged
            self._in_forward = True
        elif self._armed:
            self._disarm()

    def _on_root_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._in_forward = False
        record = self._record
        if record is not None and (record.pending or record.probes):
            self._deferral.flush(record)
        if record is None or not (record.logged or self._window_on()):
            return
        if not (torch.is_grad_enabled() and module.training):
            return
        out = _first_grad_tensor(output)
        if out is not None and out.requires_grad:
            out.register_hook(self._make_backward_hook(record))

    def _make_backward_hook(self, record: StepRecord) -> Callable[[Tensor], None]:
        def on_output_grad(grad: Tensor) -> None:
            self._queue_backward_end(record)

        return on_output_grad

    def _queue_backward_end(self, record: StepRecord) -> None:
        """Run :meth:`_on_backward_end` once when the current backward pass finishes.

        The callback re-queues itself once, so that it runs after the callbacks that
        others queued during the backward pass: DDP and FSDP finish their gradient
        all-reduce (reduce-scatter) in such a callback.
        """
        if not record.backward_queued:
            record.backward_queued = True
            engine = torch.autograd.Variable._execution_engine
            engine.queue_callback(lambda: engine.queue_callback(lambda: self._on_backward_end(record)))

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
        self._in_forward = False

    # -- hooks on logged steps --------------------------------------------------
    # Each hook is armed only during the root module's training forward of a logged
    # step (``_in_forward``): a submodule called on its own, or re-run by activation
    # checkpointing during backward, records nothing.

    def _make_param_hook(self, layer: _Layer) -> Callable:
        is_conv = isinstance(layer.module, _CONV_TYPES)

        def on_forward(module: nn.Module, args: Any, output: Any) -> None:
            if not self._in_forward:
                return
            out = output if type(output) is Tensor else _first_grad_tensor(output)
            self._last_param_was_conv = is_conv
            record = self._record
            if record is None or out is None or not out.is_floating_point() or not torch.is_grad_enabled():
                return
            lid = layer.layer_id if layer.layer_id is not None else self._layer_id(layer)
            self._deferral.keep(record, "moments", lid, out.detach(), (), None)
            if out.requires_grad:
                out.register_hook(self._make_delta_hook(record, lid))

        return on_forward

    def _make_delta_hook(self, record: StepRecord, lid: int) -> Callable[[Tensor], None]:
        def on_grad(grad: Tensor) -> None:
            # hooks run with grad mode off: no detach needed
            record.deltas.append((lid, grad.numel(), *square_sum(grad)))
            if not record.backward_queued:  # in case the output hook saw no backward
                self._queue_backward_end(record)

        return on_grad

    def _make_activation_hook(self, layer: _Layer) -> Callable:
        activation = layer.activation
        assert activation is not None
        kind = activation.key

        def on_pre_forward(module: nn.Module, args: Any) -> None:
            record = self._record
            if not self._in_forward or record is None or not args or not isinstance(args[0], Tensor):
                return
            x = args[0]
            if not x.is_floating_point():
                return
            channels_first = x.ndim >= 4 or (x.ndim == 3 and self._last_param_was_conv)
            lid = layer.layer_id if layer.layer_id is not None else self._layer_id(layer)
            self._deferral.keep(record, "activation", lid, x.detach(), (kind, channels_first), activation)

        return on_pre_forward

    def _grad_norms_now(self, record: StepRecord) -> Tensor | None:
        """Norms of every parameter's gradient as it is now, unscaled; None if none has one."""
        present = [i for i, p in enumerate(self._params) if p.grad is not None]
        if not present:
            return None
        grads = [self._params[i].grad for i in present]
        norms = self._norms([g.coalesce()._values() if g.is_sparse else g for g in grads])
        scale = self._scale()
        if scale is not None:
            norms = norms / scale.to(norms.device)
            if record.logged:
                record.scale = scale.clone()
        record.grad_norms, record.grad_present = norms, present
        if record.logged:  # to tell at optimizer.step() whether anything changed them since
            record.grad_versions = [(id(g), g._version) for g in grads]
        return norms

    def _on_backward_end(self, record: StepRecord) -> None:
        """The end of a backward pass: gradient norms (the step's last backward: accumulated ones)."""
        record.backward_queued = False
        if record is not self._record or not self._attached:
            return
        with torch.no_grad():
            norms = self._grad_norms_now(record)
            if norms is None:
                return
            if record.logged and self.optimizer is None:
                self._weight_stats(record)
        if (
            self._alerts["nonfinite"] == "stop"
            and norms.device.type == "cpu"
            and self._scaler is None
            and not bool(torch.isfinite(norms).all())
        ):
            # On the CPU the check is free: act now, before the optimizer applies it.
            record.logged = True
            self._close_step(write=True)

    def _weight_stats(self, record: StepRecord) -> None:
        """Weight norms, the blocks before the step and the tracked weights of a logged step, on device."""
        weights = self._chosen_params  # callers run under torch.no_grad(): no detach needed
        if not weights:
            return
        record.weight_norms = self._norms(weights)
        if any(is_dtensor(w) for w in weights) or len({w.device for w in weights}) > 1:
            self._sampled_weight_stats(record, weights)  # sharded, or model parallel
            return
        blocks = self._blocks
        if blocks is None or blocks.device != weights[0].device or blocks.dtype != weights[0].dtype:
            blocks = self._blocks = WeightBlocks(weights, self._spans(weights), self._tracked_spec(weights))
        blocks.copy_before(weights)
        record.snapshot = blocks
        if self.settings.weight_samples:
            record.tracked = blocks.take_tracked()

    def _spans(self, weights: list[Tensor]) -> list[tuple[int, int]]:
        """The update-ratio block of each chosen parameter (:func:`gradwatch.stats.weight_block`)."""
        return [weight_block(w.numel(), i) for i, w in zip(self._chosen, weights, strict=True)]

    def _tracked_spec(self, weights: list[Tensor]) -> list[tuple[int, int, list[int]]]:
        """``(layer id, k, positions)`` per layer: its tracked weights in chosen parameter k's block.

        The elements' flat indices in the weight (``start + position``) go to the store,
        once, in :attr:`_tracked_index`.
        """
        if not self.settings.weight_samples:
            return []
        spec = []
        for layer in self._layers:
            if not layer.params:
                continue
            k = self._chosen_pos[layer.params[0]]
            start, where = tracked_elements(layer.name, weights[k].numel(), layer.params[0],
                                            self.settings.weight_samples)
            lid = self._layer_id(layer)
            spec.append((lid, k, where))
            self._tracked_index[lid] = [start + q for q in where]
            self._tracked_columns = None
        return spec

    def _sampled_weight_stats(self, record: StepRecord, weights: list[Tensor]) -> None:
        """Weights that one buffer cannot hold: sharded (DTensor; samples of the full tensors,
        gathered across ranks) or on several devices (each sample on its weight's device).
        """
        indices = []
        for i, w in zip(self._chosen, weights, strict=True):
            key = ("block", i, w.numel(), w.device)
            if key not in self._samples:  # the elements of weight_block, as the one-buffer path reads
                start, length = weight_block(w.numel(), i)
                self._samples[key] = torch.arange(start, start + length, device=w.device)
            indices.append(self._samples[key])
        record.snapshot = (indices, take(weights, indices))
        if self.settings.weight_samples:
            key = ("tracked", tuple(w.device for w in weights))
            if key not in self._samples:  # (k, flat element indices) per layer, built once per placement
                spans = self._spans(weights)
                self._samples[key] = [
                    (k, torch.tensor([spans[k][0] + q for q in pos], device=weights[k].device))
                    for _, k, pos in self._tracked_spec(weights)
                ]
            tracked = self._samples[key]
            taken = take([weights[k] for k, _ in tracked], [where for _, where in tracked])
            record.tracked = torch.cat([t.to(weights[0].device) for t in taken]) if taken else None

    def _on_optimizer_pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        record = self._current()
        if not self._scaler_looked:
            self._find_scaler(record)
        if not record.logged:
            return
        with torch.no_grad():
            if record.grad_norms is None:  # no backward seen through the model's output
                self._grad_norms_now(record)
            self._weight_stats(record)
        record.lr = optimizer.param_groups[0].get("lr")

    def _on_optimizer_post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        record = self._record
        if record is not None and record.logged:
            with torch.no_grad():
                weights = self._chosen_params
                # ||w_after - w_before|| / ||w_before||, both on the same sample of elements
                if isinstance(record.snapshot, WeightBlocks):
                    record.update_norms = record.snapshot.update_norms(weights)
                elif record.snapshot is not None:
                    indices, before = record.snapshot
                    diffs = torch._foreach_sub(take(weights, indices), before)
                    record.update_norms = torch.cat(
                        [stack_norms(torch._foreach_norm(diffs)), stack_norms(torch._foreach_norm(before))]
                    )
                grads = [p.grad for p in self._params if p.grad is not None]
                unchanged = record.grad_versions == [(id(g), g._version) for g in grads]
                if unchanged and record.scale is None and record.grad_norms is not None:
                    record.applied_norm = torch.linalg.vector_norm(record.grad_norms)
                elif grads:  # what the optimizer applied: after unscaling and any clipping
                    dense = [g.coalesce()._values() if g.is_sparse else g for g in grads]
                    record.applied_norm = torch.linalg.vector_norm(self._norms(dense))
            record.snapshot = None
        self._optimizer_steps += 1
        self._stepped = True

    # -- GradScaler ----------------------------------------------------------------

    def _scale(self) -> Tensor | None:
        """The scaler's current scale (a 1-element device tensor), or None without one."""
        scaler = self._scaler
        if scaler is None or not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
            return None
        return scaler._scale.detach().float().reshape(())

    def _attach_scaler(self, scaler: Any) -> None:
        """Wrap ``scaler.update`` (restored on detach) to see steps the scaler skipped."""
        self._scaler = scaler
        original = scaler.update

        def update(*args: Any, **kwargs: Any) -> Any:
            self._on_scaler_update()
            return original(*args, **kwargs)

        scaler.update = update

        def restore() -> None:
            if scaler.__dict__.get("update") is update:
                del scaler.update

        self._restore_scaler = restore

    def _find_scaler(self, record: StepRecord) -> None:
        """A GradScaler calling optimizer.step() (found once, on the first step): attach to it."""
        self._scaler_looked = True
        frame = sys._getframe(2)
        for _ in range(8):
            if frame is None:
                return
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, torch.amp.GradScaler):
                self._attach_scaler(candidate)
                scale = self._scale()
                if scale is not None and record.grad_norms is not None:  # taken before we knew
                    record.grad_norms = record.grad_norms / scale.to(record.grad_norms.device)
                    record.scale = scale.clone() if record.logged else None
                return
            frame = frame.f_back

    def _on_scaler_update(self) -> None:
        if self._record is not None and not self._stepped:
            # scaler.step() found inf/NaN and did not call optimizer.step(): a skipped step.
            self._record.skipped = True
            self._optimizer_steps += 1
            self._stepped = True

    # -- closing a step: one transfer, rows to the store -------------------------

    @staticmethod
    def _region_stats(record: StepRecord, gather: Gather) -> list[tuple[list[int], Handle]]:
        """Region statistics of every activation call of the step, one batch per activation kind.

        Returns ``(layer ids of the calls, handle)`` per kind; the handle's values are
        row-major ``(calls, 7)`` (:func:`gradwatch.recorder.activation_stat_rows`).
        """
        groups: dict[tuple, list[tuple[list[int], Activation, Tensor, Tensor, bool]]] = defaultdict(list)
        for kept in record.act_kept:
            activation, inputs = kept[1], kept[2]
            groups[(activation.key, inputs.device)].append(kept)
        out = []
        for members in groups.values():
            members.sort(key=lambda kept: kept[2].ndim)  # single calls (1-D) first, then rows
            calls = ActivationCalls(members[0][1], [m[2] for m in members], [m[3] for m in members],
                                    [m[4] for m in members])
            lids = [lid for kept in members for lid in kept[0]]
            out.append((lids, gather.add(activation_stat_rows(calls))))
        return out

    def _close_step(self, *, write: bool = False) -> None:
        """Close the open step; write closed steps at a logged step, on request, or when many wait.

        Values logged on unlogged steps stay on their device until then, so an
        unlogged step costs no transfer and no store commit.
        """
        record, self._record = self._record, None
        if record is not None:
            if record.grad_norms is not None and not record.skipped and self._window_on():
                self._fold(record)
            if record.logged or record.values or record.skipped:
                self._closed.append(record)
        if self._closed and (write or self._closed[-1].logged or len(self._closed) >= _MAX_WAITING_STEPS):
            closed, self._closed = self._closed, []
            self._write(closed)

    def _fold(self, record: StepRecord) -> None:
        norms = record.grad_norms
        assert norms is not None
        window = self._window
        if window is None or window.device != norms.device:
            if window is not None:
                window.fold()
            window = self._window = Window((len(self._params),), norms.device)
        present = record.grad_present
        if len(present) == len(self._params):
            index = None
        else:
            key = tuple(present)
            index = self._present_index.get(key)
            if index is None or index.device != norms.device:
                if len(self._present_index) > 64:
                    self._present_index.clear()
                index = self._present_index[key] = torch.tensor(key, device=norms.device)
        window.add(record.step, norms, index)

    def _write(self, records: list[StepRecord]) -> None:
        """Bring the records' device values to the host in one transfer and queue their rows."""
        gather = Gather()
        planned = [(record, self._plan(record, gather)) for record in records]
        host = gather.to_host()
        scalars: list[tuple[int, str, float | None]] = []  # of every record: one queue item
        checks = [self._write_record(record, plan, host, scalars) for record, plan in planned]
        if scalars:
            self.store.add_scalars(self.run_id, scalars)
        for check in checks:  # after every row is queued: a "stop" loses nothing
            if check is not None:
                self._check_alerts(*check)

    def _plan(self, record: StepRecord, gather: Gather) -> dict[str, Any]:
        """What of a closed step goes to the host: a handle per tensor (see :class:`Gather`)."""
        if record.pending or record.probes:  # a forward that did not reach the root's hook
            self._deferral.flush(record)
        values = {}
        for name, vals in (record.values or {}).items():
            tensors = [v for v in vals if isinstance(v, Tensor)]
            floats = [v for v in vals if not isinstance(v, Tensor)]
            values[name] = (gather.add(torch.stack(tensors)) if tensors else None, floats, len(vals))
        plan: dict[str, Any] = {
            "values": values,
            "scale": gather.add(record.scale) if record.scale is not None else None,
        }
        if not record.logged or record.skipped:
            return plan
        plan.update(
            deltas=gather.add(torch.stack([t for _, _, t, _ in record.deltas])) if record.deltas else None,
            moments=self._plan_moments(record, gather),
            acts=self._region_stats(record, gather),
            grad=gather.add(record.grad_norms) if record.grad_norms is not None else None,
            tracked=gather.add(record.tracked) if record.tracked is not None else None,
            weight=gather.add(record.weight_norms) if record.weight_norms is not None else None,
            update=gather.add(record.update_norms) if record.update_norms is not None else None,
            applied=gather.add(record.applied_norm) if record.applied_norm is not None else None,
            window=self._take_window(gather),
            lr=gather.add(record.lr) if isinstance(record.lr, Tensor) else record.lr,
            time=time.time(),
        )
        return plan

    @staticmethod
    def _plan_moments(
        record: StepRecord, gather: Gather
    ) -> tuple[Handle, list[int], list[int], list[bool]] | None:
        """The step's output moments into the gather as (sum, square) pairs, one per call:
        ``(handle, layer ids, element counts, squared)``, in the order of the pairs.
        """
        if not record.moments:
            return None
        single = [m for m in record.moments if m[2].ndim == 0]
        rows = [m for m in record.moments if m[2].ndim == 1]
        pieces = [torch.stack([t for m in single for t in m[2:4]])] if single else []
        pieces += [torch.stack([m[2], m[3]], 1).view(-1) for m in rows]
        ordered = single + rows
        return (
            gather.add(pieces[0] if len(pieces) == 1 else torch.cat(pieces)),
            [lid for m in ordered for lid in m[0]],
            [m[1] for m in ordered for _ in m[0]],
            [m[4] for m in ordered for _ in m[0]],
        )

    def _take_window(self, gather: Gather) -> dict[str, Any] | None:
        """The window's tensors into the gather; the next steps fold into a new window."""
        window, self._window = self._window, None
        if window is None or not window.steps:
            return None
        window.fold()
        return {
            "steps": window.steps,
            "max": gather.add(window.max),
            "min": gather.add(window.min),
            "first_bad": gather.add(window.first_bad),
            "totals": gather.add(window.totals()),
        }

    def _param_layout(self, has_grad: np.ndarray) -> ParamLayout:
        """The ``(parameter, layer id, chosen slot)`` entries, one per watched layer's parameter.

        A layer gets its id here if no hook gave it one (a compiled model) and one of
        its parameters has a gradient. Cached until a new layer id is given.
        """
        for layer in self._param_layers:
            if layer.layer_id is None and has_grad[layer.params].any():
                self._layer_id(layer)
        if self._layout is None or self._layout[0] != self._next_layer_id:
            entries = [
                (i, layer.layer_id, self._chosen_pos[i])
                for layer in self._param_layers
                if layer.layer_id is not None
                for i in layer.params
            ]
            table = np.array(entries, dtype=np.int64).reshape(-1, 3)
            self._layout = (self._next_layer_id, ParamLayout(table[:, 0], table[:, 1], table[:, 2]))
        return self._layout[1]

    def _write_record(
        self, record: StepRecord, plan: dict[str, Any], host: Host,
        scalars: list[tuple[int, str, float | None]],
    ) -> tuple[StepRecord, dict[int, float], dict[int, int]] | None:
        """Queue a record's layer rows and tracked weights; add its scalars to ``scalars``.

        Returns what :meth:`_check_alerts` judges for a logged step (None otherwise).
        """
        step = record.step
        for name, (at, floats, count) in plan["values"].items():
            total = sum(floats) + (float(host[at].sum()) if at is not None else 0.0)
            scalars.append((step, name, total / count))
        scale = host.scalar(plan["scale"]) if plan["scale"] is not None else None
        if scale is not None:
            scalars.append((step, "grad_scale", scale))
        if record.skipped:
            scalars.append((step, "skipped_step", 1.0))
        if not record.logged or record.skipped:
            return None
        unscale = 1.0 / (scale * scale) if scale else 1.0  # deltas were taken on the scaled loss

        n_params = len(self._params)
        has_grad = np.zeros(n_params, dtype=bool)
        grad = np.zeros(n_params)
        if plan["grad"] is not None:
            has_grad[record.grad_present] = True
            grad[record.grad_present] = host[plan["grad"]]
        window = plan["window"]
        w_max = host[window["max"]] if window is not None else None
        in_window = w_max != -math.inf if w_max is not None else np.zeros(n_params, dtype=bool)
        layout = self._param_layout(has_grad | in_window)
        rows = LayerRows(1, self._next_layer_id)
        if plan["deltas"] is not None:
            rows.add_deltas(0, [lid for lid, *_ in record.deltas], [c for _, c, *_ in record.deltas],
                            squares(host[plan["deltas"]], [s for *_, s in record.deltas]) * unscale)
        if plan["moments"] is not None:
            at, ids, counts, squared = plan["moments"]
            pairs = host[at].reshape(-1, 2)
            rows.add_moments(0, ids, counts, pairs[:, 0], squares(pairs[:, 1], squared))
        for ids, at in plan["acts"]:
            rows.add_activations(0, ids, host[at].reshape(len(ids), -1))
        if plan["grad"] is not None:
            weight = host[plan["weight"]][None] if plan["weight"] is not None else None
            update = host[plan["update"]].reshape(2, -1) if plan["update"] is not None else None
            rows.add_params(layout, grad[None], has_grad[None], weight,
                            *((update[0][None], update[1][None]) if update is not None else (None, None)))
        first_bad: dict[int, int] = {}
        if window is not None:
            rows.add_window(layout, w_max[None], host[window["min"]][None])
            bad_at = host[window["first_bad"]]
            first_bad = {int(i): int(bad_at[i]) for i in np.flatnonzero(bad_at >= 0)}
        elif plan["grad"] is not None:  # no window: the logged step's own gradients
            first_bad = {int(i): step for i in np.flatnonzero(has_grad & ~np.isfinite(grad))}
        lr = plan["lr"]
        (globals_,) = step_scalars(
            step,
            grad=grad[None] if plan["grad"] is not None else None,
            has_grad=has_grad[None],
            applied=[host.scalar(plan["applied"])] if plan["applied"] is not None else None,
            window=host[window["totals"]][None] if window is not None else None,
            window_steps=window["steps"] if window is not None else 0,
            lr=host.scalar(lr) if isinstance(lr, Handle) else lr,
            wall_time=plan["time"],
        )
        scalars += globals_
        self.store.add_layer_array(self.run_id, step, *rows.rows())
        if plan["tracked"] is not None:
            if self._tracked_columns is None:
                self._tracked_columns = tracked_columns(self._tracked_index)
            self.store.add_weight_array(self.run_id, step, *self._tracked_columns, host[plan["tracked"]])
        return record, rows.deltas(), first_bad

    # -- alerts ------------------------------------------------------------------

    def _check_alerts(self, record: StepRecord, deltas: dict[int, float], first_bad: dict[int, int]) -> None:
        """Judge a written step (``deltas``: delta_rms by layer id); warn, call back or stop."""
        if not (first_bad and self._alerts["nonfinite"] != "ignore") and self._ratio_ignored:
            return  # nothing to judge (the lab's runs, warn=False)
        ordered = sorted(
            (lay for lay in self._layers if lay.kind == "param"),
            key=lambda lay: (lay.layer_id is None, lay.layer_id or 0),
        )
        judged = [lay for lay in ordered if lay.layer_id in deltas]
        alerts = step_alerts(
            self._alerts,
            {lay.name: deltas[lay.layer_id] for lay in judged},  # type: ignore[index]
            {lay.name: type(lay.module).__name__ for lay in judged},
            first_bad,
            self._layer_of,
            [lay.name for lay in ordered],
            lambda: self._broken_weights(ordered),
            self.settings.thresholds,
            step=record.step,
            run_id=self.run_id,
        )
        for alert in alerts:
            self._act(alert)

    def _broken_weights(self, ordered: list[_Layer]) -> list[str]:
        """The layers whose (first chosen) weight holds a non-finite value, in forward order."""
        with_weight = [lay for lay in ordered if lay.params]
        if not with_weight:
            return []
        with torch.no_grad():
            weights = [self._params[lay.params[0]].detach() for lay in with_weight]
            finite = torch.isfinite(self._norms(weights))
        return [lay.name for lay, ok in zip(with_weight, finite.tolist(), strict=True) if not ok]

    def _act(self, alert: Alert) -> None:
        action = self._alerts[alert.kind]
        if action == "warn":
            if alert.kind not in self._live_warned:
                self._live_warned.add(alert.kind)
                warnings.warn(alert.message, GradientWarning, stacklevel=_user_stacklevel())
        elif action == "stop":
            if not self._attached:  # found while detaching: nothing left to stop; say so
                self._stop_alert = alert
                warnings.warn(alert.message, GradientWarning, stacklevel=_user_stacklevel())
                return
            self._shutdown("stopped", alert.message)
            raise TrainingStopped(alert)
        elif callable(action):
            action(alert)

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
            if record.values is None:
                record.values = defaultdict(list)
            record.values[name].append(value)

    def flush(self) -> None:
        """Write the open step and block until the store has committed every row."""
        self._close_step(write=True)
        self.store.flush()

    def detach(self, *, error: BaseException | None = None) -> None:
        """Remove every hook, write what was recorded and mark the run finished.

        Idempotent. Afterwards the model's hook dictionaries are exactly as before
        :func:`watch`. With ``error`` (an exception on its way out) the open,
        possibly half-recorded step is dropped and the run is marked failed; a
        :class:`~gradwatch.errors.TrainingStopped` has already written everything
        and marked the run ``stopped``.
        """
        if not self._attached:
            return
        if error is not None:
            self._record = None  # half-recorded: dropped
        self._shutdown("finished" if error is None else "failed",
                       None if error is None else f"{type(error).__name__}: {error}")

    def _shutdown(self, status: str, message: str | None) -> None:
        self._attached = False
        self._disarm()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._restore_scaler is not None:
            self._restore_scaler()
        if _WATCHED.get(self.model) is not None and _WATCHED[self.model]() is self:
            del _WATCHED[self.model]
        try:
            if status != "stopped":  # a stop has written everything already
                self._close_step(write=True)
        finally:
            if self._stop_alert is not None and status == "finished":
                status, message = "stopped", self._stop_alert.message
            self.store.finish_run(self.run_id, status, message)
            if self._owns_store:
                self.store.close()
            self._deferral.release()

    def deferred_layers(self) -> dict[str, bool]:
        """Where each watched layer's output and activation statistics are taken, by layer name.

        True: they wait for the end of the forward and are measured stacked with the other
        layers of their shape; False: in the layer's hook, because its tensor was changed
        in place after the hook (``nn.ReLU(inplace=True)`` after it, ``out += identity``).
        Layers not seen on a logged step yet are absent. See :mod:`gradwatch._defer`.
        """
        names = {layer.layer_id: layer.name for layer in self._layers if layer.layer_id is not None}
        return {names[lid]: ok for (_, lid), ok in self._deferral.deferrable.items() if lid in names}

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


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    every: int | Callable[[int], bool] = WatchConfig.every,
    store: RunStore | str | None = None,
    run_name: str | None = None,
    config: dict[str, Any] | None = None,
    activation_stats: bool = WatchConfig.activation_stats,
    warn: bool = WatchConfig.warn,
    include: Selector | None = None,
    exclude: Selector | None = None,
    activation_sample: int = WatchConfig.activation_sample,
    weight_samples: int = WatchConfig.weight_samples,
    ui: bool | int = False,
    scaler: torch.amp.GradScaler | None = None,
    window: bool | None = None,
    alerts: Mapping[str, Action] | None = None,
    thresholds: Any = None,
    settings: WatchConfig | None = None,
) -> Watcher:
    """Watch a model's gradient flow; returns a :class:`Watcher` (also a context manager).

    Recorded per logged step (DESIGN.md "What is measured"): for each module with
    trainable parameters, ``grad_norm`` and ``weight_norm`` of its weight,
    ``update_ratio = ||w_after - w_before|| / ||w_before||`` (with an optimizer),
    ``delta_rms = sqrt(mean((dL/d output)^2))`` (the back-propagated error, which
    vanishes even when weight gradients stay level: Glorot & Bengio 2010), and
    the output's mean and std; for each known activation the saturated, green
    and dead fractions and the mean derivative at its inputs; globally
    ``total_grad_norm`` (``torch.nn.utils.get_total_norm``, to float32 rounding), ``lr``,
    ``nonfinite_grads``, ``wall_time``, and whatever :meth:`Watcher.log` is given.

    Args:
        model: the module to watch. Its forward must be called for steps to be seen.
        optimizer: recommended. Steps are then optimizer steps (gradient
            accumulation works) and update ratios are recorded, through the
            optimizer's step hooks: no manual call needed.
        every: log every N-th step (``step % every == 0``), or a callable
            ``step -> bool``. Default: 50 (:data:`DEFAULT_EVERY`). Unlogged steps only
            update the window (see ``window``).
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
            weights against epochs" (``RunStore.weight_samples``). They are drawn inside
            the block of 4096 contiguous elements that the update ratio reads
            (:func:`gradwatch.stats.weight_block`; the whole weight when smaller), so
            both come from one copy. 0 turns it off.
        warn: warn (:class:`~gradwatch.errors.GradientWarning`, once per kind per run)
            when a logged step shows non-finite, vanishing or exploding gradients, by
            :func:`gradwatch.thresholds.live_alert`'s thresholds, pointing to ``gradwatch show``.
        include: watch only these modules: name patterns (``fnmatch``, e.g.
            ``"encoder.layer.*"``) or module types (``nn.Linear``). Default: all.
        exclude: do not watch these modules (same forms). ``total_grad_norm`` always
            covers every trainable parameter of the model.
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop. Gradient norms and
            deltas are then divided by the scale their backward used (the unscaled values
            are recorded), the scale is recorded as ``grad_scale``, and a step the scaler
            skips (inf/NaN) is recorded as ``skipped_step`` with no layer data. Without
            it, a scaler calling ``optimizer.step()`` is found on the first step that is
            not skipped; steps skipped before then merge into the next one.
        window: at every step, logged or not, take the norm of every parameter's
            gradient (one ``torch._foreach_norm``, no sync) and keep its running max and
            min until the next logged step, which records them as ``grad_norm_max`` /
            ``grad_norm_min`` per layer and ``total_grad_norm_max`` / ``_min``,
            ``nonfinite_grads_max`` and ``window_steps`` globally: a spike between two
            logged steps is never lost. ``False``: unlogged steps do no tensor work.
            ``None`` (default): on when the parameters live on an accelerator (the norm
            is a few fused kernels there) or when an alert rule for ``"nonfinite"``
            stops or calls back (it needs every step's norms); off for parameters on the
            CPU, where reading every gradient from memory at every step costs a few percent
            of a small model's step (``bench/overhead.py`` measures both).
        alerts: what to do when a step shows ``"nonfinite"``, ``"vanishing"`` or
            ``"exploding"`` gradients: ``"warn"``, ``"stop"`` (raise
            :class:`~gradwatch.errors.TrainingStopped` naming the step and the layer),
            ``"ignore"`` or a callable taking an :class:`~gradwatch.alerts.Alert`.
            Default: ``"warn"`` for each (``"ignore"`` with ``warn=False``). See
            :mod:`gradwatch.alerts`.
        thresholds: a :class:`gradwatch.diagnose.Thresholds` for the alerts. Default: its defaults.
        settings: all of the recording options above at once, as a
            :class:`~gradwatch.config.WatchConfig` (what the callbacks and the lab pass);
            then leave those keyword arguments at their defaults.

    Recorded globally at each logged step, besides the above: ``total_grad_norm`` is
    the norm before clipping (at the end of the step's last backward pass), and with
    an optimizer ``clipped_grad_norm`` is the norm of what the optimizer applied
    (after unscaling and ``clip_grad_norm_``); they are equal when nothing clips.
    Under gradient accumulation, ``delta_rms`` aggregates the micro-batches of the
    step: ``sqrt(sum of squared deltas / number of elements)`` over all of them, the
    RMS of the per-micro-batch backpropagated errors.

    A compiled model (``torch.compile(model)``) is watched at the parameter level only
    (gradient and weight norms, update ratios, global norms, windowed extremes), with
    one warning: per-layer hooks inside the compiled graph would break it.

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
    options = dict(every=every, activation_stats=activation_stats, warn=warn, include=include,
                   exclude=exclude, activation_sample=activation_sample, weight_samples=weight_samples,
                   window=window, alerts=alerts, thresholds=thresholds)
    defaults = WatchConfig()
    given = {k: v for k, v in options.items() if v is not getattr(defaults, k) and v != getattr(defaults, k)}
    settings = WatchConfig.from_options(settings, given, where="watch()") if settings is not None \
        else WatchConfig(**options)
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise ConfigError(
            f"scaler must be a torch.amp.GradScaler; got {type(scaler).__name__}. Pass the scaler "
            f"whose scale(loss).backward() and step(optimizer) the loop calls"
        )
    previous = _WATCHED.get(model)
    if previous is not None and previous() is not None and previous().attached:
        raise WatchError(
            f"this {type(model).__name__} is already watched by run {previous().run_id}; call "
            f"detach() on that watcher first (or use it as a context manager)"
        )
    if settings.include is not None:
        named = [(n or type(m).__name__.lower(), m) for n, m in model.named_modules()]
        if not any(_matches(n, m, settings.include) for n, m in named):
            sample = ", ".join(n for n, _ in named[:8])
            raise ConfigError(
                f"include={include if include is not None else list(settings.include)!r} matches no "
                f"module of the model; its modules: {sample}, ..."
            )
    if isinstance(store, RunStore):
        run_store, owns = store, False
    else:
        run_store, owns = RunStore(store), True
    name = run_name or f"{type(model).__name__}-{time.strftime('%Y%m%d-%H%M%S')}"
    full_config = dict(config or {})
    full_config.setdefault("gradwatch", gradwatch_config(
        settings.every, type(model).__name__, sum(p.numel() for p in model.parameters()),
        type(optimizer).__name__ if optimizer is not None else None,
    ))
    try:
        watcher = Watcher(
            model,
            optimizer,
            settings=settings,
            store=run_store,
            owns_store=owns,
            run_name=name,
            config=full_config,
            scaler=scaler,
        )
    except BaseException:
        if owns:
            run_store.close()
        raise
    if watcher.compiled:
        warnings.warn(
            f"gradwatch: {type(model).__name__} is compiled (torch.compile): recording parameter-level "
            "metrics only (grad and weight norms, update ratios, global norms, windowed extremes). "
            "delta_rms, output moments and activation statistics need hooks inside the compiled "
            "graph, which would break it; watch the uncompiled model for them.",
            UserWarning,
            stacklevel=2,
        )
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
