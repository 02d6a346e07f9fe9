import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import mlp, train_steps
from torch import nn
from typer.testing import CliRunner

import gradwatch
from gradwatch.cli import app
from gradwatch.diagnose import KINDS, Finding, Thresholds, delta_ratios, diagnose, live_check
from gradwatch.errors import ConfigError, RunNotFoundError
from gradwatch.lab import ModelConfig, build_model, iterate_minibatches, load_dataset
from gradwatch.store import LAYER_METRICS

PROBLEMS = {"vanishing_gradients", "exploding_gradients", "dead_units"}


# --- synthetic metrics: every rule on numbers we choose --------------------------------------


def frame(deltas, *, act=None, update=1e-3, nonfinite=()):
    """Per-layer metrics like RunStore.metrics(): deltas[step][layer] for Linear layers
    fc0..fcN, each followed by an activation row built by ``act(step, layer) -> dict``."""
    rows = []
    for step, per_layer in enumerate(deltas):
        for i, d in enumerate(per_layer):
            row = dict.fromkeys(LAYER_METRICS, np.nan)
            row.update(step=step, layer_id=2 * i, layer=f"fc{i}", type="Linear", kind="param",
                       delta_rms=d, grad_norm=d, weight_norm=1.0, output_mean=0.0, output_std=1.0,
                       update_ratio=update(step, i) if callable(update) else update,
                       nonfinite=(step, i) in nonfinite)
            rows.append(row)
            if act is not None and i < len(per_layer) - 1:
                a = dict.fromkeys(LAYER_METRICS, np.nan)
                a.update(step=step, layer_id=2 * i + 1, layer=f"act{i}", type="Sigmoid", kind="activation",
                         saturated_frac=0.0, green_frac=1.0, dead_frac=0.0, mean_derivative=0.25,
                         nonfinite=False)
                a.update(act(step, i))
                rows.append(a)
    return pd.DataFrame(rows)


def scalars(loss, grad_norm=None):
    df = pd.DataFrame({"step": np.arange(len(loss)), "loss": np.asarray(loss, dtype=float)})
    if grad_norm is not None:
        df["total_grad_norm"] = grad_norm
    return df


def kinds(findings):
    return {f.kind for f in findings}


def geometric(n_layers, factor, steps=10):
    """delta of layer i = factor ** (n - 1 - i): the last layer 1, each earlier one `factor` smaller."""
    return [[factor ** (n_layers - 1 - i) for i in range(n_layers)] for _ in range(steps)]


def test_vanishing_names_the_layer_where_delta_first_falls_1000x():
    found = diagnose(frame(geometric(8, 0.1)))
    f = next(f for f in found if f.kind == "vanishing_gradients")
    # fc7 = 1, fc6 = 0.1, fc5 = 0.01, fc4 = 1e-3 (not below), fc3 = 1e-4: the first below 1e-3
    assert f.evidence["onset_layer"] == "fc3"
    assert f.layers == ("fc0", "fc1", "fc2", "fc3")
    assert f.severity == "critical" and (f.first_step, f.last_step) == (0, 9)
    assert f.evidence["delta_ratio"] == pytest.approx(1e-7)
    assert f.evidence["per_layer_factor"] == pytest.approx(0.1)
    assert "product of one weight matrix and one" in f.explanation and "fc3" in f.explanation
    assert f.prescriptions and f.prescriptions[0].rank == 1 and not f.prescriptions[0].verified


def test_sigmoid_explanation_uses_the_quarter_bound():
    found = diagnose(frame(geometric(6, 0.05), act=lambda s, i: {}))
    text = next(f for f in found if f.kind == "vanishing_gradients").explanation
    assert "at most 0.25" in text and "0.25^5" in text and "green region" in text


def test_vanishing_only_at_initialisation_is_a_warning():
    deltas = geometric(6, 0.1, steps=2) + geometric(6, 0.9, steps=8)
    f = next(f for f in diagnose(frame(deltas)) if f.kind == "vanishing_gradients")
    assert f.severity == "warning" and "then recovers" in f.explanation


def test_healthy_profile_has_no_finding():
    assert diagnose(frame(geometric(10, 0.9)), scalars=scalars(np.linspace(2.3, 0.1, 200))) == []


