"""Presets as data, their claims, and the seed preset's "Must show" at reduced sizes.

The reduced runs use the seed preset's own grid entries and claim functions, with fewer
epochs (and, where only initialisation matters, one epoch with only step 0 logged),
run in this process so that no worker start-up is paid.
"""

import json
import math
from dataclasses import replace

import pytest

from gradwatch.errors import ConfigError
from gradwatch.lab.models import ModelConfig
from gradwatch.lab.presets import (
    PRESETS,
    Claim,
    ConfigSummary,
    Preset,
    TrainSettings,
    Verdict,
    fit_log_ratio_vs_depth,
    get_preset,
    grid_entry,
    load_preset_file,
    register_preset,
)
from gradwatch.lab.runner import InProcessBackend, run_lab
from gradwatch.store import RunStore

SEED = get_preset("seed")
DEPTHS = (2, 5, 10, 20)
ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu")
FIXES = ("relu-he", "leaky_relu-he", "sigmoid-batchnorm", "sigmoid-residual", "sigmoid-d3", "tanh-xavier")
BASELINE = "depth/sigmoid-d20-default"


def _claim(words: str) -> Claim:
    (claim,) = [c for c in SEED.claims if words in c.text]
    return claim


def _reduced(keys, claims, *, epochs, every=1000, seeds=2) -> Preset:
    """The seed preset's entries ``keys`` trained ``epochs`` epochs, with some of its claims."""
    grid = tuple(replace(SEED.entry(k), train=replace(SEED.entry(k).train, epochs=epochs, every=every))
                 for k in keys)
    return Preset("seed-reduced", "seed preset, reduced", grid, tuple(claims), seeds=seeds)


def _run(preset: Preset, tmp_path):
    return run_lab(preset, out=tmp_path / "lab", backend=InProcessBackend())


def _verdict(result, claim: Claim) -> Verdict:
    return dict(result.claims)[claim.text]


# --- the seed preset covers the seeds' story ------------------------------------------------


def test_seed_preset_covers_the_story():
    keys = {e.config_key: e for e in SEED.grid}
    for act in ACTIVATIONS:
        for depth in DEPTHS:
            m = keys[f"depth/{act}-d{depth}-default"].model
            assert (m.activation, m.depth, m.init, m.batch_norm, m.residual) == (act, depth, "default", False,
                                                                                 False)
    fixes = {k.split("/")[1]: e.model for k, e in keys.items() if e.section == "fixes"}
    assert set(fixes) == set(FIXES)
    assert fixes["relu-he"].init == fixes["leaky_relu-he"].init == "he"
    assert fixes["sigmoid-batchnorm"].batch_norm and fixes["sigmoid-residual"].residual
    assert fixes["sigmoid-d3"].depth == 3 and fixes["tanh-xavier"].init == "xavier"
    assert all(m.depth == 20 for name, m in fixes.items() if name != "sigmoid-d3")
    # half-fixes: ReLU at PyTorch's default init (the depth sweep's) and sigmoid with Xavier
    assert keys["depth/relu-d20-default"].model.init == "default"
    assert keys["half-fixes/sigmoid-xavier"].model.init == "xavier"
    (explode,) = [e for e in SEED.grid if e.section == "exploding"]
    assert explode.model.init == "scaled" and explode.model.sigma_w2 > 2.0  # ReLU's critical 2
    relu, leaky = (keys[f"dying-relu/{a}-narrow"] for a in ("relu", "leaky_relu"))
    assert relu.model.width <= 16 and replace(relu.model, activation="leaky_relu") == leaky.model
    assert SEED.seeds >= 3 and SEED.dataset == "digits"
    assert all(e.train.optimizer == "adam" for e in SEED.grid)  # the optimizer is part of the config
    assert len(SEED.claims) >= 6


def test_registry_and_unknown_preset():
    assert PRESETS["seed"] is SEED
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; valid: seed"):
        get_preset("nope")
    with pytest.raises(ConfigError, match="a preset named 'seed' exists"):
        register_preset(SEED)


