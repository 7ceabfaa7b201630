"""``python -m core.plugins list`` as a real subprocess, with the fixture plugins on PYTHONPATH.

The fixture distributions in ``tests/fixtures/site`` are real ``.dist-info`` folders that
``importlib.metadata`` finds through ``PYTHONPATH``; the shared venv is never modified.
"""

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import __version__
from core.testing.procs import run_command

SITE = Path(__file__).parent / "fixtures" / "site"


def run_plugins(*args: str) -> subprocess.CompletedProcess:
    path = [str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return run_command([sys.executable, "-m", "core.plugins", "list", *args], capture_output=True, text=True,
                       env=env, timeout=120)


@pytest.fixture(scope="module")
def listing() -> dict:
    proc = run_plugins("--json")
    assert proc.returncode == 0, proc.stderr  # exits 0 although two plugins are broken
    return json.loads(proc.stdout)


def by_dist(listing: dict) -> dict:
    return {p["distribution"]: p for p in listing["plugins"]}


def test_list_json_shows_failed_and_refused_plugins(listing):
    plugins = by_dist(listing)
    assert listing["vlmr1"] == __version__
    broken = plugins["vlmr1-plugin-broken"]
    assert (broken["status"], broken["version"], broken["entry_point"]) == ("failed", "0.3.1", "vlmr1_broken.hooks")
    assert "Traceback (most recent call last)" in broken["error"]
    assert 'vlmr1_broken/hooks.py", line 3' in broken["error"]
    assert "ImportError: vlmr1_broken needs libfixture >= 2" in broken["error"]
    inc = plugins["vlmr1-plugin-incompatible"]
    assert (inc["status"], inc["version"]) == ("incompatible", "9.0.0")
    assert f"requires vlmr1>=9, but vlmr1 {__version__} is installed" in inc["error"]
    fx = plugins["vlmr1-plugin-fixtures"]
    assert fx["status"] == "loaded" and fx["error"] is None
    assert fx["components"] == {"rewards": ["dup"], "tasks": ["fixture_colours"]}
    assert fx["hooks"] == ["vlmr1_register_rewards", "vlmr1_register_tasks"]
    assert plugins["vlmr1"]["components"] == {"rewards": ["accuracy"], "devices": ["cpu"], "rollouts": ["transformers"],
                                              "tasks": ["mixture"]}


def test_list_json_component_index_marks_ambiguous_names(listing):
    rewards = {c["qualified"]: c for c in listing["components"]["rewards"]}
    # Two providers of `dup`: each is addressable only as distribution:name.
    assert rewards["vlmr1-plugin-dup:dup"]["name"] == "vlmr1-plugin-dup:dup"
    assert rewards["vlmr1-plugin-fixtures:dup"]["name"] == "vlmr1-plugin-fixtures:dup"
    assert rewards["vlmr1:accuracy"]["name"] == "accuracy"
    task = next(c for c in listing["components"]["tasks"] if c["qualified"] == "vlmr1-plugin-fixtures:fixture_colours")
    assert task["description"] == "in-memory colour images (test fixture)"


def test_every_kind_has_a_component(listing):
    # Core + the fixtures provide rewards, tasks, devices and rollouts; model families come from
    # first-party plugins (installed by `make install`).
    kinds = {k for k, comps in listing["components"].items() if comps}
    assert {"rewards", "tasks", "devices", "rollouts"} <= kinds
    try:
        md.distribution("vlmr1-plugin-qwen-vl")
    except md.PackageNotFoundError:
        pytest.skip("first-party model plugin vlmr1-plugin-qwen-vl is not installed")
    assert "models" in kinds, listing["components"]


def test_list_table_with_kind_filter():
    proc = run_plugins("--kind", "tasks")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "fixture_colours" in out
    assert "vlmr1-plugin-dup" not in out  # loaded, but provides no task
    assert "failed" in out and "incompatible" in out  # failures are always shown ...
    assert "ImportError: vlmr1_broken needs libfixture >= 2" in out  # ... with their traceback


def test_list_json_kind_and_selection():
    proc = run_plugins("--json", "--kind", "rewards", "--plugins", "vlmr1-plugin-dup")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert list(data["components"]) == ["rewards"]
    assert [c["qualified"] for c in data["components"]["rewards"]] == ["vlmr1:accuracy", "vlmr1-plugin-dup:dup"]
    statuses = {p["distribution"]: p["status"] for p in data["plugins"]}
    assert statuses == {"vlmr1": "loaded", "vlmr1-plugin-dup": "loaded"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strict"], "vlmr1-plugin-broken 0.3.1 failed (strict mode)"),
        (["--plugins", "fixtures,nosuchplugin"], "nosuchplugin, which is not installed"),
    ],
)
def test_list_errors_exit_nonzero(args, message):
    proc = run_plugins(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def run_build_tiny(*args: str) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "core.plugins", "build-tiny", *args], capture_output=True, text=True,
                       timeout=300)


def test_build_tiny_writes_a_family_checkpoint(tmp_path):
    # What scripts and plugins use instead of importing the plugin host (they import only core.interfaces).
    out = tmp_path / "tiny"
    proc = run_build_tiny("qwen2_5_vl", str(out), "--options", '{"seed": 1, "num_layers": 1}', "--plugins", "qwen_vl")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_family", "x"], "no model family named 'no_such_family'"),
        (["qwen2_5_vl", "x", "--options", "[1]"], "--options: expected a JSON object"),
        (["qwen2_5_vl", "x", "--options", "{bad"], "--options: Expecting property name"),
        (["qwen2_5_vl", "x", "--options", '{"hiden_size": 8}'], "hiden_size"),
    ],
)
def test_build_tiny_errors_exit_2(tmp_path, args, message):
    proc = run_build_tiny(args[0], str(tmp_path / args[1]), *args[2:])
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / args[1]).exists()
