"""What operators see when plugins fail or are not selected, and plan errors reported all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ConfigError, build_config, load_raw
from core.plugins import PluginHost
from core.plugins.plan import make_plan
from core.plugins.registry import ComponentError
from core.train import main

FIXTURES = Path(__file__).parent / "fixtures"
CONFIG = FIXTURES / "configs" / "dry_run.yaml"


@pytest.fixture
def site(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES / "site"))


def test_a_real_run_prints_the_plugin_failure_first(site, capsys):
    # Not --dry-run: the old code printed the warning only under --dry-run. The run stops at the
    # plan (unknown task), before any weights load, which keeps this test fast.
    rc = main(["--config", str(CONFIG), "--plugins", "fixtures,broken", "task.name=nosuch"])
    err = capsys.readouterr().err
    assert rc == 2
    warning = ("warning: plugin vlmr1-plugin-broken 0.3.1 failed (ImportError: vlmr1_broken needs libfixture >= 2 "
               "(deliberately broken test fixture)); run `python -m core.plugins list` for the traceback")
    assert err.splitlines()[0] == warning
    assert err.count("warning: plugin vlmr1-plugin-broken") == 1


def test_dry_run_still_warns_once(site, capsys):
    assert main(["--config", str(CONFIG), "--dry-run", "--plugins", "fixtures,broken"]) == 0
    assert capsys.readouterr().err.count("warning: plugin vlmr1-plugin-broken") == 1


def test_unknown_name_says_which_unselected_plugin_provides_it(site):
    host = PluginHost("dup")
    with pytest.raises(ComponentError) as ei:
        host.registry.resolve("tasks", "fixture_colours")
    msg = str(ei.value)
    assert "no task named 'fixture_colours'" in msg
    assert ("Task 'fixture_colours' is provided by vlmr1-plugin-fixtures, installed but not selected by --plugins "
            "(or the config's `plugins:` list): add fixtures to it.") in msg
    # the hint imports nothing into the run's own registry
    assert [e.name for e in host.registry.entries("tasks")] == ["mixture"]  # the built-in one only
    with pytest.raises(ComponentError) as ei:
        host.registry.resolve("tasks", "nothing_provides_this")
    assert "installed but not selected" not in str(ei.value)


def test_all_plan_errors_are_reported_at_once(site):
    cfg = build_config(load_raw(str(CONFIG)), ["task.name=nosuch", "rewards.0.name=nope", "rollout.name=warp",
                                               "task.options.mode=triple"])
    with pytest.raises(ConfigError) as ei:
        make_plan(cfg, PluginHost("fixtures").registry)
    msg = str(ei.value)
    assert msg.startswith("3 problems in the config:\n- ")
    for part in ("no task named 'nosuch'", "no reward named 'nope'", "no rollout engine named 'warp'"):
        assert part in msg
    # one problem keeps its one-line form
    cfg = build_config(load_raw(str(CONFIG)), ["rewards.0.name=nope"])
    with pytest.raises(ConfigError, match=r"^[^\n]*no reward named 'nope'[^\n]*$"):
        make_plan(cfg, PluginHost("fixtures").registry)