def test_exploding_by_ratio_and_by_growth():
    f = next(f for f in diagnose(frame(geometric(8, 4.0))) if f.kind == "exploding_gradients")
    assert f.severity == "critical" and f.evidence["delta_ratio"] == pytest.approx(4.0**7)
    norms = np.r_[np.ones(20), np.full(5, 5e3)]
    found = diagnose(frame(geometric(4, 0.9, steps=25)), scalars=scalars(np.ones(25), norms))
    assert next(f for f in found if f.kind == "exploding_gradients").evidence["grad_norm_growth"] == 5e3


def test_recovering_from_vanishing_is_not_exploding():
    # tiny gradient norms at first (vanished), then normal: growth x1e4 is a recovery
    deltas = geometric(6, 0.1, steps=5) + geometric(6, 0.9, steps=20)
    norms = np.r_[np.full(5, 1e-4), np.ones(20)]
    assert "exploding_gradients" not in kinds(diagnose(frame(deltas), scalars=scalars(np.ones(25), norms)))


def test_dead_saturated_thresholds():
    dead = diagnose(frame(geometric(5, 0.9), act=lambda s, i: {"dead_frac": 0.7 if i == 2 else 0.1}))
    f = next(f for f in dead if f.kind == "dead_units")
    assert f.layers == ("act2",) and f.evidence["worst_dead_frac"] == 0.7 and f.severity == "warning"
    full = diagnose(frame(geometric(5, 0.9), act=lambda s, i: {"dead_frac": 1.0}))
    assert next(f for f in full if f.kind == "dead_units").severity == "critical"
    sat = diagnose(frame(geometric(5, 0.9), act=lambda s, i: {"saturated_frac": 0.8, "green_frac": 0.1}))
    f = next(f for f in sat if f.kind == "saturated_activations")
    assert len(f.layers) == 4 and "green region" in f.explanation
    # just under the thresholds: nothing
    calm = diagnose(frame(geometric(5, 0.9), act=lambda s, i: {"dead_frac": 0.6, "saturated_frac": 0.5}))
    assert calm == []
    assert kinds(diagnose(frame(geometric(5, 0.9), act=lambda s, i: {"dead_frac": 0.3}),
                          thresholds=Thresholds(dead_frac=0.2))) == {"dead_units"}


def test_loss_plateau_and_not_a_converged_loss():
    flat = np.r_[np.full(150, 2.30) + 0.001 * np.sin(np.arange(150)), np.linspace(2.3, 0.5, 50)]
    found = diagnose(frame(geometric(4, 0.9)), scalars=scalars(flat))
    f = next(f for f in found if f.kind == "loss_plateau")
    assert f.first_step == 0 and 140 <= f.last_step <= 160
    assert f.evidence["loss_level"] == pytest.approx(2.3, 0.01)
    converged = np.r_[np.linspace(2.3, 0.01, 50), np.full(200, 0.01)]
    assert diagnose(frame(geometric(4, 0.9)), scalars=scalars(converged)) == []


def test_updates_too_small_and_too_large():
    ratios = {0: 1e-9, 3: 0.5}
    found = diagnose(frame(geometric(4, 0.9), update=lambda s, i: ratios.get(i, 1e-3)))
    small = next(f for f in found if f.kind == "updates_too_small")
    large = next(f for f in found if f.kind == "updates_too_large")
    assert small.layers == ("fc0",) and large.layers == ("fc3",)
    assert "frozen" in small.explanation and "lower learning rate" in large.explanation


def test_nonfinite_first_step_and_origin_layer():
    deltas = geometric(5, 0.9)
    df = frame(deltas, nonfinite={(6, 2)})
    df.loc[(df.step >= 6) & (df.layer_id >= 4), ["output_mean", "output_std"]] = np.inf  # forward overflow
    found = diagnose(df)
    f = found[0]
    assert f.kind == "nonfinite" and f.first_step == 6 and f.layers[0] == "fc2"
    assert "forward signal first overflows at 'fc2'" in f.explanation
    # backward: deltas inf from fc3 down, forward finite -> origin is the highest bad layer
    df = frame(deltas)
    df.loc[(df.step >= 4) & (df.layer_id <= 6) & (df.kind == "param"), "delta_rms"] = np.inf
    f = diagnose(df)[0]
    assert f.kind == "nonfinite" and f.first_step == 4 and f.layers[0] == "fc3"
    assert "backward pass first goes non-finite at 'fc3'" in f.explanation


