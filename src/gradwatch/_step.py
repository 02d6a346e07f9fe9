"""What one step of a watched model records on its device, until the step closes.

:class:`StepRecord` holds a step's tensors (norms, sums, kept activation inputs, the
weight blocks before the optimizer step) as the hooks produce them; nothing leaves the
device until the step is written (:mod:`gradwatch._transfer`), where
:mod:`gradwatch.recorder` turns them into rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradwatch.activations import Activation

__all__ = ["StepRecord", "WeightBlocks"]


@dataclass(slots=True)
class StepRecord:
    """Everything recorded during one step, on device until the step closes."""

    step: int
    logged: bool
    # output moments: (layer ids, numel of one call, sum(out), sum(out^2) or ||out||, squared), 0-d
    # tensors for a call measured in its hook, 1-D (one entry per call) for a batch of deferred
    # calls (see gradwatch._defer.Deferral.flush); deltas per call: (layer id, numel, sum((dL/d out)^2) or
    # ||dL/d out||, squared): see gradwatch.norms.square_sum
    moments: list[tuple[list[int], int, Tensor, Tensor, bool]] = field(default_factory=list)
    deltas: list[tuple[int, int, Tensor, bool]] = field(default_factory=list)
    # activation inputs kept (stats.activation_inputs): (layer ids, activation, inputs, units,
    # is_derivative), 1-D for one call, rows (calls, n) for a batch of deferred calls
    act_kept: list[tuple[list[int], Activation, Tensor, Tensor, bool]] = field(default_factory=list)
    # tensors whose statistics wait for the end of the forward: (kind, layer id, tensor, its
    # _version in the hook, group key, activation); their bytes; layers measured in their hook
    # for the first time: ((kind, layer id), tensor, _version)
    pending: list[tuple[str, int, Tensor, int, tuple, Activation | None]] = field(default_factory=list)
    pending_bytes: int = 0
    probes: list[tuple[tuple[str, int], Tensor, int]] = field(default_factory=list)
    grad_norms: Tensor | None = None  # per parameter in grad_present
    weight_norms: Tensor | None = None  # per chosen parameter
    update_norms: Tensor | None = None  # ||after - before|| per chosen parameter's block, then ||before||
    snapshot: Any = None  # the blocks before optimizer.step(): WeightBlocks, or copies of sharded samples
    grad_present: list[int] = field(default_factory=list)  # params that had a .grad
    tracked: Tensor | None = None  # the tracked weight elements, in WeightBlocks.tracked order
    lr: float | Tensor | None = None
    values: dict[str, list[float | Tensor]] | None = None
    backward_queued: bool = False
    scale: Tensor | None = None  # the GradScaler's scale during this step's backward (logged steps)
    skipped: bool = False  # a GradScaler skipped the optimizer step (inf/NaN): recorded, not data
    applied_norm: Tensor | None = None  # total norm the optimizer applied (after unscaling, clipping)
    grad_versions: list[tuple[int, int]] | None = None  # (id, _version) of each grad at the norms


class WeightBlocks:
    """A fixed contiguous block of each watched weight, copied into one buffer on logged steps.

    Parameter ``i``'s block is :func:`gradwatch.stats.weight_block` (4096 elements at a
    fixed offset; all of a smaller weight). The blocks before ``optimizer.step()`` and
    after give the update ratio ``||after - before|| / ||before||``; the tracked weights
    of a layer (the seeds' "weights against epochs") are fixed random positions inside
    its weight's block (:func:`gradwatch.stats.tracked_positions`), read from the same
    copy. Copying every block is one ``torch._foreach_copy_``; the ratios are three more ops.
    ``tracked`` holds ``(layer id, k, positions in block k)`` (see ``Watcher._tracked_spec``).
    """

    def __init__(
        self, weights: list[Tensor], spans: list[tuple[int, int]], tracked: list[tuple[int, int, list[int]]]
    ) -> None:
        self.spans = spans
        self.device = weights[0].device
        self.dtype = weights[0].dtype
        dtypes = {w.dtype for w in weights}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        width = max(length for _, length in spans)
        self.before = torch.zeros(len(spans), width, device=self.device, dtype=dtype)
        self.after = torch.zeros_like(self.before)
        self.before_rows = [self.before[k, :n] for k, (_, n) in enumerate(spans)]
        self.after_rows = [self.after[k, :n] for k, (_, n) in enumerate(spans)]
        flat = [k * width + q for _, k, where in tracked for q in where]
        self._key: list[int] = []
        self._views: list[Tensor] = []
        self.tracked_index = torch.tensor(flat, dtype=torch.int64, device=self.device) if flat else None

    def views(self, weights: list[Tensor]) -> list[Tensor]:
        """Each weight's block, a view (no copy); kept while the weights keep their storage."""
        key = [w.data_ptr() for w in weights]
        if key != self._key:
            self._views = [w.reshape(-1)[a : a + n] for w, (a, n) in zip(weights, self.spans, strict=True)]
            self._key = key
        return self._views

    def copy_before(self, weights: list[Tensor]) -> None:
        torch._foreach_copy_(self.before_rows, self.views(weights))

    def update_norms(self, weights: list[Tensor]) -> Tensor:
        """``||after - before||`` per block, then ``||before||`` per block (float32, on device)."""
        torch._foreach_copy_(self.after_rows, self.views(weights))
        # in place (`after` is not read again), and a norm per buffer: no temporary the size of
        # both buffers, which a norm of their stack would allocate
        moved = torch.sub(self.after, self.before, out=self.after)
        return torch.cat([
            torch.linalg.vector_norm(moved, dim=1, dtype=torch.float32),
            torch.linalg.vector_norm(self.before, dim=1, dtype=torch.float32),
        ])

    def take_tracked(self) -> Tensor | None:
        """The tracked elements of the blocks copied last (before the step), in ``tracked`` order."""
        if self.tracked_index is None:
            return None
        return self.before.reshape(-1).index_select(0, self.tracked_index)
