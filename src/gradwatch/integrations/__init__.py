"""Thin adapters from training frameworks to :func:`gradwatch.watch` and the run store.

Each module imports its framework only when used, so ``import gradwatch`` pulls in
none of them:

* :mod:`~gradwatch.integrations.lightning`: ``GradwatchCallback`` for a Lightning ``Trainer``
  (``pip install gradwatch[lightning]``).
* :mod:`~gradwatch.integrations.transformers`: ``GradwatchCallback`` for a Hugging Face
  ``Trainer`` (``gradwatch[hf]``).
* :mod:`~gradwatch.integrations.ddp`: ``watch_ddp`` under ``torchrun`` (rank 0, or every rank).
* :mod:`~gradwatch.integrations.export`: a run to TensorBoard (``gradwatch[tensorboard]``),
  CSV or Parquet (``gradwatch[parquet]``); ``gradwatch export`` on the command line.
* :mod:`~gradwatch.integrations.ray`: ``RayBackend``, the lab's grid as Ray tasks
  (``gradwatch[ray]``); ``gradwatch lab --backend ray``.

None of them computes a statistic: they decide when :func:`~gradwatch.watch` starts and
stops, pass the framework's loss and learning rate to :meth:`~gradwatch.Watcher.log`,
and read the store.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from gradwatch.errors import GradwatchError

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(GradwatchError, ImportError):
    """An integration's framework is not installed."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"this needs the {module.split('.')[0]!r} package, which is not installed; install it "
            f"with: pip install 'gradwatch[{extra}]' (beside your torch, which it leaves as it is)"
        ) from err
