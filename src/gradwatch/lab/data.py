"""The lab's data, all made offline: digits, MNIST-1D, or a user's .npz / .csv file.

:func:`load_dataset` returns a :class:`Dataset` with a fixed, stratified train/test
split chosen by ``seed`` and features standardised with the train split's mean and
standard deviation. Bad data raises :class:`~gradwatch.errors.DataError` before any
training starts, saying what is wrong, where, and how to fix it.

* ``"digits"``: scikit-learn's 8x8 handwritten digits (1,797 examples, 10 classes),
  shipped inside scikit-learn; ``input_shape`` (1, 8, 8).
* ``"mnist1d"``: MNIST-1D (Greydanus 2020), 5,000 signals of length 40, 10 classes,
  *generated* locally by ``mnist1d.data.make_dataset`` with the package's default
  arguments (generator seed 42, the canonical data set), never downloaded. It takes
  about 3 s on one core, so the result is cached as ``mnist1d_n5000_seed42.npz`` under
  ``cache_dir`` (default ``./gradwatch-runs/data/``). The package's own 80/20 split is
  pooled and re-split by ``seed`` like every other data set. ``input_shape`` (1, 40).
* ``"shapeset"``: Shapeset-3x2 (Glorot & Bengio 2010), 20,000 32x32 grey images of one
  or two shapes, 9 classes, drawn by :func:`gradwatch.lab.shapeset.make_shapeset`
  (generator seed 1234, a few seconds, once per process). ``input_shape`` (1, 32, 32).
* a path to ``.npz`` with arrays ``x`` (n_examples, ...) and ``y`` (n_examples,), or
  to ``.csv`` (comma separated, last column the label, header row optional).
"""

from __future__ import annotations

import csv
import functools
import math
import os
import random
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gradwatch.errors import ConfigError, DataError, check_int

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_INPUT_SHAPES",
    "DEFAULT_CACHE_DIR",
    "Dataset",
    "load_dataset",
    "prepare_arrays",
    "iterate_minibatches",
]

