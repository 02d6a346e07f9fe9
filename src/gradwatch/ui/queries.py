"""What the live page reads: the store's read-only queries, downsampled and encoded.

The SQL is :class:`gradwatch.store_reader.StoreReader`'s; here each function takes a
reader and shapes what it returns for the page, so it is testable without a server.
Long series are cut into buckets of ``width`` steps, a power of two, aligned to multiples of the width (bucket
``b`` holds steps ``b * width`` to ``b * width + width - 1``). Each bucket keeps,
per layer and metric, the minimum, the maximum and the last value (the value at
the bucket's last logged step). These three are exact under merging: a bucket of
width ``2w`` is the merge of its two halves of width ``w``, and merging a bucket
with new rows of the same bucket gives the bucket over all rows. So the page can
take a downsampled history, add the buckets of newly written steps as they stream
in, and halve its resolution when the series grows, without asking again.

Arrays travel as base64 little-endian ``float64`` (NaN for missing; steps too): a
third of the bytes of JSON numbers and no parsing, and no precision lost for the
1e-30 gradients of a deep sigmoid stack.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from gradwatch.store_reader import StoreReader, check_metrics

__all__ = [
    "DEFAULT_POINTS",
    "PAGE_METRICS",
    "bucket_width",
    "layer_buckets",
    "merge_tables",
    "encode_table",
    "layer_samples",
    "scalar_buckets",
]

DEFAULT_POINTS = 1000
# What the page draws: the back-propagated error and weight gradients of parameterised
# layers, the saturated and dead fractions of activations.
PAGE_METRICS = ("delta_rms", "grad_norm", "saturated_frac", "dead_frac")


def bucket_width(last_step: int | None, points: int = DEFAULT_POINTS) -> int:
    """The smallest power of two ``w`` such that steps ``0..last_step`` fill at most
    ``points`` buckets of ``w`` steps.
    """
    if last_step is None or last_step < 0:
        return 1
    need = (int(last_step) + 1) / max(1, int(points))
    return 1 if need <= 1 else 1 << math.ceil(math.log2(need))


def _f64(values: Iterable[float | None] | np.ndarray) -> str:
    if not isinstance(values, np.ndarray):
        values = [math.nan if v is None else v for v in values]
    arr = np.ascontiguousarray(values, dtype="<f8")
    return base64.b64encode(arr.tobytes()).decode("ascii")


def merge_tables(a: np.ndarray, b: np.ndarray, width: int) -> np.ndarray:
    """Two bucket tables of one run as one: per layer and bucket of ``width`` steps, the
    minimum of the minima, the maximum of the maxima, the last value of the later step.
    """
    both = np.vstack([a, b])
    if not len(both):
        return both
    k = (both.shape[1] - 2) // 3
    both = both[np.lexsort((both[:, 1], both[:, 1] // width, both[:, 0]))]
    bucket = both[:, 1] // width
    first = np.ones(len(both), dtype=bool)
    first[1:] = (both[1:, 0] != both[:-1, 0]) | (bucket[1:] != bucket[:-1])
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], len(both)) - 1
    low = np.fmin.reduceat(both[:, 2 : 2 + k], starts, axis=0)  # fmin/fmax skip NaN
    high = np.fmax.reduceat(both[:, 2 + k : 2 + 2 * k], starts, axis=0)
    return np.hstack([both[ends, :2], low, high, both[ends, 2 + 2 * k :]])


def encode_table(table: np.ndarray, metrics: Sequence[str], *, envelope: bool) -> list[dict[str, Any]]:
    """A bucket table as the page reads it: ``[{"id", "steps", <metric>: {"last", "min",
    "max"}}]`` in base64 float64; a metric a layer never has is left out.
    """
    k = len(metrics)
    entries: list[dict[str, Any]] = []
    if not len(table):
        return entries
    layer_ids, starts = np.unique(table[:, 0], return_index=True)
    for lid, a, b in zip(layer_ids, starts, [*starts[1:], len(table)], strict=True):
        entry: dict[str, Any] = {"id": int(lid), "steps": _f64(table[a:b, 1])}
        for i, metric in enumerate(metrics):
            low, high, last = table[a:b, 2 + i], table[a:b, 2 + k + i], table[a:b, 2 + 2 * k + i]
            if np.isnan(last).all() and np.isnan(low).all():
                continue  # a metric this layer does not have (weights of an activation, ...)
            series = {"last": _f64(last)}
            if envelope:
                series["min"], series["max"] = _f64(low), _f64(high)
            entry[metric] = series
        entries.append(entry)
    return entries


def layer_buckets(
    reader: StoreReader,
    run_id: int,
    metrics: Sequence[str] = PAGE_METRICS,
    *,
    width: int,
    after: int = -1,
) -> dict[str, Any]:
    """Per-layer metrics of steps after ``after``, in buckets of ``width`` steps.

    Returns ``{"width", "upto", "layers": [{"id", "steps", <metric>: {"last", "min",
    "max"}}]}``: ``steps`` is each bucket's last logged step, the metric arrays
    (float64, base64, NaN where missing) its last value, minimum and maximum;
    ``min``/``max`` are left out when ``width`` is 1 (they equal ``last``), and a
    metric is left out of a layer that never has it. ``upto`` is the last step
    included (``after`` when there is nothing new).
    """
    chosen = check_metrics(metrics)
    table, upto = reader.bucket_table(run_id, chosen, width=width, after=after)
    return {"width": width, "upto": upto, "layers": encode_table(table, chosen, envelope=width > 1)}


def layer_samples(
    reader: StoreReader, run_id: int, metrics: Sequence[str] = PAGE_METRICS, *, width: int
) -> dict[str, Any]:
    """The rows at each bucket's last logged step only: what :func:`layer_buckets` gives
    less the minimum and maximum, at one seek per bucket instead of a read of every row.

    A first picture of a long run; the full buckets merge into it exactly later (their
    minimum is at most, their maximum at least the sampled value, and "last" is the same).
    """
    chosen = check_metrics(metrics)
    upto, steps = reader.bucket_ends(run_id, width)
    out: dict[str, Any] = {"width": width, "upto": -1 if upto is None else upto, "layers": []}
    if upto is None:
        return out
    table = reader.layer_rows_at(run_id, chosen, steps)
    table = table[np.lexsort((table[:, 1], table[:, 0]))]
    values = table[:, 2:]
    out["layers"] = encode_table(np.hstack([table[:, :2], values, values, values]), chosen, envelope=False)
    return out


def scalar_buckets(
    reader: StoreReader,
    run_id: int,
    names: Sequence[str],
    *,
    width: int,
    after: int = -1,
) -> dict[str, Any]:
    """The named scalars of steps after ``after``, in buckets of ``width`` steps.

    Returns ``{"width", "upto", "scalars": [{"name", "steps", "last", "min", "max"}]}``
    in the encoding of :func:`layer_buckets`.
    """
    out: dict[str, Any] = {"width": width, "upto": after, "scalars": []}
    for name in names:
        rows = reader.scalar_bucket_rows(run_id, name, width=width, after=after)
        if not rows:
            continue
        _, steps, lo, hi, last = zip(*rows, strict=True)
        entry: dict[str, Any] = {"name": name, "steps": _f64(steps), "last": _f64(last)}
        if width > 1:
            entry["min"], entry["max"] = _f64(lo), _f64(hi)
        out["scalars"].append(entry)
        out["upto"] = max(out["upto"], steps[-1])
    return out
