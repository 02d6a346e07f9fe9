import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gradwatch.cli import app
from gradwatch.errors import ConfigError, DataError
from gradwatch.lab import ModelConfig, build_model, load_dataset
from gradwatch.prescribe import (
    TRIALS,
    PrescriptionTable,
    _batch_norm,
    _fewer_layers,
    _make_trial,
    _Residual,
    _residual,
    load_factory,
    prescribe,
)

SEED_FIXES = {"relu_he", "batch_norm", "residual", "fewer_layers"}
runner = CliRunner()


def sigmoid_mlp(depth=20, width=64, d_in=64, d_out=10):
    layers, n = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(n, width), nn.Sigmoid()]
        n = width
    return nn.Sequential(*layers, nn.Linear(n, d_out))


class Functional(nn.Module):
    """Activations called as functions: nothing for gradwatch to swap."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 48), nn.Linear(48, 10)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A user's module on disk, importable as `usermodels` from the working directory."""
    (tmp_path / "usermodels.py").write_text(textwrap.dedent("""
        from torch import nn

        def deep_sigmoid():
            layers = []
            for _ in range(6):
                layers += [nn.Linear(64, 16) if not layers else nn.Linear(16, 16), nn.Sigmoid()]
            return nn.Sequential(*layers, nn.Linear(16, 10))

        def wrong_size():
            return nn.Sequential(nn.Linear(100, 32), nn.ReLU(), nn.Linear(32, 10))

        def not_a_module():
            return 42

        def broken():
            raise RuntimeError("out of ideas")

        NUMBER = 3
    """))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("usermodels", None)


# --- the changes, one by one ------------------------------------------------------------------


def forward_ok(model, x=None):
    x = torch.randn(8, 64) if x is None else x
    assert model(x).shape[0] == x.shape[0]


def test_swaps_and_reinit_keep_the_model_working():
    base = sigmoid_mlp(depth=4, width=16)
    example = torch.randn(8, 64)
    for name in TRIALS:
        model, reason, overrides = _make_trial(name, base, example, seed=0)
        assert reason is None, name
        forward_ok(model)
    relu, _, _ = _make_trial("relu_he", base, example, 0)
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 4
    assert not any(isinstance(m, nn.Sigmoid) for m in relu.modules())
    assert all(isinstance(m, nn.Sigmoid) for m in base if not isinstance(m, nn.Linear))  # base untouched
    assert _make_trial("clip_grad_norm", base, example, 0)[2] == {"clip": 1.0}
    assert _make_trial("lower_lr", base, example, 0)[2] == {"lr_factor": 0.1}
    # the same seed gives the same re-initialised weights
    a, b = _make_trial("reinit", base, example, 0)[0], _make_trial("reinit", base, example, 0)[0]
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, base[0].weight)


def test_batch_norm_goes_before_each_activation():
    model = sigmoid_mlp(depth=3, width=16)
    assert _batch_norm(model, torch.randn(8, 64)) is None
    wrapped = [m for m in model if isinstance(m, nn.Sequential)]
    assert len(wrapped) == 3
    assert all(isinstance(w[0], nn.BatchNorm1d) and w[0].num_features == 16 and isinstance(w[1], nn.Sigmoid)
               for w in wrapped)
    assert "already has batch normalisation" in _batch_norm(model, torch.randn(8, 64))
    cnn = build_model(ModelConfig(kind="cnn", depth=2, width=4, activation="tanh"), (1, 8, 8), 10)
    assert _batch_norm(cnn, torch.randn(8, 64)) is None
    assert sum(isinstance(m, nn.BatchNorm2d) for m in cnn.modules()) == 2
    forward_ok(cnn)


def test_residual_wraps_only_equal_width_blocks():
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16),
                          nn.Tanh(), nn.Linear(16, 10))
    assert _residual(model, torch.randn(8, 64)) is None
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "Tanh", "_Residual", "_Residual", "Linear"]
    forward_ok(model)
    funnel = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    assert "not a stack of equal-width blocks" in _residual(funnel, torch.randn(8, 64))
    assert "no nn.Sequential stack" in _residual(Functional(), torch.randn(8, 64))
    lab = build_model(ModelConfig(depth=8, activation="sigmoid"), 64, 10)
    assert _residual(lab, torch.randn(8, 64)) is None
    assert all(isinstance(m, _Residual) for m in lab.hidden)


def test_fewer_layers_keeps_a_quarter_of_the_blocks():
    model = sigmoid_mlp(depth=20, width=64)
    assert _fewer_layers(model, torch.randn(8, 64)) is None
    assert sum(isinstance(m, nn.Linear) for m in model) == 6  # 20 equal blocks -> 5, plus the output
    forward_ok(model)
    assert "only 1 equal-width block" in _fewer_layers(sigmoid_mlp(depth=1), torch.randn(8, 64))


def test_not_applicable_rows_say_why():
    table = prescribe(Functional, "digits", steps=5, workers=1, progress=False)
    rows = {p.name: p for p in table.rows}
    assert not rows["relu_he"].applicable and "F.relu" in rows["relu_he"].reason
    assert not rows["residual"].applicable and "custom code" in rows["residual"].reason
    assert rows["clip_grad_norm"].verified and rows["clip_grad_norm"].rank >= 1
    assert [p.rank for p in table.rows if not p.applicable] == [0] * 8
    frame = table.to_frame()
    assert frame.iloc[0]["name"] == "unchanged" and len(frame) == len(TRIALS) + 1


# --- bad input: a clear error, never a traceback ------------------------------------------------


