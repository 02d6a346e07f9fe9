"""Norms and element samples of sharded tensors (FSDP2 ``fully_shard``, DTensor).

Under FSDP2 every parameter and gradient is a :class:`~torch.distributed.tensor.DTensor`:
each rank holds a slice (its *local shard*) of the full tensor, and the layout is
described by one *placement* per dimension of the device mesh:

* ``Shard(d)``: the tensor is split along its dimension ``d`` over that mesh dimension
  (FSDP2: ``Shard(0)`` on a 1-D mesh; HSDP: ``(Replicate(), Shard(0))`` on a 2-D mesh);
* ``Replicate()``: every rank along that mesh dimension holds the same values;
* ``Partial(op)``: the full tensor is ``op`` (sum, avg, ...) of the ranks' local tensors.

The full tensor's L2 norm follows from the local shards without gathering them: the
shards partition the elements, so ``||W||^2 = sum over shards s of ||W_s||^2``, summed
over the mesh dimensions that shard (never over the replicating ones, which hold copies,
so nothing is counted twice). :func:`global_norms` computes the local squared norms of a
list of tensors in one ``torch._foreach_norm``, then issues **one** ``all_reduce(SUM)``
per process group for the whole list, and takes the square root: every rank gets the
same vector. A ``Partial`` tensor is first reduced to ``Replicate`` (the norm of a sum is
not the sum of the norms), one extra collective for each such tensor.

:func:`global_take` reads fixed elements of the full tensors (flat, row-major indices,
as ``full.reshape(-1).take(index)``): each rank fills in the elements its shard holds
and zeros elsewhere, and one ``all_reduce(SUM)`` per process group completes the vector
(adding zeros is exact, so the values are bit-identical to the unsharded tensor's). This
is what the watcher needs for its update ratio ``||W_after - W_before|| / ||W_before||``
on a fixed sample of elements and for its tracked weights: the sample is the same
elements of the full weight as without sharding, so the numbers equal the unsharded
model's.

Every rank must call these functions with the same list of tensors (same order, same
layouts), like any collective. Plain tensors in the list are taken as they are on each
rank (not reduced).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["is_sharded", "local_tensor", "global_norms", "global_take"]


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: Tensor) -> bool:
    """True if ``tensor`` is a DTensor: its values are laid out over a device mesh.

    This includes replicated and partial DTensors, not only sharded ones: on any of
    them, ops that mix in plain tensors (``flat.take(index)``, ``torch.cat``) raise, and
    a norm is only the local shard's until it is reduced; use :func:`global_norms`
    and :func:`global_take` instead.
    """
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """The shard of a DTensor held by this rank (``tensor.to_local()``); a plain tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def _is_partition(placement: object) -> bool:
    """Shard-like placements: the ranks along that mesh dimension hold disjoint elements."""
    if placement.is_shard():  # type: ignore[attr-defined]
        return True
    from torch.distributed.tensor.placement_types import _StridedShard

    return isinstance(placement, _StridedShard)


def _without_partial(tensor: Tensor) -> Tensor:
    """A DTensor with every ``Partial`` placement reduced to ``Replicate`` (one collective)."""
    if not any(p.is_partial() for p in tensor.placements):
        return tensor
    from torch.distributed.tensor import Replicate

    placements = [Replicate() if p.is_partial() else p for p in tensor.placements]
    return tensor.redistribute(tensor.device_mesh, placements)


def _shard_groups(tensor: Tensor) -> list[tuple[str, torch.distributed.ProcessGroup]]:
    """(group name, group) of each mesh dimension over which ``tensor``'s elements are split.

    Groups of size 1 are left out (nothing to add). Raises for a placement that is
    neither a shard, a replica nor partial, since the sum rule would not be known to hold.
    """
    mesh = tensor.device_mesh
    groups = []
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            continue
        if not _is_partition(placement):
            raise ValueError(
                f"gradwatch.sharding: a DTensor of shape {tuple(tensor.shape)} has placement "
                f"{placement!r} on mesh dimension {mesh_dim}; only Shard, _StridedShard, Replicate "
                f"and Partial are understood. Redistribute it (tensor.redistribute(mesh, "
                f"[Replicate()])) before measuring it, or leave it out of the watched modules"
            )
        if mesh.size(mesh_dim) == 1:
            continue
        group = mesh.get_group(mesh_dim)
        groups.append((group.group_name, group))
    return groups


