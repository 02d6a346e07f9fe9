"""The meanfield preset (depth x sigma_w2 for tanh), its claims, and its report figure.

The claims are checked on made-up accuracies (numbers known in advance); one tiny grid
(2 sigma_w2 x 2 depths, 1 seed, 1 epoch) runs in this process for the lab.json and the
report's section.
"""

import json
from dataclasses import replace

import pytest
import torch
from matplotlib.figure import Figure

from gradwatch import report as rp
from gradwatch.lab.presets import (
    MEANFIELD_SIGMA_B2,
    PRESETS,
    ConfigSummary,
    get_preset,
    meanfield_key,
    meanfield_preset,
)
from gradwatch.lab.runner import InProcessBackend, run_lab
from gradwatch.theory import critical_sigma_w2, predict

MEANFIELD = get_preset("meanfield")


def test_meanfield_preset_is_a_tanh_scaled_grid():
    assert PRESETS["meanfield"] is MEANFIELD
    models = [e.model for e in MEANFIELD.grid]
    w2s, depths = sorted({m.sigma_w2 for m in models}), sorted({m.depth for m in models})
    assert len(w2s) >= 6 and len(depths) >= 4 and len(models) == len(w2s) * len(depths)
    assert w2s[0] <= 0.5 and w2s[-1] >= 4.0
    assert w2s[0] < critical_sigma_w2("tanh", MEANFIELD_SIGMA_B2) < w2s[-1]
    assert all((m.activation, m.init, m.sigma_b2, m.batch_norm, m.residual)
               == ("tanh", "scaled", MEANFIELD_SIGMA_B2, False, False) for m in models)
    assert MEANFIELD.entry(meanfield_key(1.5, 20)).model.depth == 20
    assert MEANFIELD.seeds >= 2 and len(MEANFIELD.claims) == 3
    assert all(e.train.epochs <= 3 for e in MEANFIELD.grid)  # short training


def _summaries(accuracy) -> dict[str, ConfigSummary]:
    """One made-up summary per cell of the full grid, accuracy(depth, 6 xi_c) for each."""
    out = {}
    for e in MEANFIELD.grid:
        limit = predict("tanh", e.model.sigma_w2, e.model.sigma_b2).trainable_depth
        out[e.config_key] = ConfigSummary(e, (1,), (0,), (accuracy(e.model.depth, limit),), (1.0,),
                                          (False,), (0.0,), ("none",))
    return out


def _verdicts(summaries):
    return [c.check(summaries, None) for c in MEANFIELD.claims]


def test_claims_hold_when_the_curve_separates_and_fail_when_it_does_not():
    as_theory = _summaries(lambda depth, limit: 0.9 if depth <= limit else 0.1)
    assert all(v.held for v in _verdicts(as_theory))
    beyond, agree, best = _verdicts(as_theory)
    assert "configurations deeper than 6 xi_c end below 30%" in beyond.evidence
    assert "disagree: none" in agree.evidence and "critical 1.76" in best.evidence

    everything_trains = _summaries(lambda depth, limit: 0.9)
    beyond, agree, _ = _verdicts(everything_trains)
    assert not beyond.held and not agree.held
    assert "trained anyway: sigma_w2 0.5 depth 10 (90%, 6 xi_c 7)" in beyond.evidence

    # the deepest row trains best far from the edge of chaos: not held
    far = _summaries(lambda depth, limit: 0.1 + 0.8 * (depth == 60) * (limit < 50))
    assert not _verdicts(far)[2].held


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
    train = replace(MEANFIELD.grid[0].train, epochs=1, every=1000)
    preset = meanfield_preset(sigma_w2=(1.0, 1.76), depths=(3, 6), train=train, seeds=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_lab(preset, out=tmp_path_factory.mktemp("meanfield"), backend=InProcessBackend())
    finally:
        torch.set_num_threads(threads)
    return result


def test_tiny_grid_writes_lab_json_and_the_report_section(tiny_lab, tmp_path, monkeypatch):
    lab = json.loads((tiny_lab.out / "lab.json").read_text())
    assert lab["preset"] == "meanfield" and len(lab["configs"]) == 4
    assert [c["claim"] for c in lab["claims"]] == [c.text for c in MEANFIELD.claims]
    assert all(c["evidence"] for c in lab["claims"])
    # the other figures have their own tests; drawing them here would triple this test's time
    shown = [s for s in rp.html.SECTIONS if s.anchor in ("loss", "meanfield")]
    monkeypatch.setattr(rp.html, "SECTIONS", shown)
    page = rp.report(lab_dir=tiny_lab.out, out=tmp_path / "report.html").read_text()
    assert "id='meanfield'" in page and "10. Trainability over depth and σw²" in page
    assert "At depth 6 the best σw² is" in page


def test_meanfield_figure_draws_the_curve_and_the_critical_line(tiny_lab):
    data = rp.load(lab_dir=tiny_lab.out)
    fig = rp.meanfield_figure(data)
    assert isinstance(fig, Figure)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "6 ξ_c (mean-field theory)" in labels
    assert any(label.startswith("χ₁ = 1 (σw² = 1.76") for label in labels)
    cells = [t.get_text() for t in fig.axes[0].texts]
    assert len(cells) == 4 and all(c.isdigit() for c in cells)

    one_depth = replace(data, runs=[r for r in data.runs if r.model["depth"] == 3])
    with pytest.raises(rp.NothingToPlot, match="no depth x sigma_w2 grid"):
        rp.meanfield_figure(one_depth)