def _entry(name="a", **model):
    return grid_entry("s", name, ModelConfig(**{"depth": 2, **model}), TrainSettings())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"optimizer": "rmsprop"}, "optimizer='rmsprop'; expected one of adam, sgd",
                     id="optimizer"),
        pytest.param({"lr": 0.0}, r"lr=0.0; expected a finite number > 0", id="lr-zero"),
        pytest.param({"lr": math.nan}, r"lr=nan", id="lr-nan"),
        pytest.param({"momentum": 1.0}, r"momentum=1.0; expected a number in \[0, 1\)", id="momentum"),
        pytest.param({"epochs": 0}, r"epochs=0; expected an integer >= 1", id="epochs"),
        pytest.param({"batch_size": 0}, r"batch_size=0", id="batch"),
        pytest.param({"every": 0}, r"every=0", id="every"),
    ],
)
def test_train_settings_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainSettings(**kwargs)


def test_preset_errors():
    with pytest.raises(ConfigError, match="empty grid"):
        Preset("p", "d", ())
    with pytest.raises(ConfigError, match="repeats config key"):
        Preset("p", "d", (_entry(), _entry()))
    with pytest.raises(ConfigError, match="seeds=0"):
        Preset("p", "d", (_entry(),), seeds=0)
    with pytest.raises(ConfigError, match="no config 's/zz'"):
        Preset("p", "d", (_entry(),)).entry("s/zz")


def _write(tmp_path, data, name="grid.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_preset_file(tmp_path):
    grid = [{"section": "x", "name": "relu", "model": {"depth": 4, "activation": "relu"},
             "train": {"lr": 0.01}},
            {"name": "tanh", "model": {"depth": 4, "activation": "tanh"}}]
    path = _write(tmp_path, {"name": "mine", "seeds": 2, "train": {"epochs": 3}, "grid": grid})
    preset = get_preset(str(path))
    assert preset.name == "mine" and preset.seeds == 2 and not preset.claims
    assert [e.config_key for e in preset.grid] == ["x/relu", "grid/tanh"]
    assert preset.grid[0].train == TrainSettings(epochs=3, lr=0.01)
    assert preset.grid[1].label == "tanh depth 4, default init"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        pytest.param({"activation": "swishy"}, "unknown activation 'swishy'; known:", id="activation"),
        pytest.param({"init": "lecun"}, "init='lecun' is not a known initialisation", id="init"),
        pytest.param({"depth": 0}, r"depth=0; expected an integer >= 1", id="depth"),
        pytest.param({"width": 0}, r"width=0; expected an integer >= 1", id="width"),
        pytest.param({"colour": "red"}, "unknown model config field", id="field"),
    ],
)
def test_preset_file_bad_model(tmp_path, model, message):
    path = _write(tmp_path, {"grid": [{"name": "bad", "model": {"depth": 3, **model}}]})
    with pytest.raises(ConfigError, match=rf"grid\[0\] \(bad\), model: .*{message}"):
        load_preset_file(path)