def _reduce_by_group(values: Tensor, segments: list[tuple[int, int]], groups: list[list]) -> None:
    """In place: sum ``values[start:stop]`` of each tensor over each of its shard groups.

    One ``all_reduce(SUM)`` per distinct process group, on the concatenation of the
    segments of every tensor split over that group; groups in order of first appearance
    in the list, which is the same on every rank.
    """
    members: dict[str, tuple[torch.distributed.ProcessGroup, list[int]]] = {}
    for k, tensor_groups in enumerate(groups):
        for name, group in tensor_groups:
            members.setdefault(name, (group, []))[1].append(k)
    for group, ks in members.values():
        if len(ks) == len(segments):
            torch.distributed.all_reduce(values, group=group)
            continue
        index = torch.cat([torch.arange(*segments[k], device=values.device) for k in ks])
        part = values.index_select(0, index)
        torch.distributed.all_reduce(part, group=group)
        values.index_copy_(0, index, part)


def _home_device(tensors: Sequence[Tensor]) -> torch.device:
    """Where collectives run: the first DTensor's local device, else the first tensor's."""
    for t in tensors:
        if is_sharded(t):
            return t.to_local().device
    return tensors[0].device


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    # float64 squared sums: a float32 norm of 1e20 would overflow when squared
    return torch.float32 if device.type == "mps" else torch.float64


def global_norms(tensors: Sequence[Tensor]) -> Tensor:
    """The L2 norm of each FULL tensor, computed from local shards; the same on every rank.

    For a DTensor ``W`` whose shards ``W_s`` partition its elements,
    ``||W||_2 = sqrt(sum_s ||W_s||_2^2)``: the local squared norm is summed by
    ``all_reduce(SUM)`` over each mesh dimension with a ``Shard`` placement, never over
    ``Replicate`` ones (copies are counted once). ``Partial`` placements are reduced to
    ``Replicate`` first (one collective each). Plain tensors give their own norm (taken
    as identical on every rank, e.g. a DDP gradient after its all-reduce); a sparse
    gradient the norm of its coalesced values.

    Local norms come from one ``torch._foreach_norm``, the squares are summed in
    float64, and all tensors split over one process group share one collective.
    Every rank must call it with the same list (it is a collective).

    Args:
        tensors: plain tensors and DTensors, e.g. the ``.grad`` of FSDP2 parameters.

    Returns:
        A float32 vector of ``len(tensors)`` norms, on the first DTensor's local device.

    Raises:
        ValueError: a DTensor placement that is none of Shard, Replicate, Partial.
    """
    tensors = list(tensors)
    if not tensors:
        return torch.empty(0)
    device = _home_device(tensors)
    with torch.no_grad():
        shards, groups = [], []
        for t in tensors:
            if is_sharded(t):
                t = _without_partial(t)
                groups.append(_shard_groups(t))
                t = t.to_local()
            else:
                groups.append([])
            shards.append(t.coalesce()._values() if t.is_sparse else t)
        local = torch._foreach_norm(shards)
        dtype = _accumulator_dtype(device)
        squared = torch.stack([n.to(device=device, dtype=dtype) for n in local]).square()
        if any(groups):
            _reduce_by_group(squared, [(k, k + 1) for k in range(len(tensors))], groups)
        return squared.sqrt().float()