BUILTIN_DATASETS = ("digits", "mnist1d", "shapeset")
BUILTIN_INPUT_SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40), "shapeset": (1, 32, 32)}
DEFAULT_CACHE_DIR = Path("gradwatch-runs") / "data"
MNIST1D_NUM_SAMPLES = 5000  # the package's default; make_dataset takes ~3 s for it
MNIST1D_SEED = 42  # the package's default generator seed: the canonical MNIST-1D
_HOW_TO = (
    "give a built-in name ({names}) or a path to a .npz file with arrays x "
    "(n_examples, n_features) and y (n_examples,), or a .csv file whose last column is the label"
)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification data set split into train and test, ready for training.

    Attributes:
        name: ``"digits"``, ``"mnist1d"``, or the file's stem.
        x_train: (n_train, n_features) float32, standardised with the train split's
            per-feature mean and std (features constant on train are only centred).
        y_train: (n_train,) int64 class indices in ``[0, n_classes)``.
        x_test: (n_test, n_features) float32, standardised like ``x_train``.
        y_test: (n_test,) int64.
        input_shape: shape of one example for CNNs, (C, L) or (C, H, W), e.g. (1, 8, 8);
            ``x`` is stored flat and a CNN reshapes it.
        class_labels: the original label of each class index (``y == i`` was
            ``class_labels[i]`` in the file).
        seed: the seed that chose the split.
    """

    name: str
    x_train: Tensor = field(repr=False)
    y_train: Tensor = field(repr=False)
    x_test: Tensor = field(repr=False)
    y_test: Tensor = field(repr=False)
    input_shape: tuple[int, ...]
    class_labels: tuple = field(repr=False)
    seed: int = 0

    @property
    def n_features(self) -> int:
        """Number of input features (the product of ``input_shape``)."""
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_labels)

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return self.x_train.shape[0]

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return self.x_test.shape[0]


def load_dataset(
    name_or_path: str | os.PathLike[str],
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    test_fraction: float = 0.2,
) -> Dataset:
    """Load a built-in data set or a user's file, split and standardised.

    Args:
        name_or_path: ``"digits"``, ``"mnist1d"``, ``"shapeset"``, or a path to a ``.npz`` (arrays ``x``,
            ``y``) or ``.csv`` (last column the label) file.
        seed: chooses the stratified train/test split (same seed, same split). Default: 0.
        cache_dir: where generated data sets (MNIST-1D) are cached.
            Default: ``./gradwatch-runs/data/``.
        test_fraction: share of each class held out for testing. Default: 0.2.

    Raises:
        DataError: unknown name, unreadable file, missing arrays, non-numeric values,
            NaN/Inf, mismatched lengths, an empty set, a single class, or a class too
            small to appear in both splits.
    """
    _check_split_args(seed, test_fraction)
    key = os.fspath(name_or_path)
    path = Path(key)
    if key.lower() in BUILTIN_DATASETS and not path.is_file():
        name = key.lower()
        if name == "digits":
            x, y = _load_digits()
        elif name == "shapeset":
            x, y = _load_shapeset()
        else:
            x, y = _load_mnist1d(Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR)
    else:
        suffix = path.suffix.lower()
        if suffix not in (".npz", ".csv"):
            if path.exists():
                raise DataError(
                    f"cannot read {key!r}: unsupported file type {path.suffix or '(none)'!r}; "
                    "expected .npz or .csv"
                )
            raise DataError(
                f"unknown dataset {key!r}; " + _HOW_TO.format(names=", ".join(BUILTIN_DATASETS))
            )
        if not path.is_file():
            raise DataError(
                f"data file {key!r} not found"
                + (" (it is a directory)" if path.is_dir() else "")
                + "; check the path, or use a built-in dataset: " + ", ".join(BUILTIN_DATASETS)
            )
        x, y = _read_npz(path) if suffix == ".npz" else _read_csv(path)
        name = path.stem
    return prepare_arrays(x, y, name=name, seed=seed, test_fraction=test_fraction)


def prepare_arrays(
    x: np.ndarray,
    y: np.ndarray,
    *,
    name: str = "arrays",
    seed: int = 0,
    test_fraction: float = 0.2,
) -> Dataset:
    """Validate in-memory arrays, split them by ``seed`` and standardise: a :class:`Dataset`.

    ``x`` is (n_examples, n_features), (n_examples, C, L) or (n_examples, C, H, W);
    ``y`` holds one label (integers or strings) per example.

    Raises:
        DataError: see :func:`load_dataset`.
    """
    _check_split_args(seed, test_fraction)
    x, y, input_shape = _validate(np.asarray(x), np.asarray(y), name)
    class_labels, y_index = np.unique(y, return_inverse=True)
    train, test = _stratified_split(y_index, class_labels, seed, test_fraction, name)
    x_train, x_test = x[train], x[test]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0  # constant on train (e.g. digits' blank corner pixels): only centre
    return Dataset(
        name=name,
        x_train=torch.from_numpy(((x_train - mean) / std).astype(np.float32)),
        y_train=torch.from_numpy(y_index[train].astype(np.int64)),
        x_test=torch.from_numpy(((x_test - mean) / std).astype(np.float32)),
        y_test=torch.from_numpy(y_index[test].astype(np.int64)),
        input_shape=input_shape,
        class_labels=tuple(v.item() if hasattr(v, "item") else v for v in class_labels),
        seed=seed,
    )


def iterate_minibatches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x_batch, y_batch)`` pairs covering ``x, y`` once (one epoch).

    Args:
        x: inputs, first dimension the examples.
        y: labels, same first dimension.
        batch_size: examples per batch; the last batch may be smaller.
        generator: torch RNG for the shuffle (seed it for reproducible epochs).
            Default: None (the global RNG).
        shuffle: draw a fresh permutation each call. Default: True.
        drop_last: skip a last batch smaller than ``batch_size``. Default: False.
    """
    check_int("batch_size", batch_size, 1)
    n = x.shape[0]
    if y.shape[0] != n:
        raise DataError(f"x has {n} examples but y has {y.shape[0]} labels; expected equal")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


# --- built-in data sets ----------------------------------------------------------------------


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    digits = load_digits()
    return digits.images[:, None, :, :], digits.target  # (1797, 1, 8, 8): a one-channel image


@functools.lru_cache(maxsize=1)
def _load_shapeset() -> tuple[np.ndarray, np.ndarray]:
    """The lab's Shapeset-3x2 sample, drawn once per process (``prepare_arrays`` copies it)."""
    from gradwatch.lab.shapeset import make_shapeset

    return make_shapeset()