def test_factory_errors(factory_module):
    with pytest.raises(ConfigError, match="cannot import module 'nosuchpkg.models' of factory"):
        load_factory("nosuchpkg.models:make")
    with pytest.raises(ConfigError, match="not of the form package.module:function"):
        load_factory("usermodels")
    with pytest.raises(ConfigError, match="has no attribute 'nope'; its callables: .*deep_sigmoid"):
        load_factory("usermodels:nope")
    with pytest.raises(ConfigError, match="'usermodels:NUMBER' is a int, not a callable"):
        load_factory("usermodels:NUMBER")
    with pytest.raises(ConfigError, match="returned int; expected a torch.nn.Module"):
        prescribe("usermodels:not_a_module", "digits", progress=False)
    with pytest.raises(ConfigError, match="raised RuntimeError: out of ideas"):
        prescribe("usermodels:broken", "digits", progress=False)


def test_feature_size_mismatch_names_both_sizes(factory_module):
    with pytest.raises(DataError, match=r"'digits' has 64 features .* expects 100 features"):
        prescribe("usermodels:wrong_size", "digits", progress=False)
    wide = nn.Sequential(nn.Linear(64, 3))
    with pytest.raises(DataError, match="outputs 3 value.* has 10 classes"):
        prescribe(wide, "digits", progress=False)


def test_empty_data_and_bad_settings(tmp_path):
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 64)), y=np.zeros(0))
    with pytest.raises(DataError, match="empty"):
        prescribe(sigmoid_mlp, str(tmp_path / "empty.npz"), progress=False)
    with pytest.raises(DataError, match="empty"):
        prescribe(sigmoid_mlp, (np.zeros((0, 64)), np.zeros(0)), progress=False)
    with pytest.raises(DataError, match="expected 'digits', 'mnist1d', a path"):
        prescribe(sigmoid_mlp, 42, progress=False)
    with pytest.raises(ConfigError, match="steps=0; expected an integer >= 1"):
        prescribe(sigmoid_mlp, "digits", steps=0)
    with pytest.raises(ConfigError, match="unknown trial.*'swap'"):
        prescribe(sigmoid_mlp, "digits", trials=["swap"])
    with pytest.raises(ConfigError, match="optimizer='rmsprop'"):
        prescribe(sigmoid_mlp, "digits", optimizer="rmsprop")


def test_too_few_steps_is_an_explicit_finding():
    table = prescribe(lambda: sigmoid_mlp(depth=3, width=16), "digits", steps=2, trials=[], progress=False)
    assert [f.kind for f in table.findings] == ["not_enough_data"]
    assert table.findings[0].evidence["needed"] == 3 and table.rows == []


def test_cli_errors_are_one_line(factory_module, tmp_path):
    store = str(tmp_path / "runs.db")
    (tmp_path / "empty.csv").write_text("a,b,label\n")
    cases = [
        (["probe", "nosuch.mod:f"], "cannot import module 'nosuch.mod'"),
        (["probe", "usermodels:not_a_module"], "returned int; expected a torch.nn.Module"),
        (["probe", "usermodels:wrong_size"], "expects 100 features"),
        (["probe", "usermodels:deep_sigmoid", "--data", str(tmp_path / "empty.csv")], "has no data rows"),
        (["probe", "usermodels:deep_sigmoid", "--steps", "0"], "steps=0"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [*args, "--store", store])
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output.replace("\n", " ") and "Traceback" not in result.output


def test_cli_probe_json_and_rich(factory_module, tmp_path):
    store = str(tmp_path / "runs.db")
    args = ["probe", "usermodels:deep_sigmoid", "--steps", "30", "--store", store]
    result = runner.invoke(app, [*args, "--json", "--no-trials"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["run_id"] == 1 and payload["rows"] == [] and payload["steps"] == 30
    assert {f["kind"] for f in payload["findings"]} >= {"vanishing_gradients"}
    result = runner.invoke(app, [*args, "--workers", "1"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "vanishing gradients" in result.output and "what-if trials, 30 steps" in result.output
    assert "gradwatch show" in result.output
    show = runner.invoke(app, ["show", "probe-usermodels:deep_sigmoid-unchanged", "--store", store],
                         env={"COLUMNS": "160"})
    assert show.exit_code == 0 and "vanishing_gradients" in show.output


# --- the must-show: a 20-layer sigmoid MLP on digits --------------------------------------------


def lab_sigmoid20():
    return build_model(ModelConfig(depth=20, activation="sigmoid"), 64, 10)


@pytest.mark.integration
def test_a_seed_fix_wins_on_the_20_layer_sigmoid_mlp():
    table = prescribe(lab_sigmoid20, load_dataset("digits"), steps=200, workers=2, progress=False)
    assert isinstance(table, PrescriptionTable)  # its time: bench/wallclock.py
    top = table.rows[0]
    assert top.rank == 1 and top.name in SEED_FIXES, [(p.name, p.measurements.get("loss")) for p in table]
    assert top.measurements["loss"] < 0.25 * table.baseline.loss  # 2.3 unchanged
    assert table.best is top and top.measurements["improved"]
    assert "vanishing_gradients" in table.baseline.findings
    assert table.baseline.delta_ratio < 1e-12 and abs(np.log10(top.measurements["delta_ratio"])) < 2
    vanishing = next(f for f in table.findings if f.kind == "vanishing_gradients")
    assert vanishing.prescriptions[0].name == top.name and vanishing.prescriptions[0].verified
    # the changes that cannot help a vanishing gradient do not
    rows = {p.name: p for p in table.rows}
    assert not rows["clip_grad_norm"].measurements["improved"]
    assert not rows["lower_lr"].measurements["improved"]
