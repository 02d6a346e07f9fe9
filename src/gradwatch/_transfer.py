"""The one device-to-host transfer of a closed step.

Every tensor a step's rows need is added to a :class:`Gather` (no op), which brings them
all to the host at once: one ``cat`` and one copy per device, so a logged step costs one
sync however many layers it has.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["Gather", "Handle", "Host"]

class Handle(int):
    """A tensor's place in a :class:`Gather` (tells gathered values from plain floats)."""


class Host:
    """A step's gathered values on the host: ``host[handle]`` is that tensor's elements (float64)."""

    def __init__(self, flat: np.ndarray, spans: list[tuple[int, int]]) -> None:
        self._flat, self._spans = flat, spans

    def __getitem__(self, handle: Handle) -> np.ndarray:
        start, stop = self._spans[handle]
        return self._flat[start:stop]

    def scalar(self, handle: Handle) -> float:
        return float(self._flat[self._spans[handle][0]])


class Gather:
    """Collects a step's device tensors and brings them to the host in one transfer per device.

    0-d tensors are stacked (one op) and everything is concatenated (one op) before
    the transfer.
    """

    def __init__(self) -> None:
        self._parts: list[Tensor] = []

    def add(self, tensor: Tensor) -> Handle:
        self._parts.append(tensor.detach())
        return Handle(len(self._parts) - 1)

    def to_host(self) -> Host:
        parts = self._parts
        if not parts:
            return Host(np.zeros(0), [])
        devices = {t.device for t in parts}
        flat = np.zeros(sum(t.numel() for t in parts))
        spans: list[tuple[int, int]] = [(0, 0)] * len(parts)
        at = 0
        for device in devices:  # one transfer per device (more than one: model parallel)
            mine = [k for k, t in enumerate(parts) if len(devices) == 1 or t.device == device]
            scalars = [k for k in mine if parts[k].ndim == 0]
            vectors = [k for k in mine if parts[k].ndim != 0]
            pieces = [torch.stack([parts[k] for k in scalars])] if scalars else []
            pieces += [parts[k].reshape(-1) for k in vectors]
            values = torch.cat(pieces).cpu().numpy() if len(pieces) > 1 else pieces[0].cpu().numpy()
            flat[at : at + values.size] = values
            for k in scalars:
                spans[k] = (at, at + 1)
                at += 1
            for k in vectors:
                size = parts[k].numel()
                spans[k] = (at, at + size)
                at += size
        return Host(flat, spans)



