"""Ray backend: a lab grid as Ray tasks on a local cluster, the driver alone writing the store."""

import os
import socket
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

ray = pytest.importorskip("ray")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from gradwatch.cli import app  # noqa: E402
from gradwatch.integrations.ray import RayBackend, RayConnectionError  # noqa: E402
from gradwatch.lab.models import ModelConfig  # noqa: E402
from gradwatch.lab.presets import Preset, TrainSettings, grid_entry  # noqa: E402
from gradwatch.lab.runner import InProcessBackend, run_lab  # noqa: E402
from gradwatch.store import RunStore  # noqa: E402

runner = CliRunner()
TRAIN = TrainSettings(epochs=1, every=5, lr=3e-3)
GRID = Preset(
    "ray-tiny", "two small configurations",
    (grid_entry("t", "sigmoid-d3", ModelConfig(depth=3, width=16, activation="sigmoid"), TRAIN),
     grid_entry("t", "relu-he", ModelConfig(depth=2, width=16, activation="relu", init="he"), TRAIN)),
    seeds=2,
)


def _dead_port() -> int:
    """A loopback port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_an_address_that_does_not_answer_fails_after_a_bounded_wait():
    assert not ray.is_initialized()
    address = f"127.0.0.1:{_dead_port()}"
    start = time.monotonic()
    expected = rf"no Ray cluster answers at {address} .*after waiting 1.5 s"
    with pytest.raises(RayConnectionError, match=expected):
        RayBackend(address=address, connect_timeout_s=1.5).connect()
    assert 1.4 < time.monotonic() - start < 6
    assert not ray.is_initialized()


def test_cli_rejects_bad_backend_options(tmp_path):
    for args, message in ((["--backend", "spark"], "expected one of local, ray"),
                          (["--address", "auto"], "--address is for --backend ray"),
                          (["--backend", "ray", "--address", "nowhere"], "expected auto, HOST:PORT")):
        result = runner.invoke(app, ["lab", "--out", str(tmp_path), *args])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "gradwatch.db").exists()


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def _frames(store, run_id):
    """Every table of a run (the wall clock aside): metrics, scalars, layers, tracked weights."""
    scalars = store.scalars(run_id)
    weights = store.weight_samples(run_id)
    assert len(weights) > 0  # "weights against epochs" must come back from the workers
    return store.metrics(run_id), scalars.drop(columns="wall_time"), store.layers(run_id), weights


@pytest.mark.integration
def test_ray_backend_matches_the_local_backend(cluster, tmp_path):
    local = run_lab(GRID, out=tmp_path / "local", backend=InProcessBackend())
    events = []
    remote = run_lab(GRID, out=tmp_path / "ray", backend=RayBackend(), notify=events.append)
    assert ray.is_initialized()  # the backend used the cluster it found and left it running
    assert remote.ran == 4 and not remote.failed
    assert sorted(e.kind for e in events) == ["end"] * 4 + ["epoch"] * 4 + ["start"] * 4

    with RunStore(local.store) as ls, RunStore(remote.store) as rs:
        local_runs, ray_runs = ls.runs(), rs.runs()
        # exactly the grid's runs, each once, finished, with the local runs' configs
        names = sorted(f"ray-tiny/{e.config_key}/seed{s}" for e in GRID.grid for s in range(2))
        assert sorted(ray_runs["name"]) == names and set(ray_runs["status"]) == {"finished"}
        for name in names:
            lid = int(local_runs[local_runs["name"] == name]["id"].iloc[0])
            rid = int(ray_runs[ray_runs["name"] == name]["id"].iloc[0])
            assert rs.run(rid)["config"] == ls.run(lid)["config"]
            for got, want in zip(_frames(rs, rid), _frames(ls, lid), strict=True):
                pd.testing.assert_frame_equal(got, want)  # the same numbers, bit for bit
            lf, rf = ls.findings(lid), rs.findings(rid)
            pd.testing.assert_frame_equal(rf.drop(columns="created_at"), lf.drop(columns="created_at"))
    assert [(c.config_key, c.test_acc_mean, c.delta_ratio_mean) for c in remote.summaries] == \
        [(c.config_key, c.test_acc_mean, c.delta_ratio_mean) for c in local.summaries]
    # a second run resumes from the driver's store: nothing is sent to Ray again
    again = run_lab(GRID, out=tmp_path / "ray", backend=RayBackend())
    assert again.ran == 0 and again.resumed == 4