def _load_mnist1d(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-1D from the cache, or generated with ``make_dataset`` and cached atomically."""
    cache = cache_dir / f"mnist1d_n{MNIST1D_NUM_SAMPLES}_seed{MNIST1D_SEED}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as arrays:
                return arrays["x"], arrays["y"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # a broken cache is regenerated and overwritten
    x, y = _generate_mnist1d(MNIST1D_NUM_SAMPLES, MNIST1D_SEED)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f".{cache.name}.{os.getpid()}.partial")
        with open(partial, "wb") as handle:
            np.savez(handle, x=x, y=y)
        os.replace(partial, cache)  # atomic: parallel workers never read half a file
    except OSError as err:
        raise DataError(
            f"cannot cache MNIST-1D in {os.fspath(cache_dir)!r}: {err}; "
            "pass a writable cache_dir"
        ) from err
    return x, y


def _generate_mnist1d(num_samples: int, generator_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Run ``mnist1d.data.make_dataset`` (pure numpy/scipy, offline); returns (N, 1, 40), (N,).

    ``make_dataset`` seeds numpy's and Python's global RNGs; their states are restored.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise DataError(
            "the mnist1d package is not installed; install it with `pip install mnist1d` "
            "or use the built-in 'digits'"
        ) from err
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = generator_seed
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    x = np.concatenate([data["x"], data["x_test"]])[:, None, :]
    y = np.concatenate([data["y"], data["y_test"]])
    return x.astype(np.float32), y.astype(np.int64)


# --- user files ----------------------------------------------------------------------------


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        if not zipfile.is_zipfile(path):  # np.load would try to unpickle it
            raise DataError(
                f"cannot read {os.fspath(path)!r} as .npz: it is not a zip archive of .npy "
                "arrays; save it with np.savez(path, x=features, y=labels)"
            )
        with np.load(path, allow_pickle=False) as arrays:
            present = list(arrays.files)
            missing = [k for k in ("x", "y") if k not in present]
            if missing:
                raise DataError(
                    f"{os.fspath(path)!r} has no array{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(repr(k) for k in missing)}; found: "
                    f"{', '.join(repr(k) for k in present) or 'no arrays'}; "
                    "save it with np.savez(path, x=features, y=labels)"
                )
            return arrays["x"], arrays["y"]
    except DataError:
        raise
    except ValueError as err:  # object arrays need pickle, which is refused
        raise DataError(
            f"cannot read {os.fspath(path)!r}: {err}; expected numeric arrays x and y "
            "(not object arrays)"
        ) from err
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(
            f"cannot read {os.fspath(path)!r} as .npz: {err}; save it with "
            "np.savez(path, x=features, y=labels)"
        ) from err


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if row and any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read {os.fspath(path)!r} as CSV: {err}") from err
    if rows and not _all_numbers(rows[0][:-1]):
        rows = rows[1:]  # a header: its feature cells are not numbers
    if not rows:
        raise DataError(f"{os.fspath(path)!r} has no data rows; expected features then a label")
    width = len(rows[0])
    if width < 2:
        raise DataError(
            f"{os.fspath(path)!r} has {width} column; expected at least one feature column "
            "and a last label column"
        )
    for number, row in enumerate(rows, start=1):
        if len(row) != width:
            raise DataError(
                f"{os.fspath(path)!r}: data row {number} has {len(row)} columns but the first "
                f"has {width}; every row needs the same number of columns"
            )
    cells = np.array([row[:-1] for row in rows], dtype=str)
    try:
        x = np.char.strip(cells).astype(np.float64)
    except ValueError:
        bad = next((r, c) for r in range(cells.shape[0]) for c in range(cells.shape[1])
                   if not _is_number(cells[r, c]))
        raise DataError(
            f"{os.fspath(path)!r}: data row {bad[0] + 1}, column {bad[1] + 1} is "
            f"{cells[bad].strip()!r}, not a number; features must be numeric "
            "(encode categories as numbers first)"
        ) from None
    labels = [row[-1].strip() for row in rows]
    y = np.array(labels, dtype=np.float64) if _all_numbers(labels) else np.array(labels)
    return x, y


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _all_numbers(cells: list[str]) -> bool:
    return all(_is_number(c) for c in cells)


def _check_split_args(seed: int, test_fraction: float) -> None:
    check_int("seed", seed, 0)
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction={test_fraction!r}; expected a number in (0, 1)")


# --- validation and split -------------------------------------------------------------------


def _validate(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray,
                                                                   tuple[int, ...]]:
    """Checks shapes, dtypes and values; returns x flat float64, y 1-D, and input_shape."""
    if x.dtype.kind not in "biuf":
        raise DataError(
            f"{name}: x has dtype {x.dtype} ({_KIND_NAMES.get(x.dtype.kind, 'non-numeric')}); "
            "expected numbers (int or float); convert it with x.astype(float)"
        )
    if x.ndim < 2 or x.ndim > 4:
        raise DataError(
            f"{name}: x has shape {x.shape}; expected (n_examples, n_features), "
            "(n_examples, C, L) or (n_examples, C, H, W)"
            + ("; for a single feature use x.reshape(-1, 1)" if x.ndim == 1 else "")
        )
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"{name}: y has shape {y.shape}; expected one label per example, shape (n_examples,)"
            " (one-hot labels: use y.argmax(1))"
        )
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{name}: x has {x.shape[0]} examples but y has {y.shape[0]} labels; "
            "expected one label per example"
        )
    if x.shape[0] == 0:
        raise DataError(f"{name}: the data set is empty (0 examples); expected at least 2 classes")
    if math.prod(x.shape[1:]) == 0:
        raise DataError(f"{name}: x has shape {x.shape}, no features per example")
    input_shape = (1, x.shape[1]) if x.ndim == 2 else tuple(int(s) for s in x.shape[1:])
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    _check_finite(x, name)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            bad = np.flatnonzero(~np.isfinite(y))
            raise DataError(
                f"{name}: y has {bad.size} NaN/Inf label(s), first at example {bad[0]}; "
                "drop those examples or fill in their labels"
            )
        if (y != np.round(y)).any():
            example = y[y != np.round(y)][0].item()
            raise DataError(
                f"{name}: y has non-integer values such as {example!r}; expected class labels "
                "(integers or strings), not a continuous target"
            )
        y = y.astype(np.int64)
    elif y.dtype.kind not in "biuUS":
        raise DataError(
            f"{name}: y has dtype {y.dtype}; expected integer or string class labels"
        )
    classes = np.unique(y)
    if classes.size < 2:
        raise DataError(
            f"{name}: y has a single class ({classes[0].item()!r}, {y.size} examples); "
            "a classifier needs at least 2 classes"
        )
    return x, y, input_shape


_KIND_NAMES = {"U": "text", "S": "bytes", "O": "Python objects", "c": "complex", "M": "dates",
               "m": "time deltas", "V": "raw records"}


def _check_finite(x: np.ndarray, name: str) -> None:
    finite = np.isfinite(x)
    if finite.all():
        return
    n_nan = int(np.isnan(x).sum())
    n_inf = int(np.isinf(x).sum())
    rows = np.flatnonzero(~finite.all(axis=1))
    cols = np.flatnonzero(~finite.all(axis=0))
    first_row = rows[0]
    first_col = np.flatnonzero(~finite[first_row])[0]
    shown = ", ".join(str(r) for r in rows[:10]) + (", ..." if rows.size > 10 else "")
    raise DataError(
        f"{name}: x has {n_nan + n_inf} non-finite value(s) ({n_nan} NaN, {n_inf} Inf) in "
        f"{rows.size} example(s) and {cols.size} feature(s); first at example {first_row}, "
        f"feature {first_col}; examples: {shown}; drop or impute them before training"
    )


def _stratified_split(y_index: np.ndarray, class_labels: np.ndarray, seed: int,
                      test_fraction: float, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded permutation; round(test_fraction * n_c) (at least 1) go to test."""
    counts = np.bincount(y_index, minlength=class_labels.size)
    if counts.min() < 2:
        small = [f"{class_labels[i].item()!r} ({counts[i]})" for i in np.flatnonzero(counts < 2)]
        raise DataError(
            f"{name}: class{'es' if len(small) > 1 else ''} {', '.join(small[:10])} "
            f"{'have' if len(small) > 1 else 'has'} fewer than 2 examples; a stratified "
            "train/test split needs at least 2 per class; add examples or drop the class"
        )
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(class_labels.size):
        members = rng.permutation(np.flatnonzero(y_index == c))
        n_test = min(max(1, round(test_fraction * members.size)), members.size - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))
