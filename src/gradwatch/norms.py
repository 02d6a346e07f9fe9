"""Norms of many tensors at once, on their device, without a sync.

What the watcher takes of gradients, weights and deltas: a squared norm per tensor
(:func:`square_sum`), the norm of each of a list of tensors (:class:`NormPlans`), and
the flat elements of (possibly sharded) tensors (:func:`take`). Every result stays on
the device until the step's one transfer (:mod:`gradwatch._transfer`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["ACCUMULATE", "NormPlans", "dot_ok", "is_dtensor", "square_sum", "squares", "stack_norms", "take"]

ACCUMULATE = (torch.float32, torch.float64)  # dtypes whose sums and norms are taken as they are
# On the CPU the norms of tensors of at least this many elements are taken by torch.dot, the
# others together by one torch._foreach_norm (see NormPlans).
DOT_NUMEL = 65536


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it)."""
    return type(t).__name__ == "DTensor"


def dot_ok(x: Tensor) -> bool:
    """Whether ``torch.dot`` takes ``x``'s squared norm (see :func:`square_sum`)."""
    return x.is_cpu and x.dtype in ACCUMULATE and x.is_contiguous()


def square_sum(x: Tensor) -> tuple[Tensor, bool]:
    """``(sum(x**2), True)``, or ``(||x||, False)`` where the host squaring it is cheaper.

    On the CPU a float32/float64 contiguous tensor's ``torch.dot(x, x)`` reads it once on
    every thread (MKL): about twice as fast as ``vector_norm`` there on large tensors, and
    closer to the float64 value. Elsewhere the norm kernel (one launch; squaring it is
    left to the host). Non-finite values and overflow come out alike (inf, NaN).
    """
    if dot_ok(x):
        flat = x.view(-1)
        return torch.dot(flat, flat), True
    if x.dtype in ACCUMULATE:
        return torch.linalg.vector_norm(x), False
    return torch.linalg.vector_norm(x, dtype=torch.float32), False


def squares(values: np.ndarray, squared: list[bool]) -> np.ndarray:
    """Sums of squares from :func:`square_sum`'s values: squared already, or norms to square."""
    return values if all(squared) else np.where(squared, values, values * values)


def stack_norms(norms: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Stack 0-d norms into one float32 vector, on the first one's device."""
    try:
        return torch.stack(list(norms)).float()
    except RuntimeError:  # parameters on several devices
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).float()


class NormPlans:
    """``plans(tensors)``: the L2 norm of each tensor, one float32 vector on device.

    Of the full tensor when sharded (:func:`gradwatch.sharding.global_norms`). On the CPU
    a ``torch.dot`` per large tensor (see :func:`square_sum`) and one
    ``torch._foreach_norm`` for all the small ones beat either alone; which tensors go
    which way is planned once per list of sizes and kept.
    """

    def __init__(self) -> None:
        self._plans: dict[tuple[int, ...], tuple[list[int], list[int], Tensor | None]] = {}

    def __call__(self, tensors: list[Tensor]) -> Tensor:  # noqa: D102 (the class says it)
        if any(is_dtensor(t) for t in tensors):
            from gradwatch.sharding import global_norms

            return global_norms(tensors).float()
        dtype = tensors[0].dtype
        if not all(t.dtype is dtype and dot_ok(t) for t in tensors):
            return stack_norms(torch._foreach_norm(tensors))
        sizes = tuple(t.numel() for t in tensors)
        plan = self._plans.get(sizes)
        if plan is None:
            if len(self._plans) > 64:
                self._plans.clear()
            large = [k for k, n in enumerate(sizes) if n >= DOT_NUMEL]
            small = [k for k, n in enumerate(sizes) if n < DOT_NUMEL]
            order = torch.argsort(torch.tensor(large + small)) if large and small else None
            plan = self._plans[sizes] = (large, small, order)
        large, small, order = plan
        parts = []
        if large:
            parts.append(torch.stack([torch.dot(v, v) for v in (tensors[k].view(-1) for k in large)]).sqrt_())
        if small:
            parts.append(torch.stack(torch._foreach_norm([tensors[k] for k in small])))
        norms = parts[0] if order is None else torch.cat(parts).index_select(0, order)
        return norms.float()


def take(tensors: list[Tensor], indices: list[Tensor | None]) -> list[Tensor]:
    """Elements at flat indices of each (full) tensor, copied; None: all of them."""
    if any(is_dtensor(t) for t in tensors):
        from gradwatch.sharding import global_take

        return global_take(tensors, indices)
    return [
        t.reshape(-1).clone() if i is None else t.reshape(-1).index_select(0, i)
        for t, i in zip(tensors, indices, strict=True)
    ]
