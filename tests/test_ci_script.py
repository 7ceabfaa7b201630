"""The CI log keeps pytest's "N passed" line: `.ci/run` and the Makefile together pass one -q, not -qq."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]


def ci_pytest_flags() -> list[str]:
    """The pytest flags CI uses: the Makefile's test recipe with `.ci/run`'s ARGS substituted."""
    recipe = re.search(r"^test:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    ci_args = re.search(r'^make test ARGS="([^"]*)"', (ROOT / ".ci" / "run").read_text(), re.MULTILINE).group(1)
    words = shlex.split(recipe.replace("$(ARGS)", ci_args))
    return words[words.index("pytest") + 1:]


def test_ci_flags_keep_the_count_line(tmp_path: Path):
    (tmp_path / "test_one.py").write_text("def test_ok():\n    pass\n")
    proc = run_command([sys.executable, "-m", "pytest", *ci_pytest_flags(), str(tmp_path / "test_one.py")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^1 passed", proc.stdout, re.MULTILINE), proc.stdout  # -qq printed no such line
