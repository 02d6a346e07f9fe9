"""Hugging Face: ``GradwatchCallback``, gradient flow of a ``Trainer.train`` in the run store.

::

    from gradwatch.integrations.transformers import GradwatchCallback

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[GradwatchCallback(every=10)])
    trainer.train()

How it fits the Trainer:

* Steps are optimizer steps (``state.global_step`` before the step), through the step
  hooks of the torch optimizer inside accelerate's wrapper; gradient accumulation is one
  step. The Trainer clips gradients (``max_grad_norm``, default 1.0) *before* the
  optimizer step, so the recorded weight-gradient norms are post-clip; the Trainer's
  own pre-clip total norm is logged as ``preclip_grad_norm``.
* Per step the learning rate the step uses (``lr``); at each Trainer log the ``loss``
  (averaged by the Trainer over its ``logging_steps``), ``preclip_grad_norm`` and
  ``epoch``; evaluation metrics under their names (``eval_loss``, ...).
* At the end of training the watcher is detached and :func:`gradwatch.diagnose` stores
  its findings. Under DDP rank 0 records (``all_ranks=True``: every rank).
"""

from __future__ import annotations

from typing import Any

import torch

from gradwatch.config import WatchConfig
from gradwatch.errors import WatchError
from gradwatch.integrations import MissingExtraError
from gradwatch.integrations.ddp import IdleWatcher, watch_ddp
from gradwatch.store import RunStore
from gradwatch.watch import Watcher

try:
    from transformers import TrainerCallback
except ImportError as err:
    raise MissingExtraError(
        "GradwatchCallback needs transformers, which is not installed; install it with: "
        "pip install 'gradwatch[hf]'"
    ) from err

__all__ = ["GradwatchCallback"]

# Trainer log keys -> scalar names in the store.
_LOG_NAMES = {"loss": "loss", "grad_norm": "preclip_grad_norm", "epoch": "epoch"}


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (its ``step`` calls
    the inner one's, where the hooks are).
    """
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _no_parameters(model: Any) -> str | None:
    if model is None or any(p.requires_grad for p in model.parameters()):
        return None
    what = "no parameters" if not list(model.parameters()) else "no parameter that requires grad"
    return (
        f"GradwatchCallback: the {type(model).__name__} given to the Trainer has {what}, so there are "
        f"no gradients to watch; pass the model you train (unfreeze some parameters), or remove the callback"
    )


class GradwatchCallback(TrainerCallback):
    """Records a Hugging Face ``Trainer.train`` with :func:`gradwatch.watch`.

    Args:
        settings: how to record, a :class:`~gradwatch.config.WatchConfig` (the cadence
            ``every`` counts optimizer steps; default 50, as :func:`~gradwatch.watch`). Or
            give its fields as keyword arguments: ``GradwatchCallback(every=10)``.
        store: a :class:`~gradwatch.RunStore` or a path. Default: ``$GRADWATCH_STORE``,
            else ``./gradwatch-runs/gradwatch.db``.
        run_name: the run's name. Default: ``args.run_name`` when set, else the model's
            class name and the time.
        config: stored with the run; the model's config and the main training arguments
            are added under ``model_config`` and ``training_args``.
        diagnose: store :func:`gradwatch.diagnose` findings at the end. Default: True.
        all_ranks: under DDP, record every rank (one run each). Default: rank 0 only.
        **options: :class:`~gradwatch.config.WatchConfig` fields (``every``, ``include``,
            ``exclude``, ...) and :func:`~gradwatch.watch`'s ``ui`` and ``scaler``.

    Attributes:
        watcher: the :class:`~gradwatch.Watcher` while training, None before.
        run_id: the run's id in the store, once training started.
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
        self._run_name = run_name
        self._config = dict(config or {})
        self._diagnose = diagnose
        self._all_ranks = all_ranks
        self.watcher: Watcher | IdleWatcher | None = None
        self.run_id: int | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Fail at ``Trainer(...)`` when the model has nothing to watch."""
        problem = _no_parameters(model)
        if problem:
            raise WatchError(problem)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        """Start watching the model and the Trainer's optimizer."""
        problem = _no_parameters(model)
        if problem:
            raise WatchError(problem)
        if self.watcher is not None and self.watcher.attached:  # train() called again
            self.watcher.detach()
        config = dict(self._config)
        model_config = getattr(model, "config", None)
        if model_config is not None and hasattr(model_config, "to_dict"):
            config.setdefault("model_config", model_config.to_dict())
        config.setdefault("training_args", {
            k: getattr(args, k, None) for k in ("learning_rate", "per_device_train_batch_size",
                                                "gradient_accumulation_steps", "max_grad_norm", "max_steps",
                                                "num_train_epochs", "weight_decay", "seed")
        })
        name = self._run_name or getattr(args, "run_name", None) or None
        if name is not None and name == getattr(args, "output_dir", None):  # older Trainers' default
            name = None
        self.watcher = watch_ddp(model, _torch_optimizer(optimizer), all_ranks=self._all_ranks,
                                 run_name=name, config=config, **self._options)
        self.run_id = self.watcher.run_id

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        """Log the learning rate this step uses."""
        inner = _torch_optimizer(optimizer)
        if self.watcher is not None and inner is not None and inner.param_groups:
            lr = inner.param_groups[0].get("lr")
            if isinstance(lr, (int, float, torch.Tensor)):
                self.watcher.log(lr=lr)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        """Log the Trainer's loss, pre-clip gradient norm and epoch."""
        if self.watcher is None or not self.watcher.attached or not logs:
            return
        values = {_LOG_NAMES[k]: v for k, v in logs.items()
                  if k in _LOG_NAMES and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self.watcher.log(**values)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None,
                    **kwargs: Any) -> None:
        """Log evaluation metrics (``eval_loss``, ...) at the current step."""
        if self.watcher is None or not self.watcher.attached or not metrics:
            return
        values = {k.replace("/", "."): float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
        if values:
            self.watcher.log(**values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Detach, then store the diagnosis."""
        watcher = self.watcher
        if watcher is None or not watcher.attached:
            return
        watcher.detach()
        if self._diagnose and isinstance(watcher, Watcher):
            from gradwatch.diagnose import diagnose

            diagnose(watcher.run_id, store=watcher.store.path)

    def __repr__(self) -> str:
        return f"GradwatchCallback(run_id={self.run_id}, every={self.settings.every!r})"
