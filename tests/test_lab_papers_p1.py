"""Paper presets: Published rows beside ours (paper_table), per-entry data sets, the report
and the terminal table; the Shapeset-3x2 generator; glorot2010 and he2015 at reduced size.
"""

import json
import math
import statistics

import pytest
from typer.testing import CliRunner

from gradwatch.cli import app
from gradwatch.errors import ConfigError
from gradwatch.lab.models import ModelConfig
from gradwatch.lab.presets import (
    Claim,
    Preset,
    Published,
    TrainSettings,
    Verdict,
    grid_entry,
    paper_table,
)
from gradwatch.lab.runner import InProcessBackend, plan_tasks, run_lab
from gradwatch.store import RunStore

TRAIN = TrainSettings(epochs=1, every=5, lr=3e-3)


def _first_layer_std(summary, store):
    """A per-seed metric read from the store: the first hidden layer's output std at step 0."""
    out = []
    for rid in summary.run_ids:
        m = store.metrics(rid, layers=["hidden.0.linear"], metrics=["output_std"])
        out.append(float(m["output_std"].iloc[0]))
    return tuple(out)


def _paper_preset(**changes) -> Preset:
    fields = dict(
        name="paper-test", description="a tiny paper preset",
        grid=(grid_entry("g", "relu", ModelConfig(depth=2, width=16, activation="relu", init="he"), TRAIN),
              grid_entry("g", "relu-m1d", ModelConfig(depth=2, width=16, activation="relu", init="he"), TRAIN,
                         dataset="mnist1d")),
        claims=(Claim("learns", lambda s, st: Verdict(s["g/relu"].test_acc_mean > 0.3, "acc")),),
        seeds=2, paper="A. Author (2000), A paper.",
        published=(Published("g/relu", "test_error_pct", 12.5, "ReLU", "Table 1"),
                   Published("g/relu", "first_std", (0.5, 1.5), "ReLU std", "Fig. 2"),
                   Published(None, "test_error_pct", 6.43, "ReLU-110", "Table 6")),
        metrics={"first_std": _first_layer_std},
    )
    fields.update(changes)
    return Preset(**fields)


def test_published_rejects_bad_rows_with_advice():
    with pytest.raises(ConfigError, match="range"):
        Published("g/relu", "test_error_pct", (2.0, 1.0), "x")
    with pytest.raises(ConfigError, match="finite number"):
        Published("g/relu", "test_error_pct", math.nan, "x")
    with pytest.raises(ConfigError, match="known: test_error_pct, first_std"):
        _paper_preset(published=(Published("g/relu", "nope", 1.0, "x"),))
    with pytest.raises(ConfigError, match="'g/absent', which is not in the grid"):
        _paper_preset(published=(Published("g/absent", "test_error_pct", 1.0, "x"),))
    assert Published(None, "m", (0.82, 0.88), "w2").value_text() == "0.82-0.88"


def test_entry_dataset_overrides_the_lab_dataset(tmp_path):
    tasks = plan_tasks(_paper_preset(), dataset="digits", seeds=2, epochs=None, store=tmp_path / "s.db")
    assert [(t.entry.config_key, t.dataset) for t in tasks] == [
        ("g/relu", "digits"), ("g/relu", "digits"), ("g/relu-m1d", "mnist1d"), ("g/relu-m1d", "mnist1d")]


@pytest.fixture(scope="module")
def paper_lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper-lab")
    return run_lab(_paper_preset(), out=out, backend=InProcessBackend())


@pytest.mark.slow
def test_paper_table_puts_our_seeds_beside_the_published_numbers(paper_lab):
    result = paper_lab
    assert not result.failed, result.failed[0].error
    rows = result.paper_rows
    assert [r.published.label for r in rows] == ["ReLU", "ReLU std", "ReLU-110"]
    by_key = {s.config_key: s for s in result.summaries}
    accs = by_key["g/relu"].test_acc
    assert rows[0].values == pytest.approx(tuple(100 * (1 - a) for a in accs))
    assert rows[0].n == 2 and rows[0].mean == pytest.approx(100 * (1 - sum(accs) / 2))
    with RunStore(result.store) as store:
        assert rows[1].values == pytest.approx(_first_layer_std(by_key["g/relu"], store))
        assert paper_table(result.preset, result.summaries, store)[1].values == rows[1].values
    assert rows[2].values == () and rows[2].cells()[1:] == ("(reference only)", "-", "ReLU-110", "6.43")
    with RunStore(result.store) as store:
        configs = {s.config_key: store.run(s.run_ids[0])["config"]["dataset"] for s in result.summaries}
    assert configs == {"g/relu": "digits", "g/relu-m1d": "mnist1d"}
    lab = json.loads((result.out / "lab.json").read_text())
    assert lab["dataset"] == "digits, mnist1d"
    assert lab["paper"]["citation"] == "A. Author (2000), A paper."
    assert [r["published"] for r in lab["paper"]["table"]] == ["12.5", "0.5-1.5", "6.43"]
    assert lab["paper"]["table"][0]["mean"] == pytest.approx(rows[0].mean)


