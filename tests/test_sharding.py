"""Sharded training: FSDP2 ``fully_shard`` on CPU with gloo under a real ``torchrun --nproc_per_node 2``.

The test launches this very file as the torchrun script; ``_worker`` is what each rank runs.
Each rank trains a ``fully_shard`` MLP (every Linear and the root; the 16 -> 3 layer is
sharded unevenly, 2 rows and 1) on its half of each batch, beside an unsharded reference
model with the same initial weights trained on the whole batch (same mean loss: FSDP2
averages the ranks' gradients). ``gradwatch.sharding`` must give the reference's norms
and elements from the local shards alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

STEPS = 4
BATCH = 16  # 8 rows per rank
SIZES = [(8, 16), (16, 16), (16, 3)]  # (in, out) of the Linear layers; 3 rows shard unevenly


def _mlp():
    from torch import nn

    layers = []
    for k, (n_in, n_out) in enumerate(SIZES):
        layers.append(nn.Linear(n_in, n_out))
        if k < len(SIZES) - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, SIZES[0][0], generator=g), torch.randint(0, SIZES[-1][1], (BATCH,), generator=g)


def _sharded_copy(model):
    import copy

    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(model)
    for module in sharded:
        if isinstance(module, torch.nn.Linear):
            fully_shard(module)
    fully_shard(sharded)
    return sharded


class _CountingAllReduce:
    """Calls the real ``torch.distributed.all_reduce`` and counts the calls."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.real, self.calls = dist.all_reduce, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


def _norms_phase(rank: int) -> dict:
    """(a) global_norms / global_take of the sharded model against the unsharded reference."""
    import torch.distributed as dist
    from torch import nn

    from gradwatch.sharding import global_norms, global_take, is_sharded

    torch.manual_seed(0)
    reference = _mlp()
    sharded = _sharded_copy(reference)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    opt = torch.optim.Adam(sharded.parameters(), lr=0.01)
    mine = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    counter = _CountingAllReduce()
    out = {
        "ref_grad": [],
        "grad": [],
        "ref_weight": [],
        "weight": [],
        "take_exact": [],
        "take_diff": [],
        "collectives": [],
        "all_dtensor": True,
        "local_rows": [],
    }
    for step in range(STEPS):
        x, y = _batch(step)
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.zero_grad()
        nn.functional.cross_entropy(sharded(x[mine]), y[mine]).backward()
        params = list(sharded.parameters())
        out["all_dtensor"] &= all(is_sharded(p) and is_sharded(p.grad) for p in params)
        out["local_rows"] = [p.to_local().shape[0] for p in params]
        dist.all_reduce = counter
        try:
            counter.calls = 0
            grads = global_norms([p.grad for p in params])
            weights = global_norms([p.detach() for p in params])
            index = [
                torch.randperm(p.numel(), generator=torch.Generator().manual_seed(k))[:7]
                for k, p in enumerate(params)
            ]
            index[1] = None  # every element
            taken = global_take([p.detach() for p in params], index)
            out["collectives"].append(counter.calls)
        finally:
            dist.all_reduce = counter.real
        out["grad"].append(grads.tolist())
        out["weight"].append(weights.tolist())
        out["ref_grad"].append([float(p.grad.norm()) for p in reference.parameters()])
        out["ref_weight"].append([float(p.detach().norm()) for p in reference.parameters()])
        fulls = [p.full_tensor().reshape(-1) for p in params]
        out["take_exact"].append(
            all(torch.equal(t, f if i is None else f[i]) for t, f, i in zip(taken, fulls, index, strict=True))
        )
        out["take_diff"].append(
            max(
                float((t - (r.reshape(-1) if i is None else r.reshape(-1)[i])).abs().max())
                for t, r, i in zip(taken, reference.parameters(), index, strict=True)
            )
        )
        ref_opt.step()
        opt.step()
    return out


