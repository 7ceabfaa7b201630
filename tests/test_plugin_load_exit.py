"""A plugin that calls ``sys.exit`` while it loads is that plugin's failure, never the run's success (issue 22).

Before: ``sys.exit(0)`` in a plugin's module body ended ``python -m core.train`` (and
``core.plugins list``) with exit 0 after a second, no output, no output folder. Real
subprocesses with a real installed-looking distribution (``write_distribution``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from core.testing import write_distribution
from core.testing.procs import CommandTimedOut, run_command, scaled

FIXTURES = Path(__file__).parent / "fixtures"
CONFIG = FIXTURES / "configs" / "dry_run.yaml"


@pytest.fixture(params=["0", "'bye'", "3"], ids=["exit0", "exit-message", "exit3"])
def exiting_env(request, tmp_path) -> dict[str, str]:
    """A site with vlmr1-plugin-exiter 0.4.2, whose module calls ``sys.exit(CODE)`` on import."""
    site = tmp_path / "site"
    write_distribution(site, "vlmr1-plugin-exiter", "0.4.2",
                       modules={"exiter_pkg/hooks.py": f"import sys\n\nsys.exit({request.param})\n"},
                       entry_points={"exiter": "exiter_pkg.hooks"})
    path = [str(site), str(FIXTURES / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def test_plugins_list_reports_the_exiting_plugin_as_failed(exiting_env):
    proc = run_command([sys.executable, "-m", "core.plugins", "list", "--json", "--plugins", "fixtures,exiter"],
                       env=exiting_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = next(p for p in json.loads(proc.stdout)["plugins"] if p["distribution"] == "vlmr1-plugin-exiter")
    assert info["status"] == "failed" and info["version"] == "0.4.2"
    last = info["error"].strip().splitlines()[-1]
    assert last.startswith("SystemExit: the plugin called sys.exit(") and "exiter_pkg/hooks.py:3" in last


def test_train_naming_a_component_of_the_exiting_plugin_exits_2_naming_it(exiting_env, tmp_path):
    proc = run_command([sys.executable, "-m", "core.train", "--config", str(CONFIG), "--plugins", "fixtures,exiter",
                        f"logging.output_dir={tmp_path / 'out'}", "rewards.0.name=exiter:anything"],
                       env=exiting_env, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    # The documented failed-plugin line (docs/plugins.md §6): version and reason.
    assert lines[0].startswith("warning: plugin vlmr1-plugin-exiter 0.4.2 failed (SystemExit: the plugin called "
                               "sys.exit("), lines[0]
    assert "run `python -m core.plugins list` for the traceback" in lines[0]
    error = next(line for line in lines if line.startswith("error:"))
    assert "no reward named 'exiter:anything'" in error and "plugin vlmr1-plugin-exiter 0.4.2 failed" in error
    assert not (tmp_path / "out").exists()


def test_a_run_that_does_not_need_the_exiting_plugin_goes_on(exiting_env):
    proc = run_command([sys.executable, "-m", "core.train", "--config", str(CONFIG), "--plugins", "fixtures,exiter",
                        "--dry-run"], env=exiting_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "# plan" in proc.stdout
    # --dry-run prints the same line as a real run (it used to drop the version and the reason).
    assert "warning: plugin vlmr1-plugin-exiter 0.4.2 failed (SystemExit: the plugin called sys.exit(" in proc.stderr


def test_timed_out_command_says_so_and_how_to_give_more_time(monkeypatch):
    monkeypatch.setenv("VLMR1_TEST_TIMEOUT_SCALE", "0.5")
    assert scaled(4) == 2.0
    with pytest.raises(CommandTimedOut) as ei:
        run_command([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(600)"], timeout=4)
    msg = str(ei.value)
    assert "timed out after 2 s (machine busy?" in msg and "VLMR1_TEST_TIMEOUT_SCALE=3" in msg
    assert "started" in msg  # the output so far, to see how far it got
    monkeypatch.setenv("VLMR1_TEST_TIMEOUT_SCALE", "fast")
    with pytest.raises(ValueError, match="VLMR1_TEST_TIMEOUT_SCALE='fast'"):
        scaled(1)
