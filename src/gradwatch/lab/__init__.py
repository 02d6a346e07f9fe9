"""The lab: the seeds' experiments run end to end on built-in data, offline.

``models`` builds configurable MLP/CNN stacks (:class:`ModelConfig`,
:func:`build_model`); ``data`` loads digits, MNIST-1D or a user's file
(:func:`load_dataset`).
"""

from __future__ import annotations

from gradwatch.lab.data import BUILTIN_DATASETS, Dataset, iterate_minibatches, load_dataset
from gradwatch.lab.models import (
    INIT_NAMES,
    MODEL_KINDS,
    ModelConfig,
    build_model,
    count_parameters,
    describe,
    initialize_,
)

__all__ = [
    "BUILTIN_DATASETS",
    "INIT_NAMES",
    "MODEL_KINDS",
    "Dataset",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "describe",
    "initialize_",
    "iterate_minibatches",
    "load_dataset",
]
