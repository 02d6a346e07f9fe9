"""Export: TensorBoard event files read back with EventAccumulator, CSV and Parquet."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import train_steps
from typer.testing import CliRunner

from gradwatch import RunStore, watch
from gradwatch.cli import app
from gradwatch.integrations.export import export_run
from gradwatch.integrations.tensorboard import HISTOGRAMS
from gradwatch.store import LAYER_METRICS

runner = CliRunner()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A finished, diagnosed run: 5 steps, every other one logged, NaN gradients at the last."""
    path = tmp_path_factory.mktemp("store") / "runs.db"
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, optimizer, every=2, store=path, run_name="exported", warn=False) as watcher:
        train_steps(model, optimizer, watcher, steps=4)
        optimizer.zero_grad()
        model(torch.randn(4, 8)).sum().mul(float("nan")).backward()  # step 4: non-finite gradients
        optimizer.step()
        watcher.log(loss=float("nan"))
    from gradwatch.diagnose import diagnose

    diagnose(watcher.run_id, store=path)
    return path, watcher.run_id


def _series(store, run_id):
    """Every (tag, step) -> value the export must contain, from the store."""
    metrics, scalars = store.metrics(run_id), store.scalars(run_id)
    expected = {}
    for row in metrics.itertuples():
        for metric in LAYER_METRICS:
            value = getattr(row, metric)
            if not math.isnan(value):
                expected[(f"{metric}/{row.layer}", row.step)] = value
    for name in scalars.columns.drop("step"):
        for step, value in zip(scalars["step"], scalars[name], strict=True):
            if not math.isnan(value):
                expected[(name, step)] = value
    return expected


def test_tensorboard_export_has_every_series(recorded, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, run_id = recorded
    result = runner.invoke(app, ["export", "exported", "--to", "tensorboard", str(tmp_path),
                                 "--store", str(path)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / f"{run_id}-exported"
    assert str(folder) in result.output.replace("\n", "")
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    with RunStore(path) as store:
        expected = _series(store, run_id)
        layers = store.layers(run_id)
    linear = set(layers[layers["kind"] == "param"]["layer"])
    assert {tag for tag, _ in expected} == set(tags["scalars"])
    got = {(tag, e.step): e.value for tag in tags["scalars"] for e in events.Scalars(tag)}
    # non-finite values flagged by the store come through as NaN in their series
    nan_points = {k for k, v in got.items() if math.isnan(v)}
    assert nan_points and all(k[1] == 4 for k in nan_points)
    assert {k: v for k, v in got.items() if k not in nan_points} == pytest.approx(expected, rel=1e-6)
    assert linear == {"0", "2", "4", "6"} and {f"delta_rms/{name}" for name in linear} <= set(tags["scalars"])
    assert set(tags["histograms"]) == set(HISTOGRAMS)
    spread = events.Histograms("layers/log10_delta_rms")
    assert [h.step for h in spread] == [0, 2]  # the logged steps with finite deltas
    assert spread[0].histogram_value.num == 4  # four Linear layers
    assert {"config/text_summary", "findings/text_summary"} <= set(tags["tensors"])
    findings = events.Tensors("findings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "nonfinite" in findings


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_export_round_trips(recorded, tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    path, run_id = recorded
    folder = export_run(path, run_id, fmt, tmp_path)
    def read(path):  # layer names such as "0" stay strings
        return pd.read_csv(path, dtype={"layer": str}) if fmt == "csv" else pd.read_parquet(path)

    with RunStore(path) as store:
        for name, frame in (("metrics", store.metrics(run_id)), ("scalars", store.scalars(run_id)),
                            ("layers", store.layers(run_id))):
            got = read(folder / f"{name}.{fmt}")
            pd.testing.assert_frame_equal(got, frame, check_dtype=False)
        meta = json.loads((folder / "run.json").read_text())
        assert meta["id"] == run_id and meta["name"] == "exported" and meta["status"] == "finished"
        assert meta["config"]["gradwatch"]["every"] == 2
        assert [f["kind"] for f in meta["findings"]] == list(store.findings(run_id)["kind"])
    assert np.isnan(read(folder / f"scalars.{fmt}")["loss"].iloc[-1])


def test_unknown_run_is_a_clear_error(recorded, tmp_path):
    path, _ = recorded
    result = runner.invoke(app, ["export", "no-such-run", "--to", "csv", str(tmp_path / "x"),
                                 "--store", str(path)])
    assert result.exit_code == 1
    assert "no run 'no-such-run'" in result.output and "exported" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()  # nothing written


def test_unknown_format_and_missing_store_are_clear_errors(recorded, tmp_path):
    path, run_id = recorded
    result = runner.invoke(app, ["export", str(run_id), "--to", "xlsx", str(tmp_path), "--store", str(path)])
    assert result.exit_code == 1 and "expected one of tensorboard, csv, parquet" in result.output
    result = runner.invoke(app, ["export", "1", str(tmp_path), "--store", str(tmp_path / "none.db")])
    assert result.exit_code == 1 and "no run store at" in result.output
