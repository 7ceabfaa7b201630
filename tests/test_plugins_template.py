"""The example plugin (examples/plugin_template) installs with pip, offline, and a run can use it.

pip builds and installs a wheel of a *copy* of the template (so no build/ or egg-info lands in
the repository) into a temporary ``--target`` folder that only this test's subprocesses see
through ``PYTHONPATH``: the shared venv is not modified, and nothing is downloaded
(``--no-index --no-deps --no-build-isolation``: setuptools comes from the venv).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.testing.procs import run_command

ROOT = Path(__file__).parents[1]
TEMPLATE = ROOT / "examples" / "plugin_template"
SITE = Path(__file__).parent / "fixtures" / "site"


@pytest.fixture(scope="module")
def template_env(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("template")
    src = tmp / "src"
    shutil.copytree(TEMPLATE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
    target = tmp / "target"
    proc = run_command(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # A real installed distribution: wheel metadata with the entry point and the vlmr1 requirement.
    dist_info = next(target.glob("vlmr1_plugin_template-0.2.0.dist-info"))
    assert "template = vlmr1_template.hooks" in (dist_info / "entry_points.txt").read_text()
    assert "Requires-Dist: vlmr1<0.3,>=0.2" in (dist_info / "METADATA").read_text()
    # The target comes first: it must win over an editable install of the template, if any.
    path = [str(target), str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return run_command([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_installed_template_is_listed(template_env, tmp_path):
    proc = run(template_env, "-m", "core.plugins", "list", "--json", "--kind", "rewards")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    info = next(p for p in data["plugins"] if p["distribution"] == "vlmr1-plugin-template")
    assert info["status"] == "loaded" and info["version"] == "0.2.0"
    assert info["components"] == {"rewards": ["keyword"]}
    assert info["entry_point"] == "vlmr1_template.hooks"
    keyword = next(c for c in data["components"]["rewards"] if c["qualified"] == "vlmr1-plugin-template:keyword")
    assert keyword["description"] == "1.0 if the answer contains a configured keyword"
    # It was imported from the pip-installed copy, not from the source tree.
    where = run(template_env, "-c", "import vlmr1_template; print(vlmr1_template.__file__)")
    assert where.stdout.strip().startswith(template_env["PYTHONPATH"].split(os.pathsep)[0])


def test_config_using_the_template_reward_passes_dry_run(template_env, tmp_path):
    config = tmp_path / "keyword.yaml"
    config.write_text(
        (SITE.parent / "configs" / "dry_run.yaml").read_text()
        .replace("plugins: [fixtures]", "plugins: [fixtures, vlmr1-plugin-template]")
        .replace("  - name: vlmr1-plugin-fixtures:dup\n    weight: 1.0\n",
                 "  - name: template:keyword\n    weight: 1.0\n    options: {keyword: red, whole_word: true}\n"))
    proc = run(template_env, "-m", "core.train", "--config", str(config), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout.split("# plan\n", 1)[1])
    assert plan["rewards"][0] == {"name": "vlmr1-plugin-template:keyword", "weight": 1.0}
    assert plan["options"]["rewards.0"] == {"keyword": "red", "case_sensitive": False, "whole_word": True,
                                            "answer_only": True}
    # Its options are validated against KeywordReward.Options before anything loads.
    bad = run(template_env, "-m", "core.train", "--config", str(config), "--dry-run", "rewards.0.options.keyword=")
    assert bad.returncode == 2
    assert "rewards.0.options.keyword = '': String should have at least 1 character" in bad.stderr