def test_steps_after_a_nan_are_not_judged():
    df = frame(geometric(5, 0.9), act=lambda s, i: {"dead_frac": 1.0 if s >= 5 else 0.0}, nonfinite={(5, 0)})
    assert kinds(diagnose(df)) == {"nonfinite"}


def test_not_enough_data_says_how_many_it_needs():
    found = diagnose(frame(geometric(6, 0.1, steps=2)))
    assert [f.kind for f in found] == ["not_enough_data"]
    assert found[0].evidence == {"got": 2, "needed": 3, "what": "logged steps"}
    assert "has 2 logged steps, the check needs at least 3" in found[0].explanation
    short = diagnose(frame(geometric(4, 0.9)), scalars=scalars(np.full(40, 2.3)))
    assert [f.kind for f in short] == ["not_enough_data"] and short[0].evidence["needed"] == 100


def test_thresholds_are_validated_and_replaceable():
    assert Thresholds().replace(vanishing_ratio=1e-4).vanishing_ratio == 1e-4
    with pytest.raises(ConfigError, match=r"vanishing_ratio=2; expected a finite number > 0\.0 and <= 1"):
        Thresholds(vanishing_ratio=2)
    with pytest.raises(ConfigError, match="Thresholds.exploding_ratio=0.5"):
        Thresholds(exploding_ratio=0.5)
    with pytest.raises(ConfigError, match="Thresholds.min_logged_steps=0; expected an integer >= 1"):
        Thresholds(min_logged_steps=0)
    with pytest.raises(ConfigError, match="update_ratio_high"):
        Thresholds(update_ratio_low=0.1, update_ratio_high=0.01)
    with pytest.raises(ConfigError, match="unknown threshold.*vanishing"):
        Thresholds().replace(vanish=1)
    with pytest.raises(ConfigError, match="thresholds must be"):
        diagnose(frame(geometric(4, 0.9)), thresholds={"vanishing_ratio": 1e-3})


def test_bad_run_arguments(store):
    with pytest.raises(ConfigError, match="got list; expected a run id or name, a Watcher"):
        diagnose([1, 2])
    with pytest.raises(ConfigError, match="without column"):
        diagnose(pd.DataFrame({"step": [0]}))
    with pytest.raises(RunNotFoundError, match="no run 42"):
        diagnose(42, store)


def test_live_check():
    assert live_check({"a": 1.0, "b": 0.5, "c": 1.0}, 1.0, 0) is None
    text = live_check({"a": 1e-9, "b": 1e-5, "c": 1e-2, "d": 1.0}, 1.0, 0, run_id=3)
    assert text.startswith("gradwatch: vanishing gradients") and "'b'" in text
    assert text.endswith("see `gradwatch show 3`")
    assert "exploding" in live_check({"a": 1e4, "b": 1.0}, 1.0, 0)
    assert "non-finite gradients in 2 parameter(s)" in live_check({"a": 1.0, "b": 1.0}, math.nan, 2)
    assert "first at layer 'b'" in live_check({"a": math.inf, "b": math.inf, "c": 1.0}, 1.0, 0)
    assert live_check({"a": 1.0}, 1.0, 0) is None and live_check({}, None, 0) is None
    assert live_check({"a": 1e-5, "b": 1.0}, 1.0, 0, Thresholds(vanishing_ratio=1e-6)) is None


