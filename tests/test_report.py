"""The report: figures, the HTML page (checked in headless Chromium), scale and errors."""

from __future__ import annotations

import io
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import chrome as _chrome
from matplotlib.figure import Figure
from torch import nn
from typer.testing import CliRunner

import gradwatch
from gradwatch import report as rp
from gradwatch.cli import app
from gradwatch.errors import ConfigError, RunNotFoundError, StoreError
from gradwatch.report import verdicts
from gradwatch.store import RunStore

XSS_NAME = "<script>alert(1)</script>"
XSS_LABEL = "<b>bold</b> & $\\frac{1}{0}$"
XSS_CONFIG = "<img src=x onerror=\"document.title='pwned'\">"
SECTIONS = [
    "activations",
    "gradient-per-layer",
    "heatmap",
    "loss",
    "weights",
    "activation-regions",
    "fixes",
    "findings",
    "theory",
]


# --- a small lab, trained for real ----------------------------------------------------------


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def _mlp(activation: str, depth: int, init: str, batch_norm: bool, width: int = 32) -> nn.Module:
    make = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    layers: list[nn.Module] = []
    n = 64
    for _ in range(depth):
        linear = nn.Linear(n, width)
        if init == "he":
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers += [linear, *([nn.BatchNorm1d(width)] if batch_norm else []), make()]
        n = width
    return nn.Sequential(*layers, nn.Linear(n, 10))


