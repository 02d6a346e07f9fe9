"""The end-of-forward deferral: small layer outputs and activation inputs measured in batches.

In a training step on the CPU a small op costs several times what it costs alone
(dispatch, allocation, the layer's data leaving the cache; ``bench/hook_ops.py`` measures
it), so one stack and a few row reductions after the forward cost less than the sums and
norms of each output, or the samples and per-unit extremes of each activation input, taken
one layer at a time. The
watcher's hooks hand each tensor to :meth:`Deferral.keep`; :meth:`Deferral.flush` measures
what waited, stacked by shape, into the step's :class:`~gradwatch._step.StepRecord`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from gradwatch._step import StepRecord
from gradwatch.activations import Activation
from gradwatch.norms import ACCUMULATE, square_sum
from gradwatch.stats import activation_inputs, sample_index, unit_dim

__all__ = ["Deferral"]

# Deferred outputs and activation inputs are measured once they hold this many bytes, at the
# latest at the end of the forward: the stack of one shape's tensors is a copy of this size.
DEFER_BYTES = 64 << 20
# Only tensors of at most this many elements wait: for those a small op's cost is mostly its
# dispatch; bigger ones are cheaper measured in the hook, while still in the cache.
DEFER_NUMEL = 65536


class Deferral:
    """Where each layer's output moments and activation inputs are measured: in the hook, or later.

    Attributes:
        deferrable: ``(kind, layer id) -> bool``, kind ``"moments"`` or ``"activation"``:
            True once a layer's tensor was seen unchanged after its hook (it waits for
            the end of the forward from then on), False once it was changed in place
            after it (measured in the hook from then on). Missing: not seen yet.
    """

    def __init__(self, sample_size: int) -> None:
        self.sample_size = sample_size  # activation inputs kept per layer (0: all)
        self.deferrable: dict[tuple[str, int], bool] = {}
        self.samples: dict[tuple, Tensor | None] = {}  # the fixed samples of activation inputs
        self._buffers: dict[tuple, Tensor] = {}  # see stack

    def release(self) -> None:
        """Free the stack buffers (at detach)."""
        self._buffers.clear()

    def keep(
        self, record: StepRecord, kind: str, lid: int, x: Tensor, group: tuple, activation: Activation | None
    ) -> None:
        """Measure ``x`` (a layer's output, or an activation's input) now, or at the forward's end.

        A layer is measured in its hook the first time (a probe, see :meth:`flush`),
        and deferred from then on unless its tensor was changed in place after the hook.
        """
        deferrable = self.deferrable.get((kind, lid))
        if deferrable and x.numel() <= DEFER_NUMEL and type(x) is Tensor:
            record.pending.append((kind, lid, x, x._version, group, activation))
            record.pending_bytes += x.numel() * x.element_size()
            if record.pending_bytes > DEFER_BYTES:
                self.flush(record)
            return
        if deferrable is None:
            record.probes.append(((kind, lid), x, x._version))
        self.measure(record, kind, lid, x, group, activation)

    def measure(
        self, record: StepRecord, kind: str, lid: int, x: Tensor, group: tuple, activation: Activation | None
    ) -> None:
        """What the hook takes of one call: output moments, or an activation's kept inputs."""
        if activation is None:
            # sum(x) and sum(x^2) (or ||x||, see square_sum): mean and std pool exactly over calls
            # (gradwatch.stats.moments_from_sums); float32 at least (no dtype argument when it is:
            # that would cost a conversion op each)
            total = x.sum() if x.dtype in ACCUMULATE else x.sum(dtype=torch.float32)
            record.moments.append(([lid], x.numel(), total, *square_sum(x)))
        else:
            sample = self.activation_sample(lid, x.numel(), x.device)
            kept = activation_inputs(x, activation, channels_first=group[1], sample=sample)
            record.act_kept.append(([lid], activation, *kept))

    def activation_sample(self, lid: int, numel: int, device: torch.device) -> Tensor | None:
        """The fixed sample of flat indices at which layer ``lid``'s activation inputs are kept."""
        key = ("activation", lid, numel, device)
        sample = self.samples.get(key, False)
        if sample is False:
            sample = self.samples[key] = sample_index(numel, self.sample_size, device, seed=lid)
        return sample

    def flush(self, record: StepRecord) -> None:
        """Measure the deferred tensors, stacked by shape: a few ops for all the layers of a shape.

        One stack and a few row reductions cost less than the same statistics taken layer by
        layer in the hooks (see the module docstring). The tensors are the model's own,
        referenced until then (autograd keeps most of them anyway; at most ``DEFER_BYTES``
        wait). A tensor changed in place after its hook (its ``_version`` moved:
        ``nn.ReLU(inplace=True)`` after a BatchNorm, ``out += identity``) no longer holds what
        the layer produced: a layer is measured in its hook the first time and deferred only if
        that did not happen; a deferred call that finds it changed has its values dropped, and
        its layer is measured in the hook from then on.
        """
        for key, x, version in record.probes:
            self.deferrable[key] = self.deferrable.get(key, True) and x._version == version
        groups: dict[tuple, list[tuple[int, Tensor, Activation | None]]] = defaultdict(list)
        for kind, lid, x, version, group, activation in record.pending:
            if x._version != version:
                self.deferrable[(kind, lid)] = False
                continue
            groups[(kind, x.shape, x.dtype, x.device, group)].append((lid, x, activation))
        record.probes, record.pending, record.pending_bytes = [], [], 0
        stacks: dict[tuple, Tensor] = {}  # one stack of the tensors both kinds measure
        with torch.no_grad():
            for moments_first in (True, False):  # an activation group overwrites its stack
                for (kind, *_, group), members in groups.items():
                    if (kind == "moments") != moments_first:
                        continue
                    if len(members) == 1 or (kind == "activation" and members[0][1].ndim < 2):
                        for lid, x, activation in members:  # nothing to batch, or 1-D: as in the hook
                            self.measure(record, kind, lid, x, group, activation)
                        continue
                    ids = tuple((x.data_ptr(), x.stride()) for _, x, _ in members)  # detach: new objects
                    rows = stacks.pop(ids, None)
                    if rows is None:
                        rows = self.stack([x for _, x, _ in members])
                        # a stack kept for later that shared the buffer is overwritten now
                        stacks = {k: v for k, v in stacks.items() if v.data_ptr() != rows.data_ptr()}
                    lids = [lid for lid, _, _ in members]
                    if moments_first:
                        stacks[ids] = rows
                        self.moments_rows(record, lids, rows.view(len(lids), -1))
                    else:
                        self.activation_rows(record, lids, rows, members[0][2], group[1])

    def stack(self, tensors: list[Tensor]) -> Tensor:
        """``torch.stack(tensors)``; on the CPU into a buffer kept from step to step.

        A fresh buffer of a few MB is new memory every step, and its page faults cost more
        than the stack itself; elsewhere the caching allocator reuses its blocks anyway. The buffer is
        overwritten by the next stack of that shape: nothing may keep a view of it.
        """
        first = tensors[0]
        if not first.is_cpu:
            return torch.stack(tensors)
        key = (len(tensors), *first.shape, first.dtype)
        buffer = self._buffers.get(key)
        if buffer is None:
            if len(self._buffers) >= 16:  # shapes that change from step to step
                self._buffers.clear()
            buffer = self._buffers[key] = torch.empty((len(tensors), *first.shape), dtype=first.dtype)
        return torch.stack(tensors, out=buffer)

    @staticmethod
    def moments_rows(record: StepRecord, lids: list[int], flat: Tensor) -> None:
        """Output moments of stacked calls ``(calls, n)``: what the hook takes of one, per row."""
        # row norms: one kernel over the stack, where dots, vecdot or bmm are one op per row or
        # a batched product
        if flat.dtype in ACCUMULATE:
            totals, norms = flat.sum(1), torch.linalg.vector_norm(flat, dim=1)
        else:
            totals = flat.sum(1, dtype=torch.float32)
            norms = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32)
        record.moments.append((lids, flat.shape[1], totals, norms, False))

    def activation_rows(
        self, record: StepRecord, lids: list[int], rows: Tensor, activation: Activation, channels_first: bool
    ) -> None:
        """:func:`gradwatch.stats.activation_inputs` of stacked calls ``(calls, *shape)``, per row
        (each call at least 2-D: batch first).
        """
        flat = rows.view(len(lids), -1)
        key = ("activation-rows", tuple(lids), flat.shape[1], flat.device)
        index = self.samples.get(key, False)
        if index is False:
            samples = [self.activation_sample(lid, flat.shape[1], flat.device) for lid in lids]
            index = self.samples[key] = None if samples[0] is None else torch.stack(samples)
        inputs = flat.clone() if index is None else torch.gather(flat, 1, index)
        dim = unit_dim(rows.ndim - 1, channels_first) + 1
        reduce = [d for d in range(1, rows.ndim) if d != dim]
        if activation.peak == "max":
            units, is_d = rows.amax(dim=reduce), False
        elif activation.peak == "min_abs":  # rows is the flush's own stack: |x| in place
            units, is_d = rows.abs_().amin(dim=reduce), False
        else:
            units, is_d = activation.derivative(rows).abs().amax(dim=reduce), True
        record.act_kept.append((lids, activation, inputs, units, is_d))