@pytest.mark.slow
def test_resume_keeps_the_entry_dataset(paper_lab):
    again = run_lab(_paper_preset(), out=paper_lab.out, backend=InProcessBackend())
    assert again.ran == 0 and again.resumed == 4


@pytest.mark.slow
def test_terminal_summary_and_report_show_the_paper_table(paper_lab, monkeypatch):
    from gradwatch.lab import presets

    monkeypatch.setitem(presets.PRESETS, "paper-test", _paper_preset())
    result = CliRunner().invoke(app, ["lab", "--preset", "paper-test", "--out", str(paper_lab.out),
                                      "--workers", "1"], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    ours = paper_lab.paper_rows[0].ours_text()
    assert "beside the paper" in result.output and "ReLU-110" in result.output and ours in result.output
    page = (paper_lab.out / "report.html").read_text()  # the lab's report, as `gradwatch lab` wrote it
    assert "Beside the paper" in page and "A. Author (2000), A paper." in page
    assert ours in page and "ReLU-110" in page and "6.43" in page
    assert "What the lab checked" in page


# --- Shapeset-3x2 ----------------------------------------------------------------------------


def test_shapeset_is_deterministic_and_balanced():
    import numpy as np

    from gradwatch.lab.shapeset import SHAPESET_CLASSES, make_shapeset

    x, y = make_shapeset(3000, seed=7)  # its time: bench/wallclock.py
    assert x.shape == (3000, 1, 32, 32) and x.dtype == np.float32 and y.dtype == np.int64
    assert len(SHAPESET_CLASSES) == 9 and set(np.unique(y)) == set(range(9))
    counts = np.bincount(y, minlength=9)
    assert counts.min() > 3000 / 9 * 0.8 and counts.max() < 3000 / 9 * 1.2
    assert 0.0 <= x.min() and x.max() <= 1.0
    again, y_again = make_shapeset(3000, seed=7)
    assert np.array_equal(x, again) and np.array_equal(y, y_again)
    assert not np.array_equal(x, make_shapeset(3000, seed=8)[0])


def test_shapeset_images_hold_one_or_two_visible_shapes():
    """A single-shape image has two grey levels (background, shape), a two-shape one three
    (unless both shapes drew the same grey); every shape differs from the background by at
    least MIN_CONTRAST and covers a plausible share of the image.
    """
    import numpy as np

    from gradwatch.lab.shapeset import MIN_CONTRAST, make_shapeset

    x, y = make_shapeset(900, seed=3)
    flat = x.reshape(len(x), -1)
    levels = np.array([np.unique(img).size for img in flat])
    assert (levels[y < 3] == 2).all()
    assert np.mean(levels[y >= 3] == 3) > 0.95
    background = np.array([np.bincount(np.unique(img, return_inverse=True)[1]).argmax() for img in flat])
    greys = [np.unique(img) for img in flat]
    for grey, bg in zip(greys[:100], background[:100], strict=True):
        shapes = np.delete(grey, bg)
        assert (np.abs(shapes - grey[bg]) >= MIN_CONTRAST - 1e-6).all()
    share = np.array([np.mean(img != g[b]) for img, g, b in zip(flat, greys, background, strict=True)])
    assert 0.03 < np.median(share[y < 3]) < 0.4
    assert np.median(share[y >= 3]) > np.median(share[y < 3])  # two shapes cover more


def test_load_dataset_knows_shapeset():
    from gradwatch.lab.data import BUILTIN_DATASETS, BUILTIN_INPUT_SHAPES, load_dataset

    assert "shapeset" in BUILTIN_DATASETS
    data = load_dataset("shapeset", seed=2)
    assert data.input_shape == BUILTIN_INPUT_SHAPES["shapeset"] == (1, 32, 32)
    assert data.n_classes == 9 and data.n_train + data.n_test == 20000
    assert abs(float(data.x_train.mean())) < 1e-3  # standardised per pixel on the train split


def test_make_shapeset_rejects_bad_arguments():
    from gradwatch.lab.shapeset import make_shapeset

    with pytest.raises(ConfigError, match="num_samples=0; expected an integer >= 1"):
        make_shapeset(0)
    with pytest.raises(ConfigError, match="size=4"):
        make_shapeset(10, size=4)


# --- the presets at reduced size ---------------------------------------------------------------


@pytest.fixture(scope="module")
def glorot_small(tmp_path_factory):
    """glorot2010 on MNIST-1D only, width 64, 3 epochs, 2 seeds (the full preset: both data
    sets, width 256, 3 seeds)."""
    from gradwatch.lab.papers.glorot2010 import glorot2010_preset

    preset = glorot2010_preset(
        width=64, datasets=("mnist1d",), seeds=2, name="glorot2010-small",
        train={"mnist1d": TrainSettings(optimizer="sgd", lr=0.1, epochs=3, batch_size=32, every=50)})
    return run_lab(preset, out=tmp_path_factory.mktemp("glorot"), backend=InProcessBackend(), vectorize=True)


@pytest.mark.slow
def test_glorot2010_small_shows_the_variance_story(glorot_small):
    result = glorot_small
    assert not result.failed and result.seeds == 2
    rows = {(r.metric, r.config_key): r for r in result.paper_rows}
    assert len(rows) == 9  # 5 published test errors + 2 x 2 variance factors (tanh, tanh N)
    standard = rows["backprop_var_factor", "mnist1d/tanh"]
    normalised = rows["backprop_var_factor", "mnist1d/tanh-n"]
    # eq. 13-14: n Var(W) = 1/3 per layer with the standard init, times E[tanh'^2] < 1
    assert standard.n == 2 and 0.2 <= standard.mean <= 0.4
    assert normalised.mean >= 1.5 * standard.mean  # far less shrinkage (level in the paper)
    for key in ("mnist1d/tanh", "mnist1d/tanh-n"):  # weight gradients stay level with both
        assert 0.7 <= rows["weight_grad_var_factor", key].mean <= 1 / 0.7
    verdicts = {text.split(" ")[0]: v for text, v in result.claims}
    assert verdicts["sigmoid"].held, verdicts["sigmoid"].evidence  # stuck at chance with SGD
    assert rows["test_error_pct", "mnist1d/sigmoid"].mean > 85  # 10 classes: chance is 90%


@pytest.fixture(scope="module")
def he_small(tmp_path_factory):
    """he2015 at depths 8 and 20, width 64, 20 epochs, 2 seeds (the full preset: 22 and 30
    layers, width 128, 100 epochs, 3 seeds)."""
    from gradwatch.lab.papers.he2015 import TRAIN, he2015_preset

    preset = he2015_preset(depths=(8, 20), width=64, seeds=2, name="he2015-small",
                           train=TrainSettings(optimizer=TRAIN.optimizer, lr=TRAIN.lr,
                                               momentum=TRAIN.momentum, epochs=20,
                                               batch_size=TRAIN.batch_size, every=10))
    return run_lab(preset, out=tmp_path_factory.mktemp("he"), backend=InProcessBackend(), vectorize=True)


@pytest.mark.slow
def test_he2015_small_xavier_halves_the_signal_per_layer(he_small):
    result = he_small
    assert not result.failed
    rows = {r.config_key: r for r in result.paper_rows if r.metric == "signal_ratio"}
    for depth in (8, 20):
        xavier, he = rows[f"depth{depth}/xavier"], rows[f"depth{depth}/he"]
        exponent = statistics.fmean(math.log2(v) for v in xavier.values)
        assert abs(exponent + (depth - 1) / 2) <= 0.15 * (depth - 1) / 2  # 2^(-(L-1)/2), +-15%
        assert xavier.published.value == pytest.approx(2 ** (-(depth - 1) / 2))
        assert all(0.25 <= v <= 4 for v in he.values)  # He keeps it level
    # all three claims hold at this size too: He trains at 20 layers and Xavier never reaches
    # 50%; at 8 layers both do, He first; the signal law
    assert len(result.claims) == 3
    for text, verdict in result.claims:
        assert verdict.held, f"{text}: {verdict.evidence}"
    by_key = {s.config_key: s for s in result.summaries}
    assert by_key["depth20/xavier"].test_acc_mean < 0.5 < 0.8 < by_key["depth20/he"].test_acc_mean
    assert by_key["depth20/xavier"].main_finding == "vanishing gradients"