def _train(
    store,
    data,
    *,
    section,
    activation,
    depth,
    init,
    seed,
    batch_norm=False,
    name=None,
    label=None,
    epochs=3,
    extra=None,
):
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = _mlp(activation, depth, init, batch_norm)
    key = f"{section}/{activation}-d{depth}-{init}{'-bn' if batch_norm else ''}"
    label = label or f"{activation}, depth {depth}, {init} init{', batch norm' if batch_norm else ''}"
    config = {
        "lab": {"preset": "test", "section": section, "label": label, "config_key": key, "seed": seed},
        "model": {
            "kind": "mlp",
            "depth": depth,
            "width": 32,
            "activation": activation,
            "init": init,
            "batch_norm": batch_norm,
            "residual": False,
            **(extra or {}),
        },
        "train": {"optimizer": "sgd", "lr": 0.1, "epochs": epochs, "batch_size": 64},
        "dataset": "digits",
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    with gradwatch.watch(model, opt, every=2, store=store, run_name=name or key, config=config) as w:
        for epoch in range(1, epochs + 1):
            losses = []
            for idx in torch.randperm(len(x), generator=g).split(64):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                w.log(loss=loss)
                losses.append(loss.item())
            model.eval()
            with torch.no_grad():
                out = model(xt)
            model.train()
            acc = (out.argmax(1) == yt).float().mean().item()
            test_loss = nn.functional.cross_entropy(out, yt).item()
            w.log(epoch=epoch, train_loss=float(np.mean(losses)), test_loss=test_loss, test_acc=acc)
    return w.run_id, key, label, section


def _fake_theory():
    """A stand-in for gradwatch.theory: chi_1 = sigma_w2 * E[phi'^2] with E[phi'^2] guessed."""
    module = types.ModuleType("gradwatch.theory")

    def predicted_delta_profile(activation, sigma_w2, sigma_b2, depth):
        slope = {"sigmoid": 0.04, "tanh": 0.6, "relu": 0.5}.get(getattr(activation, "name", activation), 0.5)
        chi1 = sigma_w2 * slope
        return np.sqrt(chi1) ** np.arange(depth - 1, -1, -1)

    module.predicted_delta_profile = predicted_delta_profile
    return module


def build_lab(out):
    """A lab output directory: gradwatch.db with 7 runs and a hand-written lab.json."""
    data = _digits()
    store = RunStore(out / "gradwatch.db")
    runs = []
    for seed in (0, 1):
        runs.append(
            _train(store, data, section="depth", activation="sigmoid", depth=8, init="default", seed=seed)
        )
        runs.append(_train(store, data, section="fixes", activation="relu", depth=8, init="he", seed=seed))
        runs.append(
            _train(
                store,
                data,
                section="fixes",
                activation="sigmoid",
                depth=8,
                init="default",
                batch_norm=True,
                seed=seed,
            )
        )
    runs.append(
        _train(
            store,
            data,
            section="names",
            activation="tanh",
            depth=2,
            init="scaled",
            seed=0,
            name=XSS_NAME,
            label=XSS_LABEL,
            extra={"sigma_w2": 1.5, "sigma_b2": 0.05, "note": XSS_CONFIG},
        )
    )
    store.add_findings(
        runs[0][0],
        [
            {
                "kind": "vanishing_gradients",
                "severity": "warning",
                "first_step": 0,
                "last_step": 60,
                "layers": ["0", "<i>layer</i>"],
                "evidence": {"first_last_ratio": 1e-6, "note": "<u>u</u>"},
                "explanation": "the delta falls 1,000x <script>window.bad = 1</script>",
                "prescriptions": [
                    {
                        "name": "relu_he",
                        "description": "use ReLU with He init",
                        "rank": 1,
                        "rationale": "ReLU's derivative is 1 where it is green",
                        "verified": True,
                        "applicable": True,
                        "reason": "",
                        "measurements": {"loss": 0.31, "delta_ratio": 0.2},
                    },
                    {
                        "name": "residual",
                        "description": "add residual connections",
                        "rank": 0,
                        "applicable": False,
                        "reason": "<blocks> differ in width",
                        "measurements": {},
                    },
                    "add batch norm",
                ],
            }
        ],
    )
    store.close()
    with gradwatch.open_store(out / "gradwatch.db") as st:
        configs = {}
        for run_id, key, label, section in runs:
            c = configs.setdefault(
                key,
                {
                    "config_key": key,
                    "section": section,
                    "label": label,
                    "run_ids": [],
                    "accs": [],
                    "ratios": [],
                },
            )
            c["run_ids"].append(run_id)
            c["accs"].append(float(st.scalars(run_id)["test_acc"].dropna().iloc[-1]))
            m = st.metrics(run_id)
            p = m[(m["kind"] == "param") & (m["step"] == m["step"].min())]
            c["ratios"].append(float(p["delta_rms"].iloc[0] / p["delta_rms"].iloc[-1]))
    lab_json = {
        "preset": "test",
        "description": "A tiny lab <em>for tests</em>.",
        "dataset": "digits",
        "seeds": 2,
        "epochs": 3,
        "store": "gradwatch.db",
        "configs": [
            {k: v for k, v in c.items() if k not in ("accs", "ratios")}
            | {
                "test_acc_mean": float(np.mean(c["accs"])),
                "test_acc_std": float(np.std(c["accs"])),
                "delta_ratio_mean": float(np.mean(c["ratios"])),
                "delta_ratio_std": float(np.std(c["ratios"])),
                "main_finding": "vanishing gradients" if "sigmoid" in k else "none",
            }
            for k, c in configs.items()
        ],
        "claims": [
            {
                "claim": "sigmoid's first/last delta falls with depth",
                "held": True,
                "evidence": "ratio < 1e-3 <b>x</b>",
            }
        ],
    }
    (out / "lab.json").write_text(json.dumps(lab_json))
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and much faster on a busy machine
    try:
        return build_lab(tmp_path_factory.mktemp("lab"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def with_theory():
    """The real gradwatch.theory where it is importable, else the stand-in."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        if verdicts.theory_module() is None:
            monkeypatch.setitem(sys.modules, "gradwatch.theory", _fake_theory())
        yield


@pytest.fixture(scope="module")
def page(lab, with_theory, tmp_path_factory):
    """The lab's report, written once for the tests that read it."""
    return rp.report(lab_dir=lab, out=tmp_path_factory.mktemp("page") / "report.html")


# --- numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("sigmoid", [(-1.7627, 1.7627)], id="sigmoid |x| <= ln((1+sqrt.5)/(1-sqrt.5))"),
        pytest.param("tanh", [(-0.8814, 0.8814)], id="tanh |x| <= atanh(sqrt .5)"),
        pytest.param("relu", [(0.0, 6.0)], id="relu x > 0"),
    ],
)
def test_green_intervals_match_the_closed_forms(name, expected):
    x = np.linspace(-6, 6, 120001)
    got = rp.figures.green_intervals(gradwatch.get_activation(name), x)
    assert len(got) == len(expected)
    for (a, b), (ea, eb) in zip(got, expected, strict=True):
        assert a == pytest.approx(ea, abs=2e-4) and b == pytest.approx(eb, abs=2e-4)


def test_activations_figure_marks_the_bound_and_the_green_region():
    fig = rp.activations_figure()
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    sigmoid = fig.axes[0]
    assert any(np.allclose(line.get_ydata(), 0.25) for line in sigmoid.lines)  # the 0.25 bound
    assert any("0.25" in t.get_text() for t in sigmoid.texts)
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert all(name in titles for name in ("sigmoid", "tanh", "ReLU", "LeakyReLU"))


def test_load_reads_the_lab_and_computes_the_contract_delta_ratio(lab):
    data = rp.load(lab_dir=lab)
    lab_json = json.loads((lab / "lab.json").read_text())
    assert [r.id for r in data.runs] == [i for c in lab_json["configs"] for i in c["run_ids"]]
    with gradwatch.open_store(lab / "gradwatch.db") as st:
        for run in data.runs:
            m = st.metrics(run.id)
            p = m[(m["kind"] == "param") & (m["step"] == 0)]
            assert run.delta_ratio == pytest.approx(
                p["delta_rms"].iloc[0] / p["delta_rms"].iloc[-1], rel=1e-12
            )
    sigmoid = [r for r in data.runs if r.group == "depth/sigmoid-d8-default"]
    relu = [r for r in data.runs if r.group == "fixes/relu-d8-he"]
    assert max(r.delta_ratio for r in sigmoid) < 1e-3 < min(r.delta_ratio for r in relu)
    worst, contrast = data.featured
    assert worst.group == "depth/sigmoid-d8-default" and contrast.group != worst.group
    assert len(contrast.initial_profile) == len(worst.initial_profile)  # a contrast of the same depth


def test_fix_rows_from_runs_are_mean_and_std_over_seeds(lab):
    data = rp.load(lab / "gradwatch.db")  # no lab.json: grouped by the runs' config_key
    rows = verdicts.fix_rows(data).set_index("config_key")
    relu = [r for r in data.runs if r.group == "fixes/relu-d8-he"]
    accs = [r.final("test_acc") for r in relu]
    assert rows.loc["fixes/relu-d8-he", "n"] == 2
    assert rows.loc["fixes/relu-d8-he", "test_acc_mean"] == pytest.approx(np.mean(accs))
    assert rows.loc["fixes/relu-d8-he", "test_acc_std"] == pytest.approx(np.std(accs))
    lab_rows = verdicts.fix_rows(rp.load(lab_dir=lab)).set_index("config_key")
    assert lab_rows.loc["fixes/relu-d8-he", "test_acc_mean"] == pytest.approx(np.mean(accs))


def _synthetic_run(store, name, losses, config=None):
    run_id = store.create_run(name, config or {})
    store.add_layers(run_id, [(0, "fc1", "Linear", "param", None), (1, "fc2", "Linear", "param", None)])
    store.add_layer_metrics(
        run_id,
        [(s, lid, [1.0, 1.0, 1e-3, 10.0**-lid] + [None] * 6) for s in range(len(losses)) for lid in (0, 1)],
    )
    store.add_scalars(run_id, [(s, "loss", v) for s, v in enumerate(losses)])
    store.finish_run(run_id)
    return run_id


def test_flat_loss_is_detected_and_a_falling_one_is_not(store):
    flat = _synthetic_run(store, "flat", [2.30 + 0.01 * math.sin(i) for i in range(100)])
    falling = _synthetic_run(store, "falling", list(np.linspace(2.3, 0.3, 100)))
    data = rp.load(store)
    assert rp.figures.flat_loss_groups(data) == [f"run {flat}"]
    assert f"run {falling}" not in rp.figures.flat_loss_groups(data)


def test_many_configurations_are_drawn_one_row_per_lab_section(store):
    for i in range(14):
        section = "depth" if i < 8 else "fixes"
        lab = {"section": section, "config_key": f"{section}/{i}", "label": f"config {i}"}
        _synthetic_run(store, f"r{i}", list(np.linspace(2, 1, 20)), config={"lab": lab})
    data = rp.load(store)
    assert [(section, len(groups)) for section, groups in rp._plot.parts(data)] == [
        ("depth", 8),
        ("fixes", 6),
    ]
    fig = rp.gradient_per_layer_figure(data)
    assert len(fig.axes) == 4 and fig.axes[2].get_title().startswith("fixes: ")
    assert [len(ax.get_legend().get_texts()) for ax in (fig.axes[1], fig.axes[3])] == [8, 6]
    few = rp.load(store, runs=list(range(1, 13)))  # 12 configurations: one row, one legend
    assert rp._plot.parts(few)[0][0] == "" and len(rp.gradient_per_layer_figure(few).axes) == 2


def test_long_runs_are_thinned_keeping_first_and_last_step(store):
    _synthetic_run(store, "long", list(np.linspace(2, 1, 1000)))
    run = rp.load(store).runs[0]
    steps = sorted(run.metrics["step"].unique())
    assert len(steps) == rp.data.MAX_POINTS and steps[0] == 0 and steps[-1] == 999
    assert len(run.scalars) == 1000  # scalars are not thinned


# --- figures for notebooks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "gradient_per_layer_figure",
        "delta_heatmap_figure",
        "loss_figure",
        "weights_figure",
        "activation_regions_figure",
        "fixes_figure",
        "findings_figure",
        "theory_figure",
    ],
)
def test_every_figure_function_returns_a_figure(lab, with_theory, name):
    fig = getattr(rp, name)(rp.load(lab_dir=lab))
    assert isinstance(fig, Figure) and fig.axes