def test_finding_round_trips_through_the_store_and_show(store, store_path):
    torch.manual_seed(0)
    model = mlp(depth=12, width=16, activation=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        train_steps(model, opt, w, steps=4)
        live = diagnose(w)  # a watcher, flushed first
    assert "vanishing_gradients" in kinds(live)
    found = diagnose(w.run_id, store_path)  # by id and path, after detach
    stored = store.findings(w.run_id)
    assert list(stored["kind"]) == [f.kind for f in found]
    assert stored["prescriptions"].iloc[0][0]["name"] == found[0].prescriptions[0].name
    assert isinstance(found[0], Finding) and found[0].title == KINDS[found[0].kind]
    args = ["show", str(w.run_id), "--store", str(store_path)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "vanishing_gradients" in result.output


def test_delta_ratios_skip_a_zero_last_layer():
    df = frame([[1e-3, 1.0], [1e-3, 0.0]])
    assert delta_ratios(df).iloc[0] == pytest.approx(1e-3) and math.isnan(delta_ratios(df).iloc[1])


# --- the lab's grid: the must-show claims, over 3 seeds ------------------------------------

LAB = {"lr": 3e-3, "epochs": 5, "every": 5}  # the lab's seed preset (Adam, batch 64)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def lab_run(store, ds, config, seed, lr=LAB["lr"], epochs=LAB["epochs"]):
    model = build_model(config, ds.input_shape, ds.n_classes, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with gradwatch.watch(model, opt, every=LAB["every"], store=store, warn=False) as w:
        for _ in range(epochs):
            for xb, yb in iterate_minibatches(ds.x_train, ds.y_train, 64, gen):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                w.log(loss=loss)
    return diagnose(w.run_id, store)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [10, 20])
def test_every_deep_sigmoid_net_vanishes(store, digits, depth):
    for seed in range(3):
        found = lab_run(store, digits, ModelConfig(depth=depth, activation="sigmoid"), seed, epochs=2)
        f = next(f for f in found if f.kind == "vanishing_gradients")
        assert f.severity == "critical"
        # the onset is where the median delta (relative to the last layer's) first drops below 1e-3
        m = store.metrics(int(store.runs().id.iloc[-1]))
        p = m[m.kind == "param"].pivot(index="step", columns="layer", values="delta_rms")
        order = m[m.kind == "param"].drop_duplicates("layer").sort_values("layer_id").layer.tolist()
        rel = p[order].div(p[order[-1]], axis=0).median()
        expected = next(name for name in reversed(order) if rel[name] < 1e-3)
        assert f.evidence["onset_layer"] == expected, (seed, f.evidence)
        assert f.evidence["delta_ratio"] < 1e-6


@pytest.mark.slow
def test_too_large_init_explodes_and_narrow_relu_dies(store, digits):
    for seed in range(3):
        big = lab_run(store, digits, ModelConfig(depth=20, activation="relu", init="scaled", sigma_w2=8.0),
                      seed, epochs=1)
        assert "exploding_gradients" in kinds(big)
        narrow = lab_run(store, digits, ModelConfig(depth=10, width=8, activation="relu", init="he"),
                         seed, lr=0.03)
        assert "dead_units" in kinds(narrow), seed


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    pytest.param(ModelConfig(depth=20, activation="relu", init="he"), id="relu-he"),
    pytest.param(ModelConfig(depth=20, activation="sigmoid", batch_norm=True), id="sigmoid-bn"),
    pytest.param(ModelConfig(depth=20, activation="sigmoid", residual=True), id="sigmoid-residual"),
])
def test_no_false_alarms_on_the_fixes(store, digits, config):
    for seed in range(3):
        found = lab_run(store, digits, config, seed)
        assert not kinds(found) & PROBLEMS, (seed, [(f.kind, f.evidence) for f in found])


# --- the step x layer tables: numpy's arrangement is pandas' pivot_table ------------------------


def reference_pivot(df, kind, column, dropna):
    """What diagnose computed before its tables were arranged by numpy."""
    rows = df[df["kind"] == kind]
    if dropna:
        rows = rows[rows[column].notna()]
    return rows.pivot_table(index="step", columns="layer_id", values=column, aggfunc="first", dropna=dropna)


TABLES = [("param", "delta_rms", True), ("param", "update_ratio", False), ("activation", "dead_frac", False)]


def test_tables_equal_pivot_table_on_a_full_grid():
    from gradwatch.diagnose import _pivot

    df = frame(geometric(6, 0.5, steps=7), act=lambda s, i: {"dead_frac": 0.1 * i + 0.01 * s},
               update=lambda s, i: 1e-3 * (s + 1) + i)
    for kind, column, dropna in TABLES:
        table = _pivot(df, kind, column, dropna=dropna)
        pd.testing.assert_frame_equal(table, reference_pivot(df, kind, column, dropna))
    table = _pivot(df, "activation", "dead_frac")
    assert table.shape == (7, 5) and table.loc[3, 5] == pytest.approx(0.23)  # act2 is layer 5