def test_preset_file_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="cannot read preset file"):
        load_preset_file(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_preset_file(_write(tmp_path, "{grid: ["))
    with pytest.raises(ConfigError, match="unknown train field"):
        load_preset_file(_write(tmp_path, {"train": {"epoch": 3}, "grid": []}))


# --- claims are pure functions of the summaries ----------------------------------------------


def test_fit_recovers_an_exponential():
    factor, r2 = fit_log_ratio_vs_depth([(d, 0.2 ** (d - 1)) for d in DEPTHS])
    assert factor == pytest.approx(0.2) and r2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two depths"):
        fit_log_ratio_vs_depth([(5, 0.1), (5, 0.0)])


def _summary(key, acc, ratio=1.0, *, nonfinite=False, dead=0.0, finding="no problem found", n=3):
    return ConfigSummary(SEED.entry(key), tuple(range(n)), tuple(range(n)), (acc,) * n, (ratio,) * n,
                         (nonfinite,) * n, (dead,) * n, (finding,) * n)


def test_fix_claim_names_the_fix_that_falls_short():
    claim = _claim("each fix beats")
    good = {f"fixes/{n}": _summary(f"fixes/{n}", 0.9) for n in FIXES} | {BASELINE: _summary(BASELINE, 0.1)}
    assert claim.check(good, None).held
    bad = good | {"fixes/sigmoid-d3": _summary("fixes/sigmoid-d3", 0.35)}
    verdict = claim.check(bad, None)
    assert not verdict.held and "sigmoid depth 3, default init 35% (+25 pts, FALLS SHORT)" in verdict.evidence


def test_exploding_claim_needs_the_run_to_say_so():
    claim, key = _claim("too large an initialisation"), "exploding/relu-scaled8"
    assert claim.check({key: _summary(key, 0.2, 5e4, finding="exploding gradients")}, None).held
    assert not claim.check({key: _summary(key, 0.2, 5e4, finding="no problem found")}, None).held
    assert claim.check({key: _summary(key, 0.1, 2.0, nonfinite=True, finding="non-finite values")}, None).held
    assert not claim.check({key: _summary(key, 0.2, 3.0, finding="exploding gradients")}, None).held


# --- Must show, measured at reduced sizes ---------------------------------------------------


def test_sigmoid_delta_decays_exponentially_with_depth(tmp_path):
    """Only the initialisation matters: one epoch, only step 0 logged."""
    keys = [f"depth/{a}-d{d}-default" for a in ACTIVATIONS for d in DEPTHS]
    linear, fastest = _claim("falls linearly with depth"), _claim("shrinks fastest")
    result = _run(_reduced(keys, [linear, fastest], epochs=1), tmp_path)
    sums = {s.config_key: s for s in result.summaries}
    points = [(d, r) for d in DEPTHS for r in sums[f"depth/sigmoid-d{d}-default"].delta_ratio]
    factor, r2 = fit_log_ratio_vs_depth(points)
    assert r2 >= 0.9 and factor <= 0.25, (factor, r2)
    assert _verdict(result, linear).held and _verdict(result, fastest).held
    assert sums[BASELINE].delta_ratio_mean < 1e-10  # 19 sigmoid layers


def test_relu_he_keeps_the_delta_level_at_depth_20(tmp_path):
    claim = _claim("ReLU with He init")
    result = _run(_reduced(["fixes/relu-he"], [claim], epochs=1, seeds=3), tmp_path)
    (s,) = result.summaries
    assert all(0.1 <= r <= 10 for r in s.delta_ratio), s.delta_ratio
    assert _verdict(result, claim).held


def test_too_large_init_explodes_and_the_run_says_so(tmp_path):
    claim = _claim("too large an initialisation")
    result = _run(_reduced(["exploding/relu-scaled8"], [claim], epochs=1, every=5), tmp_path)
    (s,) = result.summaries
    assert all(r > 10 for r in s.delta_ratio) or s.any_nonfinite
    assert "exploding" in s.main_finding and _verdict(result, claim).held
    with RunStore(result.store) as store:
        kinds = set(store.findings(s.run_ids[0])["kind"])
    assert kinds == set() or "exploding_gradients" in kinds  # empty only without gradwatch.diagnose


@pytest.mark.slow
def test_each_fix_beats_the_sigmoid_baseline_and_half_fixes_fall_short(tmp_path):
    """Four epochs (of the preset's five) and two seeds hold every margin with room to spare."""
    keys = [BASELINE, *(f"fixes/{n}" for n in FIXES), "depth/relu-d20-default", "half-fixes/sigmoid-xavier"]
    fixes, halves = _claim("each fix beats"), _claim("half-fixes")
    result = _run(_reduced(keys, [fixes, halves], epochs=4), tmp_path)
    sums = {s.config_key: s for s in result.summaries}
    base = sums[BASELINE].test_acc_mean
    assert base < 0.2
    for name in FIXES:
        assert sums[f"fixes/{name}"].test_acc_mean - base >= 0.30, (name, sums[f"fixes/{name}"].test_acc)
    assert _verdict(result, fixes).held
    verdict = _verdict(result, halves)
    assert verdict.held and verdict.evidence.count("does NOT beat the baseline") == 2


@pytest.mark.slow
def test_dying_relu_beside_leaky_relu(tmp_path):
    claim = _claim("dead units")
    keys = ["dying-relu/relu-narrow", "dying-relu/leaky_relu-narrow"]
    result = _run(_reduced(keys, [claim], epochs=SEED.entry(keys[0]).train.epochs, every=5, seeds=3),
                  tmp_path)
    relu, leaky = result.summaries
    assert relu.dead_frac_mean >= 0.3 and leaky.dead_frac_mean == 0.0
    assert _verdict(result, claim).held
