"""One definition of each derived number (gradwatch.numbers), and one value of it everywhere:
a lab run's delta ratio is the same in lab.json, diagnose, the report and ``gradwatch show``.
"""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from gradwatch import numbers
from gradwatch import report as rp
from gradwatch.cli import app
from gradwatch.diagnose import delta_ratios, diagnose, live_check
from gradwatch.errors import ConfigError, check_int
from gradwatch.lab.models import ModelConfig
from gradwatch.lab.presets import Preset, TrainSettings, grid_entry
from gradwatch.lab.runner import InProcessBackend, run_lab
from gradwatch.report import verdicts
from gradwatch.store import RunStore

# --- the definitions on a hand-made metrics table ----------------------------------------------


def _metrics(layers, steps=(0, 5)):
    """``layers``: (name, type, kind, delta_rms by step, dead_frac by step) in forward order."""
    rows = []
    for step_i, step in enumerate(steps):
        for lid, (name, type_, kind, deltas, dead) in enumerate(layers):
            rows.append({"step": step, "layer_id": lid, "layer": name, "type": type_, "kind": kind,
                         "delta_rms": deltas[step_i] if deltas else math.nan,
                         "dead_frac": dead[step_i] if dead else math.nan,
                         "saturated_frac": math.nan})
    return pd.DataFrame(rows)


# A user's model: no "hidden." names, a BatchNorm first and a LayerNorm last among the parameterised.
USER = _metrics([
    ("stem_norm", "BatchNorm1d", "param", (9.0, 9.0), None),
    ("encoder.fc1", "Linear", "param", (0.02, 0.5), None),
    ("encoder.act", "ReLU", "activation", None, (0.25, 0.5)),
    ("encoder.fc2", "Linear", "param", (0.1, 0.5), None),
    ("encoder.act2", "ReLU", "activation", None, (0.75, 0.0)),
    ("head", "Linear", "param", (0.4, 1.0), None),
    ("final_norm", "LayerNorm", "param", (3.0, 3.0), None),
])


def test_delta_ratio_runs_over_the_weight_layers_of_any_model():
    series = numbers.delta_ratio_series(USER)
    assert list(series.index) == [0, 5]
    assert series.tolist() == pytest.approx([0.02 / 0.4, 0.5 / 1.0], rel=1e-15)
    assert numbers.delta_ratio(USER) == pytest.approx(0.05, rel=1e-15)  # the first logged step
    assert numbers.delta_ratio(USER, step=5) == pytest.approx(0.5, rel=1e-15)
    assert math.isnan(numbers.delta_ratio(USER, step=3))  # no such step
    assert list(numbers.weight_layers(USER)["layer"].unique()) == ["encoder.fc1", "encoder.fc2", "head"]
    # diagnose reads the same series
    pd.testing.assert_series_equal(delta_ratios(USER), series)


def test_delta_ratio_is_nan_where_it_is_undefined():
    one = _metrics([("fc", "Linear", "param", (0.5, 0.5), None),
                    ("bn", "BatchNorm1d", "param", (1, 1), None)])
    assert numbers.delta_ratio_series(one).isna().all() and math.isnan(numbers.delta_ratio(one))
    zero = _metrics([("a", "Linear", "param", (0.5, 0.5), None), ("b", "Linear", "param", (0.0, 2.0), None)])
    assert numbers.delta_ratio_series(zero).iloc[0] != numbers.delta_ratio_series(zero).iloc[0]  # NaN
    assert numbers.delta_ratio(zero, step=5) == 0.25
    assert math.isnan(numbers.delta_ratio(pd.DataFrame()))


def test_live_check_leaves_normalisation_layers_out_when_told_their_types():
    deltas = {"fc1": 1e-5, "fc2": 1e-3, "head": 1.0, "norm": 1e-9}
    types = {"fc1": "Linear", "fc2": "Linear", "head": "Linear", "norm": "LayerNorm"}
    assert "exploding" in live_check(deltas, None, 0)  # the norm as "last layer": 1e-5 / 1e-9
    assert "vanishing" in live_check(deltas, None, 0, layer_types=types)  # 1e-5, as delta_ratio


def test_dead_and_saturated_fractions():
    assert numbers.dead_fraction(USER) == pytest.approx((0.5 + 0.0) / 2)  # last logged step
    assert numbers.dead_fraction(USER, "first") == pytest.approx((0.25 + 0.75) / 2)
    assert numbers.dead_fraction(USER, 0) == numbers.dead_fraction(USER, "first")
    assert math.isnan(numbers.saturated_fraction(USER))  # ReLUs have no flat tails
    acts = USER[USER["kind"] == "activation"]
    table = acts.pivot_table(index="step", columns="layer_id", values="dead_frac")
    medians, over = numbers.layers_over(table, 0.4)
    assert medians.to_dict() == {2: 0.375, 4: 0.375} and over == []
    assert numbers.layers_over(table, 0.3)[1] == [2, 4]


@pytest.mark.parametrize(("value", "kwargs", "text"), [
    (None, {}, "-"), (math.nan, {"missing": "–"}, "–"), (math.inf, {}, "inf"), (-math.inf, {}, "-inf"),
    (0.0, {}, "0"), (0.10912, {}, "0.109"), (3.14159e-5, {}, "3.14e-05"), (12345.0, {"digits": 2}, "1.2e+04"),
    (0.25, {"fixed": True}, "0.25"), (0.0, {"fixed": True}, "0"), (2.5e-4, {"fixed": True}, "2.50e-04"),
    (0.004, {"plain": (0.01, 1e4), "sci_digits": 2, "general": True}, "0.004"),
    (1e-5, {"plain": (0.01, 1e4), "sci_digits": 2, "general": True}, "1e-05"),
    (123456.0, {"digits": 4, "plain": (0.0, math.inf)}, "1.235e+05"),
])
def test_format_number(value, kwargs, text):
    assert numbers.format_number(value, **kwargs) == text