def test_tables_equal_pivot_table_on_a_ragged_grid():
    from gradwatch.diagnose import _pivot

    df = frame(geometric(6, 0.5, steps=8), act=lambda s, i: {"dead_frac": 0.1 * i + 0.01 * s})
    df = df.drop(index=[3, 4, 20, 21, 22, 60]).sample(frac=1.0, random_state=0)  # missing cells, any order
    df.loc[(df["step"] == 5) & (df["kind"] == "param"), "delta_rms"] = np.nan  # a step without deltas
    df.loc[df["layer_id"] == 9, "dead_frac"] = np.nan  # an activation layer without values
    cell = (df["step"] == 3) & (df["layer_id"] == 0)
    first_nan, duplicate = df[cell].assign(delta_rms=np.nan), df[cell].assign(delta_rms=7.0)
    df = pd.concat([first_nan, df, duplicate], ignore_index=True)  # the first non-NaN value counts
    for kind, column, dropna in TABLES:
        table = _pivot(df, kind, column, dropna=dropna)
        pd.testing.assert_frame_equal(table, reference_pivot(df, kind, column, dropna))
    deltas = _pivot(df, "param", "delta_rms", dropna=True)
    assert 5 not in deltas.index and deltas.loc[3, 0] == 0.5**5 and np.isnan(deltas.loc[2, 0])
    assert 9 in _pivot(df, "activation", "dead_frac").columns  # kept, all NaN, as dropna=False keeps it
    only = _pivot(df, "param", "update_ratio", steps=[1, 6])
    expected = reference_pivot(df[df["step"].isin([1, 6])], "param", "update_ratio", False)
    pd.testing.assert_frame_equal(only, expected)
    # a column pandas keeps as objects goes through pivot_table itself, with the same result
    objects = df.astype({"delta_rms": object})
    pd.testing.assert_frame_equal(_pivot(objects, "param", "delta_rms", dropna=True).astype("float64"),
                                  deltas)


def test_nonfinite_alert_names_where_the_value_entered():
    from gradwatch.thresholds import nonfinite_alert, step_alerts

    layers = ["a", "b", "c"]
    layer_of = {0: "a", 1: "a", 2: "b", 3: "c"}  # parameter -> its layer (weight and bias of "a")
    no_broken = list
    # at the first bad step only "b" and "c" went bad: backward reached "c" first
    alert = nonfinite_alert({2: 5, 3: 5, 0: 6}, layer_of, layers, no_broken, run_id=7)
    assert (alert.kind, alert.step, alert.layer) == ("nonfinite", 5, "c")
    assert "2 of 3 layers" in alert.message and "gradwatch show 7" in alert.message
    # every layer bad: a layer with non-finite weights is the cause, else the loss or forward
    every = {0: 1, 2: 1, 3: 1}
    assert nonfinite_alert(every, layer_of, layers, lambda: ["b"]).layer == "b"
    assert "the loss or the forward pass" in nonfinite_alert(every, layer_of, layers, no_broken).message
    # a parameter outside the watched layers: said so, no layer named (this used to raise)
    outside = nonfinite_alert({9: 4}, layer_of, layers, no_broken)
    assert outside.layer is None and "outside the watched layers" in outside.message
    # step_alerts: the actions decide which kinds are judged
    actions = {"nonfinite": "warn", "vanishing": "warn", "exploding": "ignore"}
    deltas = {"a": 1e-9, "b": 1e-3, "c": 1.0}
    types = dict.fromkeys(layers, "Linear")
    kinds = [a.kind for a in step_alerts(actions, deltas, types, {3: 2}, layer_of, layers, no_broken, step=2)]
    assert kinds == ["nonfinite", "vanishing"]
    quiet = {**actions, "vanishing": "ignore", "nonfinite": "ignore"}
    assert step_alerts(quiet, deltas, types, {3: 2}, layer_of, layers, no_broken, step=2) == []
