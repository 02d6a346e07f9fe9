"""DDP under a real `torchrun --nproc_per_node 2` (gloo, CPU): rank 0 by default, or every rank.

The test launches this very file as the torchrun script; `_worker` is what each rank runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration  # two processes under torchrun

STEPS = 24  # every step logged, on two processes writing one store at once


def _worker(store: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from gradwatch.integrations.ddp import watch_ddp

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    report = {"rank": rank, "phases": {}}
    for phase, all_ranks in (("default", False), ("all", True)):
        watcher = watch_ddp(ddp, optimizer, all_ranks=all_ranks, store=store, every=1,
                            run_name=f"ddp-{phase}")
        norms = []
        for _ in range(STEPS):
            x, y = torch.randn(16, 8, generator=data), torch.randint(0, 3, (16,), generator=data)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            # the all-reduced gradient the optimizer is about to apply, per Linear layer
            norms.append([float(model[i].weight.grad.norm()) for i in (0, 2, 4)])
            optimizer.step()
            watcher.log(loss=loss)
        watcher.detach()
        report["phases"][phase] = {"run_id": watcher.run_id, "norms": norms, "idle": type(watcher).__name__}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _torchrun(tmp_path, store, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(store), str(tmp_path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    store = tmp / "runs.db"
    proc = _torchrun(tmp, store)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]
    return store, reports


def test_rank0_records_post_reduce_gradients_by_default(ddp_run):
    from gradwatch import RunStore

    store_path, (rank0, rank1) = ddp_run
    p0, p1 = rank0["phases"]["default"], rank1["phases"]["default"]
    assert p0["idle"] == "Watcher" and p1["idle"] == "IdleWatcher" and p1["run_id"] == p0["run_id"]
    # after the all-reduce both ranks hold the same gradient: rank 0's record stands for both
    np.testing.assert_allclose(p0["norms"], p1["norms"], rtol=1e-6)
    with RunStore(store_path) as store:
        runs = store.runs()
        default = runs[runs["name"] == "ddp-default"]
        assert len(default) == 1  # rank 1 recorded nothing
        run = default.iloc[0]
        assert run["status"] == "finished"
        assert run["config"]["ddp"] == {"rank": 0, "world_size": 2, "group": run["config"]["ddp"]["group"],
                                        "records": "rank0"}
        m = store.metrics(int(run["id"]))
        params = m[m["kind"] == "param"].sort_values(["step", "layer_id"])
        assert len(params) == STEPS * 3
        got = params["grad_norm"].to_numpy().reshape(STEPS, 3)
        np.testing.assert_allclose(got, p0["norms"], rtol=1e-5)


def test_all_ranks_records_every_rank_without_lost_rows(ddp_run):
    from gradwatch import RunStore
    from gradwatch.integrations.ddp import rank_metrics, rank_runs, rank_scalars

    store_path, reports = ddp_run
    with RunStore(store_path) as store:
        ids = rank_runs(store, "ddp-all/rank1")
        assert ids == {r: reports[r]["phases"]["all"]["run_id"] for r in (0, 1)}
        assert [store.run(i)["name"] for i in ids.values()] == ["ddp-all/rank0", "ddp-all/rank1"]
        metrics = rank_metrics(store, ids[0])
        for rank in (0, 1):
            mine = metrics[metrics["rank"] == rank]
            # every step, every layer (3 Linear + 2 Tanh), nothing lost to the concurrent writer
            assert len(mine) == STEPS * 5 and set(mine["step"]) == set(range(STEPS))
            params = mine[mine["kind"] == "param"].sort_values(["step", "layer_id"])
            got = params["grad_norm"].to_numpy().reshape(STEPS, 3)
            np.testing.assert_allclose(got, reports[rank]["phases"]["all"]["norms"], rtol=1e-5)
        # grad norms are post-reduce (equal); deltas are each rank's own data (different)
        params = metrics[metrics["kind"] == "param"].sort_values(["step", "layer_id"])
        by_rank = [params[params["rank"] == r] for r in (0, 1)]
        np.testing.assert_allclose(by_rank[0]["grad_norm"], by_rank[1]["grad_norm"], rtol=1e-6)
        assert (abs(by_rank[0]["delta_rms"].to_numpy() - by_rank[1]["delta_rms"].to_numpy()) > 1e-6).all()
        scalars = rank_scalars(store, ids[0], ["loss"])
        assert scalars.groupby("rank")["loss"].count().tolist() == [STEPS, STEPS]


def test_unwritable_store_fails_every_rank_clearly(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's directory should be")
    proc = _torchrun(tmp_path, blocker / "runs" / "gradwatch.db", timeout=120)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "StoreError: cannot create the store directory" in output  # rank 0's own error
    # rank 1 hears of it instead of waiting forever
    assert "StoreError: rank 0 could not start watching: cannot create the store directory" in output
    assert not list(tmp_path.glob("rank*.json"))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
