"""Lightning: ``GradwatchCallback``, gradient flow of a ``Trainer.fit`` in the run store.

::

    from gradwatch.integrations.lightning import GradwatchCallback

    trainer = lightning.Trainer(max_epochs=5, callbacks=[GradwatchCallback(every=10)])
    trainer.fit(model, train_loader)

Works with both import names, ``lightning`` and ``pytorch_lightning`` (the callback
subclasses the first one installed; both Trainers call it).

How it fits Lightning (and why):

* Steps are optimizer steps (``trainer.global_step``), through the watched optimizer's
  step hooks. Lightning runs forward and backward *inside* ``optimizer.step(closure)``;
  the callback evaluates that closure first (in a step pre-hook registered before the
  watcher's), so gradient norms are taken after this step's backward and the update
  ratio spans this step's update. Lightning clips gradients inside the closure, so with
  ``gradient_clip_val`` the recorded norms are post-clip.
* Lightning calls ``training_step`` directly, not the module's ``forward``; the watcher
  sees a step through the module's forward hooks, so on a single device the callback
  routes ``training_step`` through ``module(...)`` the way Lightning's own strategies
  do for DDP ("forward redirection"). A ``training_step`` that calls ``self(x)`` works too.
* Every batch logs ``loss`` (from ``training_step``'s output), ``lr`` (the first
  parameter group's) and ``epoch``; validation logs the trainer's callback metrics.
* At the end of fit the watcher is detached and :func:`gradwatch.diagnose` stores its
  findings (listed with ``gradwatch show RUN``). An exception marks the run failed.
* Under DDP, rank 0 records (``all_ranks=True``: every rank), see
  :mod:`gradwatch.integrations.ddp`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from gradwatch.config import WatchConfig
from gradwatch.errors import WatchError
from gradwatch.integrations import MissingExtraError
from gradwatch.integrations.ddp import IdleWatcher, watch_ddp
from gradwatch.store import RunStore
from gradwatch.watch import Watcher

try:
    import lightning.pytorch as _pl
except ImportError:
    try:
        import pytorch_lightning as _pl  # the older import name
    except ImportError as err:
        raise MissingExtraError(
            "GradwatchCallback needs Lightning, which is not installed; install it with: "
            "pip install 'gradwatch[lightning]'"
        ) from err

__all__ = ["GradwatchCallback"]


def _number(value: Any) -> float | torch.Tensor | None:
    """A loggable scalar (a one-element tensor stays on its device), else None."""
    if isinstance(value, torch.Tensor):
        return value.detach() if value.numel() == 1 and value.is_floating_point() else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _closure_first(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple | None:
    """Step pre-hook: run Lightning's closure (zero_grad, forward, backward, clipping) now,
    and hand the step a closure returning its result, so hooks that follow see this
    step's gradients.
    """
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
    if closure is None or isinstance(optimizer, torch.optim.LBFGS):  # LBFGS re-evaluates it
        return None
    with torch.enable_grad():
        result = closure()
    return args[:1], {**kwargs, "closure": lambda: result}


class GradwatchCallback(_pl.Callback):
    """Records a Lightning fit with :func:`gradwatch.watch`.

    Args:
        settings: how to record, a :class:`~gradwatch.config.WatchConfig` (the cadence
            ``every`` counts optimizer steps; default 50, as :func:`~gradwatch.watch`). Or
            give its fields as keyword arguments: ``GradwatchCallback(every=10)``.
        store: a :class:`~gradwatch.RunStore` or a path. Default: ``$GRADWATCH_STORE``,
            else ``./gradwatch-runs/gradwatch.db``.
        run_name: the run's name. Default: the LightningModule's class name and the time.
        config: stored with the run; the module's ``hparams`` are added under ``hparams``.
        diagnose: store :func:`gradwatch.diagnose` findings at the end of fit. Default: True.
        all_ranks: under DDP, record every rank (one run each). Default: rank 0 only.
        **options: :class:`~gradwatch.config.WatchConfig` fields (``every``, ``include``,
            ``exclude``, ...) and :func:`~gradwatch.watch`'s ``ui`` and ``scaler``.

    Attributes:
        watcher: the :class:`~gradwatch.Watcher` while fitting (an idle one on ranks that
            do not record), None before.
        run_id: the run's id in the store, once fitting started.
    """

    def __init__(
        self,
        settings: WatchConfig | None = None,
        *,
        store: RunStore | str | None = None,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        diagnose: bool = True,
        all_ranks: bool = False,
        **options: Any,
    ) -> None:
        self.settings, runtime = WatchConfig.split(settings, options, where="GradwatchCallback")
        self._options = dict(settings=self.settings, store=store, **runtime)
        self._options["run_name"] = run_name
        self._config = dict(config or {})
        self._diagnose = diagnose
        self._all_ranks = all_ranks
        self.watcher: Watcher | IdleWatcher | None = None
        self.run_id: int | None = None
        self._closure_hook: Any = None
        self._rerouted: nn.Module | None = None

    # -- start ---------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:  # noqa: D102
        # Fail before Lightning builds optimizers around an empty model (its error is torch's).
        if stage == "fit" and not any(p.requires_grad for p in pl_module.parameters()) \
                and type(pl_module).configure_model is _pl.LightningModule.configure_model:
            what = "no parameters" if not list(pl_module.parameters()) else "no parameter that requires grad"
            raise WatchError(
                f"GradwatchCallback: the {type(pl_module).__name__} given to the Trainer has {what}, "
                f"so there are no gradients to watch; build its layers in __init__ (or configure_model), "
                f"or remove the callback"
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: D102
        optimizers = [o for o in trainer.optimizers if isinstance(o, torch.optim.Optimizer)]
        optimizer = optimizers[0] if optimizers else None
        if len(optimizers) > 1:
            warnings.warn(
                f"GradwatchCallback: {len(optimizers)} optimizers; steps and update ratios follow the "
                f"first one ({type(optimizer).__name__})", stacklevel=2,
            )
        if optimizer is not None:  # must run before the watcher's own pre-hook: register it first
            self._closure_hook = optimizer.register_step_pre_hook(_closure_first)
        config = dict(self._config)
        hparams = getattr(pl_module, "hparams", None)
        if hparams:
            config.setdefault("hparams", dict(hparams))
        try:
            self.watcher = watch_ddp(pl_module, optimizer, all_ranks=self._all_ranks, config=config,
                                     **self._options)
        except BaseException:
            self._remove_hooks()
            raise
        self.run_id = self.watcher.run_id
        if isinstance(self.watcher, Watcher) and trainer.strategy.model is pl_module:
            self._reroute_training_step(pl_module)

    def _reroute_training_step(self, module: nn.Module) -> None:
        """Call ``training_step`` through ``module(...)`` so its forward hooks mark the step."""
        original = module.training_step  # the bound method

        def training_step(*args: Any, **kwargs: Any) -> Any:
            real_forward = module.forward

            def forward(*a: Any, **k: Any) -> Any:
                module.forward = real_forward  # training_step may call self(x) itself
                return original(*a, **k)

            module.forward = forward
            try:
                return module(*args, **kwargs)
            finally:
                module.forward = real_forward

        module.training_step = training_step
        self._rerouted = module

    # -- every batch ---------------------------------------------------------------------

    def on_train_batch_end(  # noqa: D102
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.watcher is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        values: dict[str, Any] = {"loss": _number(loss), "epoch": float(trainer.current_epoch)}
        if trainer.optimizers and trainer.optimizers[0].param_groups:
            values["lr"] = _number(trainer.optimizers[0].param_groups[0].get("lr"))
        self.watcher.log(**{k: v for k, v in values.items() if v is not None})

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: D102
        if self.watcher is None or trainer.sanity_checking:
            return
        values = {k: _number(v) for k, v in trainer.callback_metrics.items()}
        values = {k.replace("/", "."): v for k, v in values.items()
                  if v is not None and k not in ("loss", "lr", "epoch")}
        if values:
            self.watcher.log(**values)

    # -- end -----------------------------------------------------------------------------

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: D102
        watcher = self._finish()
        if self._diagnose and isinstance(watcher, Watcher):
            from gradwatch.diagnose import diagnose

            findings = diagnose(watcher.run_id, store=watcher.store.path)
            if findings:
                _pl.utilities.rank_zero_info(
                    f"gradwatch: run {watcher.run_id}: " + "; ".join(f.title for f in findings)
                    + f" (see `gradwatch show {watcher.run_id}`)"
                )

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:  # noqa: D102
        self._finish(error=exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:  # noqa: D102
        self._finish()

    def _finish(self, error: BaseException | None = None) -> Watcher | IdleWatcher | None:
        watcher = self.watcher
        self._remove_hooks()
        if watcher is not None:
            watcher.detach(error=error)
        return watcher

    def _remove_hooks(self) -> None:
        if self._closure_hook is not None:
            self._closure_hook.remove()
            self._closure_hook = None
        if self._rerouted is not None:
            self._rerouted.__dict__.pop("training_step", None)
            self._rerouted = None

    def __repr__(self) -> str:
        return f"GradwatchCallback(run_id={self.run_id}, every={self.settings.every!r})"