def _local_box(tensor: Tensor) -> tuple[Tensor, list[int], list[int]]:
    """The local tensor of this rank, and its global offset and shape per tensor dimension.

    ``Shard(d)`` on a mesh dimension of size ``n`` splits the current extent ``L`` of
    dimension ``d`` as ``torch.chunk`` does: chunks of ``ceil(L / n)``, the last ones
    shorter or empty; mesh dimensions apply left to right. ``tensor`` comes from
    :func:`_box_layout`.
    """
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(
            "gradwatch.sharding: this rank is not part of the DTensor's device mesh, so it holds "
            "no shard of it; call global_norms/global_take only on the ranks of its mesh"
        )
    shape, offset = list(tensor.shape), [0] * tensor.ndim
    for mesh_dim, placement in enumerate(tensor.placements):
        if not placement.is_shard():
            continue
        dim = placement.dim % tensor.ndim
        chunk = -(-shape[dim] // mesh.size(mesh_dim))
        start = chunk * coordinate[mesh_dim]
        offset[dim] += min(start, shape[dim])
        shape[dim] = max(0, min(chunk, shape[dim] - start))
    local = tensor.to_local()
    if list(local.shape) != shape:
        raise ValueError(
            f"gradwatch.sharding: the local shard has shape {tuple(local.shape)}, but placements "
            f"{tensor.placements} of a {tuple(tensor.shape)} tensor give {tuple(shape)}; this "
            f"layout (a custom shard order?) is not supported. Use tensor.full_tensor() instead"
        )
    return local, offset, shape


def _box_layout(tensor: Tensor) -> Tensor:
    """A DTensor whose local shard is a contiguous box of the full tensor.

    ``Partial`` and ``_StridedShard`` placements (whose shard is not a box) become
    ``Replicate``: one collective for each such tensor.
    """
    from torch.distributed.tensor import Replicate

    tensor = _without_partial(tensor)
    if all(p.is_shard() or p.is_replicate() for p in tensor.placements):
        return tensor
    placements = [p if p.is_shard() or p.is_replicate() else Replicate() for p in tensor.placements]
    return tensor.redistribute(tensor.device_mesh, placements)


def _take_local(tensor: Tensor, index: Tensor, dtype: torch.dtype) -> Tensor:
    """Elements ``index`` (flat, of the full tensor) held by this rank; zeros elsewhere."""
    local, offset, shape = _local_box(tensor)
    index = index.to(local.device)
    if tensor.ndim == 0:
        return local.reshape(1).to(dtype).expand(index.numel()).clone()
    values = torch.zeros(index.numel(), dtype=dtype, device=local.device)
    coords = torch.unravel_index(index, tuple(tensor.shape))
    inside = torch.ones_like(index, dtype=torch.bool)
    for dim, c in enumerate(coords):
        inside &= (c >= offset[dim]) & (c < offset[dim] + shape[dim])
    local_coords = tuple(c[inside] - offset[dim] for dim, c in enumerate(coords))
    values[inside] = local[local_coords].to(dtype)
    return values


def global_take(tensors: Sequence[Tensor], indices: Sequence[Tensor | None]) -> list[Tensor]:
    """Elements of the FULL tensors at flat indices, the same on every rank.

    ``global_take([w], [index])[0]`` equals ``w.full_tensor().reshape(-1).take(index)``
    without gathering ``w``: each rank writes the elements its shard holds and zeros
    elsewhere, and the vectors are summed by ``all_reduce(SUM)`` over the sharding mesh
    dimensions (an element lies in exactly one shard, so the sum is exact). One
    collective per process group for the whole list. ``None`` takes every element (for
    small tensors). Plain tensors are read locally.

    Use it for the update ratio ``||W_after - W_before|| / ||W_before||`` on a fixed
    sample of a sharded weight: the same indices as for the unsharded weight give the
    same numbers.

    Args:
        tensors: plain tensors and DTensors (weights).
        indices: one 1-D integer tensor of flat row-major indices into each full
            tensor (``< tensor.numel()``), or ``None`` for all of its elements.

    Returns:
        One 1-D tensor per input, float32 (float64 if any input is float64), on the
        first DTensor's local device.

    Raises:
        ValueError: ``indices`` has a different length than ``tensors``, or a layout
            that is not understood (see :func:`global_norms`).
    """
    tensors = list(tensors)
    indices = list(indices)
    if len(indices) != len(tensors):
        raise ValueError(
            f"global_take got {len(tensors)} tensors and {len(indices)} indices; give one index "
            f"tensor (or None for all elements) per tensor"
        )
    if not tensors:
        return []
    device = _home_device(tensors)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    with torch.no_grad():
        parts, groups = [], []
        for t, index in zip(tensors, indices, strict=True):
            if index is None:
                index = torch.arange(t.numel(), device=device)
            if is_sharded(t):
                t = _box_layout(t)
                groups.append(_shard_groups(t))
                parts.append(_take_local(t, index, dtype).to(device))
            else:
                groups.append([])
                parts.append(t.reshape(-1).take(index.to(t.device)).to(device=device, dtype=dtype))
        sizes = [p.numel() for p in parts]
        values = torch.cat(parts)
        if any(groups):
            ends = list(itertools.accumulate(sizes))
            _reduce_by_group(values, [(end - n, end) for end, n in zip(ends, sizes, strict=True)], groups)
        return list(values.split(sizes))