def test_figures_say_when_there_is_nothing_to_draw(store):
    _synthetic_run(store, "no activations, no findings", [1.0, 0.9, 0.8, 0.7])
    data = rp.load(store)
    with pytest.raises(rp.NothingToPlot, match="no run recorded activation layers"):
        rp.activation_regions_figure(data)
    with pytest.raises(rp.NothingToPlot, match="no findings are stored"):
        rp.findings_figure(data)
    with pytest.raises(rp.NothingToPlot, match="fewer than two configurations"):
        rp.fixes_figure(data)


def test_theory_is_skipped_cleanly_without_the_theory_module(lab, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradwatch.theory", types.ModuleType("gradwatch.theory"))
    data = rp.load(lab_dir=lab)
    with pytest.raises(rp.NothingToPlot, match="predicted_delta_profile is not available"):
        rp.theory_figure(data)
    monkeypatch.setattr(
        rp.html, "SECTIONS", [s for s in rp.html.SECTIONS if s.anchor in ("theory", "findings")]
    )
    text = rp.render(data)
    assert "id='theory'" not in text and "id='findings'" in text
    assert (
        "9. Theory beside measurement: gradwatch.theory with predicted_delta_profile is not available" in text
    )


def test_theory_covers_scaled_and_plain_inits_only():
    assert verdicts.init_variances({"init": "scaled", "sigma_w2": 1.5, "sigma_b2": 0.05}) == (1.5, 0.05)
    assert verdicts.init_variances({"init": "xavier"}) == (1.0, 0.0)
    assert verdicts.init_variances({"init": "default", "width": 64}) == pytest.approx((1 / 3, 1 / 192))
    assert verdicts.init_variances({"init": "scaled", "batch_norm": True}) is None
    assert verdicts.init_variances({"init": "scaled", "residual": True}) is None
    assert verdicts.init_variances({"init": "orthogonal"}) is None


# --- the page -----------------------------------------------------------------------------


def test_page_is_self_contained_escaped_and_has_every_section(page):
    text = page.read_text()
    for anchor in SECTIONS + ["claims", "runs"]:
        assert f"id='{anchor}'" in text, anchor
    assert "<script" not in text.lower() and "<img src=x" not in text  # only as &lt;...&gt; text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=" in text  # inside the run's config, as JSON
    assert "&lt;em&gt;for tests&lt;/em&gt;" in text and "&lt;i&gt;layer&lt;/i&gt;" in text
    assert "http://" not in text and "https://" not in text  # nothing fetched at view time
    assert text.count("<img src='data:image/png;base64,") == len(SECTIONS)
    assert text.count("<figcaption>") == len(SECTIONS)


def _pixels(png: bytes) -> np.ndarray:
    from matplotlib.image import imread

    return imread(io.BytesIO(png))[..., :3]


@pytest.mark.integration
def test_report_renders_in_headless_chromium(page, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    browser = _chrome(tmp_path, 1280, 2000)
    try:
        browser.get(page.as_uri())
        assert "gradwatch" in browser.title and browser.title != "pwned"
        for anchor in SECTIONS + ["claims", "runs"]:
            section = browser.find_element(By.ID, anchor)
            assert section.find_element(By.TAG_NAME, "h2").text
        assert browser.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0 && i.alt.length > 20)"
        )
        assert browser.find_elements(By.TAG_NAME, "script") == []
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert  # noqa: B018 - reading it raises when no alert is open
        text = browser.execute_script("return document.body.textContent")
        assert XSS_NAME in text and json.dumps(XSS_CONFIG) in text and "window.bad = 1" in text
        assert browser.execute_script("return window.bad === undefined")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 1280
        png = browser.get_screenshot_as_png()
        (tmp_path / "report-1280.png").write_bytes(png)
        pixels = _pixels(png)
        assert pixels.var() > 0.01  # a blank page has none
        assert (pixels.min(axis=2) < 0.9).mean() > 0.05  # some of it is ink, not background
        # a phone: nothing wider than the screen, figures scaled down
        browser.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True},
        )
        browser.get(page.as_uri())
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        # figures keep a legible size and scroll sideways inside their own box
        assert browser.execute_script(
            "return [...document.querySelectorAll('.figure-scroll')].every(box => box.clientWidth <= 390"
            " && box.scrollWidth >= 700 && box.querySelector('img').getBoundingClientRect().width >= 700)"
        )
        (tmp_path / "report-phone.png").write_bytes(browser.get_screenshot_as_png())
    finally:
        browser.quit()


