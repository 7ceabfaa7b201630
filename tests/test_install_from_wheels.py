"""The install story of docs/plugins.md works without a clone: wheels from ``make dist``, a fresh venv (issue 22).

``make dist`` builds wheels of vlmr1 and every first-party plugin; the template plugin's wheel is
built the way docs/plugins.md tells an outside author to. Both are installed into a FRESH venv
with no editable installs, and ``python -m core.plugins list`` there shows the template loaded.

Not downloading torch and friends (GBs): the fresh venv sees the third-party packages of the
project's venv through a ``.pth`` file pointing at a folder of links to them, with every vlmr1
distribution and every editable-install hook left out. So ``vlmr1`` and the plugin can only come
from the wheels. pip runs with ``--no-index``, the wheel folder as its only source and no user
pip config, so nothing is fetched from anywhere else; the template's wheel is installed WITH its
dependencies, so its ``vlmr1>=0.2,<0.3`` requirement is checked against the installed wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from core import __version__
from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "plugin_template"
PLUGIN_DIRS = sorted(p.parent for p in ROOT.glob("plugins/*/*/pyproject.toml"))


def _deps_view(dest: Path) -> Path:
    """Links to the current venv's site-packages entries, minus vlmr1's distributions and editable hooks."""
    dest.mkdir()
    src = Path(site.getsitepackages()[0])
    for entry in src.iterdir():
        name = entry.name.lower()
        if name.startswith(("vlmr1", "__editable__", "core", "_virtualenv")) or name.endswith(".pth"):
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


@pytest.mark.slow
def test_template_installs_from_wheels_into_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    pip_env = {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
               "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    # `-o`: never (re)build the venv from inside a test, even if a pyproject is newer than it.
    venv_stamp = Path(sys.prefix) / ".installed"
    def scratch() -> set[Path]:
        return {p for d in [ROOT, *PLUGIN_DIRS] for p in [d / "build", *d.glob("*.egg-info")] if p.exists()}

    existed = scratch()
    make = run_command(["make", "-o", str(venv_stamp), "dist", f"DIST={dist}", f"PY={sys.executable}"],
                       cwd=ROOT, env=pip_env, timeout=900)
    assert make.returncode == 0, make.stdout[-3000:] + make.stderr[-3000:]
    wheels = sorted(p.name for p in dist.glob("*.whl"))
    assert f"vlmr1-{__version__}-py3-none-any.whl" in wheels
    assert len(wheels) == 1 + len(PLUGIN_DIRS), wheels  # core + every first-party plugin
    leftovers = sorted(scratch() - existed)
    assert not leftovers, f"make dist left setuptools' scratch folders in the repository: {leftovers}"

    # The template's wheel, as an outside author builds it (a copy: no build/ lands in the repo).
    src = tmp_path / "template"
    shutil.copytree(TEMPLATE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    built = run_command([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                         str(src)], env=pip_env, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    template_whl = next(dist.glob("vlmr1_plugin_template-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    fresh_site = Path(run_command([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  timeout=120).stdout.strip())
    (fresh_site / "project-deps.pth").write_text(str(_deps_view(tmp_path / "deps")) + "\n")
    pip = [str(py), "-m", "pip", "install", "--find-links", str(dist)]  # pip itself comes from the deps view
    core_install = run_command([*pip, "--no-deps", str(dist / f"vlmr1-{__version__}-py3-none-any.whl")],
                               env=pip_env, timeout=600)
    assert core_install.returncode == 0, core_install.stdout[-3000:] + core_install.stderr[-3000:]
    plugin_install = run_command([*pip, str(template_whl)], env=pip_env, timeout=600)
    assert plugin_install.returncode == 0, plugin_install.stdout[-3000:] + plugin_install.stderr[-3000:]

    # Outside the clone (so `core` cannot come from the current folder), without PYTHONPATH.
    run_env = {k: v for k, v in pip_env.items() if k != "PYTHONPATH"}
    where = run_command([str(py), "-c", "import core, vlmr1_template; print(core.__file__); "
                                        "print(vlmr1_template.__file__)"], cwd=tmp_path, env=run_env, timeout=300)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(fresh_site)) for line in where.stdout.split()), where.stdout
    listed = run_command([str(py), "-m", "core.plugins", "list", "--json"], cwd=tmp_path, env=run_env, timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    data = json.loads(listed.stdout)
    assert data["vlmr1"] == __version__
    plugins = {p["distribution"]: p for p in data["plugins"]}
    # No editable install leaked in: the template is the only plugin there.
    assert set(plugins) == {"vlmr1", "vlmr1-plugin-template"}, plugins
    assert plugins["vlmr1-plugin-template"]["status"] == "loaded"
    assert plugins["vlmr1-plugin-template"]["components"] == {"rewards": ["keyword"]}