def _layouts_phase(rank: int) -> dict:
    """Placements FSDP2 alone does not produce: Replicate, Partial, 2-D meshes, _StridedShard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from gradwatch.sharding import global_norms, global_take

    mesh = init_device_mesh("cpu", (2,))
    mesh_21 = init_device_mesh("cpu", (2, 1), mesh_dim_names=("a", "b"))
    mesh_12 = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicas", "shards"))
    g = torch.Generator().manual_seed(5)
    full = {
        name: torch.randn(*shape, generator=g)
        for name, shape in [
            ("shard0_uneven", (3, 5)),
            ("replicate", (7,)),
            ("shard_2d", (4, 6)),
            ("hsdp", (5, 3)),
            ("partial", (2, 3)),
            ("strided", (8, 3)),
            ("plain", (4,)),
        ]
    }
    tensors = {
        "shard0_uneven": distribute_tensor(full["shard0_uneven"], mesh, [Shard(0)]),
        "replicate": distribute_tensor(full["replicate"], mesh, [Replicate()]),
        "shard_2d": distribute_tensor(full["shard_2d"], mesh_21, [Shard(1), Shard(0)]),
        "hsdp": distribute_tensor(full["hsdp"], mesh_12, [Replicate(), Shard(1)]),
        # the full tensor is the sum of the ranks' local tensors: (1 + 2) * partial
        "partial": DTensor.from_local(full["partial"] * (rank + 1), mesh, [Partial()]),
        "strided": distribute_tensor(full["strided"], mesh, [_StridedShard(0, split_factor=2)]),
        "plain": full["plain"],
    }
    full["partial"] = full["partial"] * 3
    names = list(tensors)
    norms = global_norms([tensors[n] for n in names])
    index = [torch.tensor([0, full[n].numel() - 1, full[n].numel() // 2]) for n in names]
    taken = global_take([tensors[n] for n in names], index)
    return {
        "names": names,
        "norms": norms.tolist(),
        "expected": [float(full[n].norm()) for n in names],
        "take_exact": [
            bool(torch.equal(t, full[n].reshape(-1)[i])) for t, n, i in zip(taken, names, index, strict=True)
        ],
    }


def _watcher_phase(rank: int, tmp: Path, tag: str, weight_samples: int) -> dict:
    """(b) the watcher on the sharded model (every rank) against the watched unsharded reference."""
    from torch import nn

    import gradwatch

    torch.manual_seed(0)
    reference = _mlp()
    sharded = _sharded_copy(reference)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    opt = torch.optim.Adam(sharded.parameters(), lr=0.01)
    mine = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    ref_watcher = None
    if rank == 0:
        ref_watcher = gradwatch.watch(
            reference,
            ref_opt,
            every=1,
            store=tmp / "reference.db",
            run_name=f"reference-{tag}",
            warn=False,
            weight_samples=weight_samples,
        )
    # after fully_shard: the watcher must see the sharded parameters (and hook after FSDP's hooks)
    with gradwatch.watch(
        sharded,
        opt,
        every=1,
        store=tmp / f"rank{rank}.db",
        run_name=f"fsdp-{tag}",
        warn=False,
        weight_samples=weight_samples,
    ) as watcher:
        for step in range(STEPS):
            x, y = _batch(step)
            if ref_watcher is not None:
                ref_opt.zero_grad()
                nn.functional.cross_entropy(reference(x), y).backward()
                ref_opt.step()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(sharded(x[mine]), y[mine])
            loss.backward()
            opt.step()
            watcher.log(loss=loss)
    if ref_watcher is not None:
        ref_watcher.detach()
    return {"run_id": watcher.run_id}


def _worker(out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a stuck collective fails, not hangs
    rank, tmp = dist.get_rank(), Path(out)
    for name, phase in [
        ("norms", lambda: _norms_phase(rank)),
        ("layouts", lambda: _layouts_phase(rank)),
        ("watcher_norms", lambda: _watcher_phase(rank, tmp, "norms", weight_samples=0)),
        ("watcher", lambda: _watcher_phase(rank, tmp, "default", weight_samples=8)),
    ]:
        try:
            result = phase()
        except Exception:  # reported to the test, which fails with the traceback
            result = {"error": traceback.format_exc()}
        (tmp / f"{name}{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        str(tmp),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp)
        log = proc.stdout[-3000:] + proc.stderr[-3000:]
    except subprocess.TimeoutExpired as err:
        log = f"torchrun timed out: {err}"

    def result(name: str, rank: int) -> dict:
        path = tmp / f"{name}{rank}.json"
        assert path.exists(), f"rank {rank} wrote no {name} result:\n{log}"
        data = json.loads(path.read_text())
        assert "error" not in data, f"rank {rank}, phase {name}:\n{data['error']}"
        return data

    return tmp, result


@pytest.mark.integration
def test_fsdp2_parameters_are_sharded_dtensors_with_uneven_shards(fsdp_run):
    _, result = fsdp_run
    for rank in (0, 1):
        norms = result("norms", rank)
        assert norms["all_dtensor"]
        # rows of each parameter held by this rank: 16 -> 8 + 8, the 3-row layer 2 + 1
        assert norms["local_rows"] == ([8, 8, 8, 8, 2, 2] if rank == 0 else [8, 8, 8, 8, 1, 1])


@pytest.mark.integration
def test_global_norms_equal_unsharded_gradient_and_weight_norms(fsdp_run):
    _, result = fsdp_run
    ranks = [result("norms", r) for r in (0, 1)]
    for norms in ranks:
        np.testing.assert_allclose(norms["grad"], norms["ref_grad"], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(norms["weight"], norms["ref_weight"], rtol=1e-5, atol=1e-8)
    # the same numbers on every rank, to the bit
    assert ranks[0]["grad"] == ranks[1]["grad"] and ranks[0]["weight"] == ranks[1]["weight"]


@pytest.mark.integration
def test_global_norms_and_take_use_one_collective_per_process_group(fsdp_run):
    _, result = fsdp_run
    for rank in (0, 1):
        # per step: grads (6 tensors), weights (6), elements (6): one all_reduce each
        assert result("norms", rank)["collectives"] == [3] * STEPS


@pytest.mark.integration
def test_global_take_reads_the_full_tensors_elements(fsdp_run):
    _, result = fsdp_run
    for rank in (0, 1):
        norms = result("norms", rank)
        assert all(norms["take_exact"])  # bit-identical to full_tensor()'s elements
        assert max(norms["take_diff"]) < 1e-5  # and to the unsharded reference's (after Adam)


@pytest.mark.integration
def test_replicate_counted_once_partial_reduced_2d_meshes(fsdp_run):
    _, result = fsdp_run
    for rank in (0, 1):
        layouts = result("layouts", rank)
        np.testing.assert_allclose(
            layouts["norms"], layouts["expected"], rtol=1e-6, err_msg=str(layouts["names"])
        )
        assert all(layouts["take_exact"]), dict(zip(layouts["names"], layouts["take_exact"], strict=True))


def _watched(tmp: Path, result, tag: str):
    """(reference run, rank 0's run): per-layer metrics indexed by (step, layer), scalars, weight samples."""
    from gradwatch import RunStore

    phase = {"norms": "watcher_norms", "default": "watcher"}[tag]
    run_id = result(phase, 0)["run_id"]
    result(phase, 1)  # rank 1 ran without an error too
    runs = []
    for path, run in ((tmp / "reference.db", f"reference-{tag}"), (tmp / "rank0.db", run_id)):
        with RunStore(path) as store:
            metrics = store.metrics(run)
            params = metrics[metrics["kind"] == "param"].set_index(["step", "layer"]).sort_index()
            runs.append((params, store.scalars(run), store.weight_samples(run)))
    return runs


def _assert_norms_match(reference, sharded) -> None:
    (ref, ref_scalars, _), (got, scalars, _) = reference, sharded
    assert list(got.index) == list(ref.index) and len(ref) == STEPS * len(SIZES)
    for metric in ("grad_norm", "weight_norm"):
        assert got[metric].notna().all(), metric
        np.testing.assert_allclose(got[metric], ref[metric], rtol=1e-5, err_msg=metric)
    assert len(scalars) == STEPS
    np.testing.assert_allclose(scalars["total_grad_norm"], ref_scalars["total_grad_norm"], rtol=1e-5)


@pytest.mark.integration
def test_watcher_records_unsharded_norms_on_rank0(fsdp_run):
    """grad_norm, weight_norm and total_grad_norm of FSDP2 parameters, weight samples off."""
    tmp, result = fsdp_run
    _assert_norms_match(*_watched(tmp, result, "norms"))


@pytest.mark.integration
def test_watcher_with_weight_samples_and_update_ratio_on_rank0(fsdp_run):
    """The default watcher: also update_ratio and the tracked weight elements equal the unsharded run's."""
    tmp, result = fsdp_run
    reference, sharded = _watched(tmp, result, "default")
    _assert_norms_match(reference, sharded)
    (ref, _, ref_samples), (got, _, samples) = reference, sharded
    assert got["update_ratio"].notna().all()
    np.testing.assert_allclose(got["update_ratio"], ref["update_ratio"], rtol=1e-5)
    assert len(samples) == len(ref_samples) > 0
    np.testing.assert_allclose(samples["value"], ref_samples["value"], rtol=1e-5, atol=1e-7)
    assert samples["index"].tolist() == ref_samples["index"].tolist()


def test_plain_tensors_are_their_own_shards():
    from gradwatch.sharding import global_norms, global_take, is_sharded, local_tensor

    dense = torch.tensor([[3.0, 4.0], [0.0, 12.0]])
    # a duplicate index: one element of 2.0 once coalesced
    sparse = torch.sparse_coo_tensor([[0, 0], [1, 1]], [1.0, 1.0], (2, 2), check_invariants=True)
    assert not is_sharded(dense) and local_tensor(dense) is dense
    assert global_norms([dense, sparse]).tolist() == [13.0, 2.0]
    assert global_norms([]).numel() == 0
    taken = global_take([dense, dense], [torch.tensor([3, 0]), None])
    assert taken[0].tolist() == [12.0, 3.0] and taken[1].tolist() == [3.0, 4.0, 0.0, 12.0]


def test_global_take_needs_one_index_per_tensor():
    from gradwatch.sharding import global_take

    with pytest.raises(ValueError, match="2 tensors and 1 indices; give one index tensor"):
        global_take([torch.ones(3), torch.ones(2)], [None])


if __name__ == "__main__":
    _worker(sys.argv[1])