# --- the command line and errors -----------------------------------------------------------------


def test_cli_passes_runs_store_and_out_to_report(monkeypatch, tmp_path):
    calls = []

    def fake(store, runs, lab_dir, out):
        calls.append((store, runs, lab_dir, out))
        out.write_text("<html></html>")
        return out

    monkeypatch.setattr("gradwatch.cli.report.write_report", fake)
    out = tmp_path / "two.html"
    result = CliRunner().invoke(app, ["report", "1", XSS_NAME, "--store", "s.db", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert calls == [(Path("s.db"), ["1", XSS_NAME], None, out)]


def test_cli_writes_the_report_of_a_lab(lab, with_theory, tmp_path):
    result = CliRunner().invoke(app, ["report", "--lab", str(lab), "--out", str(tmp_path / "lab.html")])
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output
    text = (tmp_path / "lab.html").read_text()
    assert "What the lab checked" in text and all(f"id='{a}'" in text for a in SECTIONS)


def _empty_store(tmp_path):
    RunStore(tmp_path / "empty.db").close()
    return tmp_path / "empty.db"


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        pytest.param(
            lambda lab, tmp: dict(store=lab / "gradwatch.db", runs=[999]),
            RunNotFoundError,
            r"no run 999 in .*latest runs: ",
            id="unknown run id",
        ),
        pytest.param(
            lambda lab, tmp: dict(store=lab / "gradwatch.db", runs=["no-such-name"]),
            RunNotFoundError,
            r"no run 'no-such-name'",
            id="unknown run name",
        ),
        pytest.param(
            lambda lab, tmp: dict(store=_empty_store(tmp)),
            StoreError,
            r"holds no runs yet; watch a training run",
            id="empty store",
        ),
        pytest.param(
            lambda lab, tmp: dict(store=tmp / "missing.db"),
            StoreError,
            r"no run store at",
            id="missing store",
        ),
        pytest.param(
            lambda lab, tmp: dict(lab_dir=tmp),
            ConfigError,
            r"no lab\.json in .*gradwatch lab",
            id="missing lab.json",
        ),
        pytest.param(
            lambda lab, tmp: dict(lab_dir=tmp / "nope"),
            ConfigError,
            r"lab directory .* does not exist",
            id="missing lab directory",
        ),
    ],
)
def test_errors_are_clear(lab, tmp_path, args, error, message):
    with pytest.raises(error, match=message):
        rp.report(**args(lab, tmp_path), out=tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_bad_lab_json_is_a_clear_error(tmp_path):
    (tmp_path / "lab.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not readable JSON"):
        rp.report(lab_dir=tmp_path)
    (tmp_path / "lab.json").write_text(json.dumps({"configs": []}))
    with RunStore(tmp_path / "gradwatch.db") as store:
        store.create_run("one")
    with pytest.raises(ConfigError, match="lists no run ids"):
        rp.report(lab_dir=tmp_path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["999"], "no run '999' in", id="unknown run"),
        pytest.param(["--lab", "{tmp}"], "no lab.json in", id="missing lab.json"),
        pytest.param(["--store", "{tmp}/empty.db"], "holds no runs yet", id="empty store"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(lab, tmp_path, argv, message):
    _empty_store(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--store" not in argv:
        argv += ["--store", str(lab / "gradwatch.db")]
    result = CliRunner().invoke(app, ["report", *argv, "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


# --- scale ------------------------------------------------------------------------------------


def _big_store(path, runs=50, layers=20, steps=1000):
    """50 runs x 20 layers (10 Linear + 10 Sigmoid) x 1,000 steps, written directly."""
    rng = np.random.default_rng(0)
    store = RunStore(path)
    step = np.arange(steps)
    for r in range(runs):
        config = {
            "lab": {"config_key": f"cfg{r % 10}", "label": f"config {r % 10}", "seed": r // 10},
            "model": {
                "kind": "mlp",
                "depth": layers // 2 - 1,
                "init": "scaled",
                "activation": "sigmoid",
                "sigma_w2": 1.0 + r % 10 / 5,
                "sigma_b2": 0.0,
            },
        }
        run_id = store.create_run(f"run {r}", config)
        store.add_layers(
            run_id,
            [
                (
                    i,
                    f"net.{i}",
                    "Linear" if i % 2 == 0 else "Sigmoid",
                    "param" if i % 2 == 0 else "activation",
                    None if i % 2 == 0 else "sigmoid",
                )
                for i in range(layers)
            ],
        )
        decay = 0.2 + 0.08 * (r % 10)
        rows = []
        for lid in range(layers):
            noise = rng.lognormal(0, 0.1, steps)
            if lid % 2 == 0:
                delta = decay ** ((layers - lid) / 2) * noise
                values = np.column_stack(
                    [delta * 3, 5 + step * 1e-4, delta * 1e-2, delta] + [np.full(steps, np.nan)] * 6
                )
            else:
                frac = np.clip(rng.uniform(0, 1) + step * 1e-4, 0, 1)
                values = np.column_stack(
                    [np.full(steps, np.nan)] * 6 + [frac, 1 - frac, np.zeros(steps), 0.2 * noise]
                )
            rows += [(int(s), lid, v) for s, v in zip(step, values.tolist(), strict=True)]
        store.add_layer_metrics(run_id, rows)
        loss = 2.3 * np.exp(-step / (300 + 100 * r)) + 0.05 * rng.random(steps)
        epochs = [
            (int(s), name, float(v))
            for e, s in enumerate(range(99, steps, 100), 1)
            for name, v in (("epoch", e), ("test_acc", min(0.99, 0.1 + e * 0.05)), ("test_loss", loss[s]))
        ]
        store.add_scalars(
            run_id, [(int(s), "loss", float(v)) for s, v in zip(step, loss, strict=True)] + epochs
        )
        store.finish_run(run_id)
    store.close()


@pytest.mark.integration
def test_report_of_50_runs_20_layers_1000_steps_is_small(tmp_path, with_theory):
    # its time is measured by bench/wallclock.py, not asserted here
    _big_store(tmp_path / "big.db")
    out = rp.report(tmp_path / "big.db", out=tmp_path / "big.html")
    assert out.stat().st_size <= 10e6
    text = out.read_text()
    assert all(f"id='{a}'" in text for a in SECTIONS if a != "findings")