def test_check_int_says_what_was_got_and_what_is_expected():
    assert check_int("depth", 3, 1) == 3
    for bad in (0, 2.0, True, "3"):
        with pytest.raises(ConfigError, match=r"depth=.*; expected an integer >= 1 \(hidden layers\)"):
            check_int("depth", bad, 1, "hidden layers")


# --- one lab run, four readers: the same number --------------------------------------------------


@pytest.fixture(scope="module")
def bn_lab(tmp_path_factory):
    """A tiny grid through run_lab: a sigmoid MLP with batch norm (the case where lab.json and
    diagnose used to disagree) and a deep one without (whose gradient vanishes: diagnose's
    finding carries the ratio), one seed, one short epoch.
    """
    train = TrainSettings(optimizer="adam", lr=3e-3, epochs=1, batch_size=64, every=2)
    grid = (
        grid_entry("t", "sigmoid-bn",
                   ModelConfig(depth=6, width=16, activation="sigmoid", batch_norm=True), train),
        grid_entry("t", "sigmoid-d12", ModelConfig(depth=12, width=16, activation="sigmoid"), train),
    )
    out = tmp_path_factory.mktemp("bn-lab")
    result = run_lab(Preset("numbers-test", "delta ratio agreement", grid, seeds=1), out=out,
                     backend=InProcessBackend())
    assert not result.failed, result.failed[0].error
    return out, result


def _show(db, run_id, *extra):
    args = ["show", str(run_id), *extra, "--store", str(db)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_one_run_has_one_delta_ratio_in_lab_json_diagnose_report_and_show(bn_lab):
    out, result = bn_lab
    lab = json.loads((out / "lab.json").read_text())
    db = out / "gradwatch.db"
    data = rp.load(lab_dir=out)
    runs = {r.id: r for r in data.runs}
    table = verdicts.fix_rows(data).set_index("config_key")
    judged = []
    with RunStore(db) as store:
        store_only = verdicts.fix_rows(rp.load(store=store)).set_index("config_key")
        for config in lab["configs"]:
            (run_id,) = config["run_ids"]
            metrics = store.metrics(run_id)
            value = numbers.delta_ratio(metrics)
            assert math.isfinite(value) and value > 0
            # lab.json and the lab's summary
            assert config["delta_ratio_mean"] == pytest.approx(value, rel=1e-9)
            summary = next(s for s in result.summaries if s.config_key == config["config_key"])
            assert summary.delta_ratio == pytest.approx((value,), rel=1e-9)
            # diagnose: its per-step ratios at the first step, and the evidence of what it found
            ratios = delta_ratios(metrics)
            assert ratios.iloc[0] == pytest.approx(value, rel=1e-9)
            for finding in diagnose(run_id, store=store, save=False):
                if "delta_ratio_first_step" in finding.evidence:
                    assert finding.evidence["delta_ratio_first_step"] == pytest.approx(value, rel=1e-9)
                    judged.append(finding.kind)
            # the report: the run's number and the table (from lab.json, and from the store alone)
            assert runs[run_id].delta_ratio == pytest.approx(value, rel=1e-9)
            assert table.loc[config["config_key"], "delta_ratio_mean"] == pytest.approx(value, rel=1e-9)
            assert store_only.loc[config["config_key"], "delta_ratio_mean"] == pytest.approx(value, rel=1e-9)
            # gradwatch show, to the printed digits: at the first step and from the latest step
            first = int(ratios.index[0])
            printed = numbers.format_number(value, 3, fixed=True)
            shown = _show(db, run_id, "--step", str(first))
            line = re.search(r"first/last weight layer delta: (\S+) at step (\d+)", shown)
            assert line.groups() == (printed, str(first))
            assert f", {printed} at the first logged step {first}" in _show(db, run_id)
    assert judged == ["vanishing_gradients"]  # the deep sigmoid's finding, with its evidence


def test_the_batch_norm_run_counts_weight_layers_only(bn_lab):
    """The BN run holds BatchNorm layers, and its ratio is the first Linear's over the head's."""
    out, result = bn_lab
    (bn,) = [s for s in result.summaries if s.config_key == "t/sigmoid-bn"]
    with RunStore(out / "gradwatch.db") as store:
        m = store.metrics(bn.run_ids[0])
    step0 = m[(m["kind"] == "param") & (m["step"] == m["step"].min())].sort_values("layer_id")
    assert step0["type"].str.contains("BatchNorm").sum() == 6
    weights = step0[~step0["type"].str.contains("Norm")]
    assert weights["layer"].iloc[-1] == "out"
    want = weights["delta_rms"].iloc[0] / weights["delta_rms"].iloc[-1]
    assert bn.delta_ratio[0] == pytest.approx(want, rel=1e-12)


def test_dead_fraction_in_the_lab_summary_is_the_shared_one(bn_lab):
    out, result = bn_lab
    with RunStore(out / "gradwatch.db") as store:
        for s in result.summaries:
            assert s.dead_frac == pytest.approx((numbers.dead_fraction(store.metrics(s.run_ids[0])),),
                                                nan_ok=True)
    assert np.isfinite(result.summaries[0].dead_frac[0])
