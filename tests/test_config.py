"""WatchConfig: one frozen, validated set of recording options for watch(), the callbacks and the lab."""

import dataclasses
import inspect

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.config import WatchConfig
from gradwatch.errors import ConfigError
from gradwatch.store import RunStore


def test_watch_defaults_are_the_configs_defaults():
    params = inspect.signature(gradwatch.watch).parameters
    defaults = WatchConfig()
    for name in WatchConfig.fields():
        assert params[name].default == getattr(defaults, name), name
    assert defaults.every == 50 and defaults.activation_sample == 2048 and defaults.weight_samples == 8


def test_config_is_frozen_and_replace_validates():
    config = WatchConfig(every=10, include="net.*")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.every = 5
    assert config.include == ("net.*",)
    assert config.replace(every=3).every == 3 and config.every == 10
    with pytest.raises(ConfigError, match="every=0"):
        config.replace(every=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"every": 0}, "every=0; expected a positive int"),
    ({"every": "10"}, "every='10'"),
    ({"weight_samples": -1}, "weight_samples=-1; expected an integer >= 0"),
    ({"activation_sample": 1.5}, "activation_sample=1.5"),
    ({"window": "yes"}, "window='yes'; expected True, False or None"),
    ({"include": [3]}, "include takes module-name patterns"),
    ({"alerts": {"slow": "warn"}}, "slow"),
    ({"warn": "no"}, "warn='no'; expected True or False"),
])
def test_bad_options_fail_when_the_config_is_made(options, message):
    with pytest.raises(ConfigError, match=message):
        WatchConfig(**options)


def _train(model, optimizer, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        optimizer.step()


def test_watch_takes_a_config_and_refuses_two_sources(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    store = RunStore(tmp_path / "runs.db")
    with pytest.raises(ConfigError, match="got settings= and the options \\['every'\\]"):
        gradwatch.watch(model, optimizer, store=store, every=2, settings=WatchConfig(every=3))
    with gradwatch.watch(model, optimizer, store=store, settings=WatchConfig(every=3, weight_samples=2)) as w:
        _train(model, optimizer, 7)
    assert sorted(w.metrics()["step"].unique()) == [0, 3, 6]
    assert store.run(w.run_id)["config"]["gradwatch"]["every"] == 3
    assert set(store.weight_samples(w.run_id).groupby(["step", "layer_id"]).size()) == {2}
    store.close()


def test_callbacks_take_a_config_or_its_fields():
    pytest.importorskip("lightning")
    from gradwatch.integrations.lightning import GradwatchCallback

    assert GradwatchCallback().settings == WatchConfig()
    assert GradwatchCallback(every=10).settings.every == 10
    assert GradwatchCallback(WatchConfig(every=7)).settings.every == 7
    with pytest.raises(ConfigError, match="unknown option\\(s\\) \\['evry'\\]"):
        GradwatchCallback(evry=10)
