"""gradwatch: shows, explains and fixes vanishing and exploding gradients in PyTorch.

``watch(model, optimizer)`` records per-layer gradient flow at near-zero cost
into a SQLite run store; ``open_store()`` reads it back as pandas DataFrames.
"""

from __future__ import annotations

__version__ = "0.1.0"

from gradwatch.activations import Activation, activation_names, get_activation
from gradwatch.alerts import Alert
from gradwatch.config import WatchConfig
from gradwatch.diagnose import Finding, Prescription, Thresholds, diagnose
from gradwatch.errors import GradientWarning, GradwatchError, TrainingStopped
from gradwatch.prescribe import prescribe
from gradwatch.store import RunStore, open_store
from gradwatch.watch import Watcher, watch

__all__ = [
    "__version__",
    "watch",
    "Watcher",
    "WatchConfig",
    "RunStore",
    "open_store",
    "Activation",
    "activation_names",
    "get_activation",
    "GradwatchError",
    "GradientWarning",
    "TrainingStopped",
    "Alert",
    "diagnose",
    "Finding",
    "Prescription",
    "Thresholds",
    "prescribe",
]
