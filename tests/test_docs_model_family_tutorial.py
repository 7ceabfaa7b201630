"""docs/model_family_tutorial.md runs: its plugin installs, passes conformance and trains the quickstart.

The tutorial's code is the package ``examples/families/mistral3``; every ``python`` block of the
tutorial that names a file of it (first line ``# examples/families/mistral3/...``) must be a
verbatim excerpt of that file. The tutorial's commands are run here as written (they are skipped
by tests/test_docs_commands.py, which runs against the shared venv where the example is not
installed): pip builds and installs a wheel of a copy of the package into a temporary
``--target`` folder that only these subprocesses see (the shared venv is not modified, nothing is
downloaded), its conformance tests run, and the quickstart trains 2 steps with the family.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "model_family_tutorial.md"
EXAMPLE = ROOT / "examples" / "families" / "mistral3"
# Generous: each command takes ~10-40 s on 2 idle cores and several times that on a shared machine.
TIMEOUT_S = 900

PIP_INSTALL = ".venv/bin/pip install -e examples/families/mistral3"
LIST = ".venv/bin/python -m core.plugins list --kind models"
CONFORMANCE = ".venv/bin/python -m pytest examples/families/mistral3/tests"
TRAIN = (".venv/bin/python -m core.train --plugins mistral3,synthetic,text model.family=mistral3 "
         "logging.output_dir=runs/quickstart-mistral3")


def doc_text() -> str:
    return DOC.read_text()


def test_the_tutorials_code_is_the_example_package():
    blocks = re.findall(r"```python\n# (examples/families/mistral3/\S+)\n(.*?)```", doc_text(), re.S)
    assert len(blocks) >= 4, "the tutorial shows the package's files"
    for rel, body in blocks:
        source = (ROOT / rel).read_text()
        for chunk in (c for c in re.split(r"\n\s*# \.\.\.\n", body) if c.strip()):
            assert chunk.strip("\n") in source, f"{rel}: the tutorial shows code that is not in the file:\n{chunk}"


def test_the_tutorials_commands_are_these():
    text = doc_text()
    for command in (PIP_INSTALL, LIST, CONFORMANCE, TRAIN):
        assert command in text, command


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(args)} did not finish in {TIMEOUT_S} s (a generous limit for a loaded 2-core "
                    f"machine; is it stuck?)\n{exc.stdout}\n{exc.stderr}")


@pytest.mark.slow
def test_the_tutorial_runs(tmp_path):
    # `pip install -e examples/families/mistral3`, as a wheel into a private folder.
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
    target = tmp_path / "target"
    proc = run([sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", "--no-index",
                "--disable-pip-version-check", "--target", str(target), str(src)], dict(os.environ), ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])])}

    # The family is listed, from the installed copy.
    proc = run([sys.executable, "-m", "core.plugins", "list", "--json", "--kind", "models"], env, ROOT)
    assert proc.returncode == 0, proc.stderr
    info = next(p for p in json.loads(proc.stdout)["plugins"] if p["distribution"] == "vlmr1-plugin-mistral3")
    assert info["status"] == "loaded" and info["components"] == {"models": ["mistral3"]}, info

    # The conformance suite (the example's tests) passes against the installed package.
    proc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")], env, ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\b17 passed\b", proc.stdout), proc.stdout[-2000:]

    # The quickstart with the family, at toy size, in a scratch folder (the tiny build lands in its .cache/).
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    args = TRAIN.split()[1:] + ["train.max_steps=2", "eval.num_samples=8"]
    proc = run([sys.executable, *args], env, work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = work / "runs" / "quickstart-mistral3"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2], rows
    config = json.loads((next(work.glob(".cache/tiny/mistral3-*")) / "config.json").read_text())
    assert config["model_type"] == "mistral3"
