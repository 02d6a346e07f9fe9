"""The lab: the seeds' experiments run end to end on built-in data, offline.

``models`` builds configurable MLP/CNN stacks (:class:`ModelConfig`,
:func:`build_model`); ``data`` loads digits, MNIST-1D or a user's file
(:func:`load_dataset`); ``presets`` holds grids and their claims as data
(:class:`Preset`, :data:`PRESETS`), the paper presets in ``papers``; ``tasks``
holds what both runners share (:class:`RunTask`, :class:`RunResult`, :class:`RunEvent`,
the backends); ``runner`` runs a grid on a backend, resumes, and summarises it from the
store (:func:`run_lab`); ``vectorized`` trains an MLP's seeds as one batched network;
``meanfield`` measures the delta profile mean-field theory predicts
(:func:`gradwatch.lab.meanfield.measure_delta_profile`).
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
from gradwatch.lab.presets import (
    PRESETS,
    Claim,
    ConfigSummary,
    GridEntry,
    PaperRow,
    Preset,
    Published,
    TrainSettings,
    Verdict,
    get_preset,
    load_preset_file,
    paper_table,
    preset_names,
    register_preset,
)
from gradwatch.lab.runner import LabInterrupted, LabResult, run_lab, run_task
from gradwatch.lab.tasks import (
    Backend,
    InProcessBackend,
    LocalBackend,
    RunEvent,
    RunResult,
    RunTask,
)

__all__ = [
    "BUILTIN_DATASETS",
    "PRESETS",
    "Backend",
    "Claim",
    "ConfigSummary",
    "GridEntry",
    "InProcessBackend",
    "PaperRow",
    "Published",
    "paper_table",
    "LabInterrupted",
    "LabResult",
    "LocalBackend",
    "Preset",
    "RunEvent",
    "RunResult",
    "RunTask",
    "TrainSettings",
    "Verdict",
    "get_preset",
    "load_preset_file",
    "preset_names",
    "register_preset",
    "run_lab",
    "run_task",
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

# Registers the paper presets (glorot2010, he2015, ...) in PRESETS, after the built-in ones.
from gradwatch.lab import papers  # noqa: E402, F401
