"""Every shell command in README.md and docs/*.md runs as written, in order, without colliding.

``.venv/bin/python -m pytest tests/test_docs_commands.py`` (the run is marked ``slow``: ~1-3 min
on 2 CPU cores).

The commands are the lines of the fenced ```` ```bash ```` (``sh``, ``shell``) blocks, backslash
continuations joined, trailing ``# comments`` dropped. ``COMMANDS`` below says how each one is
treated, keyed by (file, command): run at toy size (extra ``key=value`` overrides after its own, text
substitutions for the names a toy run changes, such as ``checkpoint-20`` -> ``checkpoint-2``), or
skipped with a stated reason (a GPU, a server, the environment, a synopsis with placeholders).
A command the table does not classify fails ``test_every_docs_command_is_classified``, and so does
an entry whose command is no longer in the docs: a new docs command has to be handled here.

The runnable commands run in the order a newcomer meets them (README.md, then docs/*.md by
name) in a scratch working folder: ``examples/`` is linked in (read only), outputs land in its
own ``runs/``, never the repository's, and ``.venv/bin/python`` is this interpreter. One tiny
model is built into the folder's ``.cache/tiny`` by the first command and reused by the rest.
After each command the files it created, changed or deleted are attributed to output folders
(``runs/<name>``, the folder a command's ``logging.output_dir`` / ``--out`` / ``--output-dir``
names); two commands writing one folder fail the test unless the later one declares that it
continues the earlier (a ``--resume``), and so does a write outside ``runs/`` (and the shared
``.cache/``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```+\s*(bash|sh|shell)\s*$")
VENV_PY = ".venv/bin/python"
# One toy-size command takes ~5-10 s on 2 idle cores and 4-10x that when the cores are shared; a
# command that has not finished after this long is stuck, not slow.
COMMAND_TIMEOUT_S = 600
TOY_TRAIN = ("train.max_steps=2", "eval.num_samples=8")  # 2 GRPO steps, 8 eval images before/after


@dataclass(frozen=True)
class Run:
    """Run the command at toy size: ``extra`` after its own overrides, ``replace`` applied to its text."""

    extra: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()
    expect: str = ""                # a substring of its stdout
    files: tuple[str, ...] = ()     # paths it must leave behind (relative to the working folder)
    continues: str = ""             # an output folder it may write into after an earlier command


@dataclass(frozen=True)
class Skip:
    """Not run, for ``reason``."""

    reason: str


SYNOPSIS = Skip("a synopsis (FILE/DIR placeholders, [optional] flags), not a command to paste; "
                "the README's concrete commands run")

# (file, command) -> treatment. Commands are written as in the docs (comments dropped, spaces collapsed).
COMMANDS: dict[tuple[str, str], Run | Skip] = {
    # ---- README.md ----
    ("README.md", "make quickstart"): Skip("= `.venv/bin/python -m core.train` after set-up; that runs below"),
    ("README.md", "make test"): Skip("runs this test suite"),
    ("README.md", ".venv/bin/python -m core.train"): Run(
        extra=TOY_TRAIN, files=tuple(f"runs/quickstart/{f}" for f in
                                     ("metrics.jsonl", "completions.jsonl", "eval.json", "reward_curve.png",
                                      "checkpoint-2/model.safetensors"))),
    ("README.md", ".venv/bin/python -m core.train --config examples/quickstart/config.yaml train.max_steps=20 "
                  "logging.output_dir=runs/quickstart-20"): Run(extra=TOY_TRAIN,
                                                                files=("runs/quickstart-20/checkpoint-2",)),
    ("README.md", ".venv/bin/python -m core.train --config examples/quickstart/config.yaml train.max_steps=20 "
                  "logging.output_dir=runs/quickstart-20 --resume"): Run(
        extra=TOY_TRAIN, continues="runs/quickstart-20", expect="resumed from"),
    ("README.md", ".venv/bin/python -m core.train --config examples/rec/config.yaml --dry-run"): Run(
        expect='"notes"'),
    ("README.md", ".venv/bin/python -m core.plugins list --kind rewards"): Run(expect="all_match"),
    ("README.md", ".venv/bin/python -m core.evaluate --config examples/quickstart/config.yaml --checkpoint "
                  "runs/quickstart-20 --limit 16 --out runs/quickstart-20-eval"): Run(
        files=("runs/quickstart-20-eval/summary.json", "runs/quickstart-20-eval/predictions.jsonl")),
    ("README.md", ".venv/bin/python -m core.sft --config examples/quickstart/config.yaml --output-dir "
                  "runs/quickstart-sft train.max_steps=20"): Run(extra=("train.max_steps=2",),
                                              files=("runs/quickstart-sft/sft_state.json",
                                                     "runs/quickstart-sft/model.safetensors")),
    ("README.md", ".venv/bin/python -m core.train --config examples/quickstart/config.yaml train.mode=lora "
                  "train.max_steps=20 logging.output_dir=runs/quickstart-lora"): Run(
        extra=TOY_TRAIN, files=("runs/quickstart-lora/checkpoint-2/adapter_config.json",)),
    ("README.md", ".venv/bin/python -m core.merge_lora runs/quickstart-lora/checkpoint-20 --out "
                  "runs/quickstart-lora-merged"): Run(replace=(("checkpoint-20", "checkpoint-2"),),
                                                      files=("runs/quickstart-lora-merged/model.safetensors",)),
    # ---- docs/config.md ----
    ("docs/config.md", ".venv/bin/python -m core.train --config FILE [--plugins a,b] [--dry-run] [--resume [PATH]] "
                       "[key.path=value ...]"): SYNOPSIS,
    ("docs/config.md", ".venv/bin/python -m core.train"): Skip("the README's first training command (the same "
                                                               "quickstart into runs/quickstart); it runs there"),
    ("docs/config.md", ".venv/bin/python -m core.config --check examples/rec/config.yaml"): Run(),
    # ---- docs/evaluation.md ----
    ("docs/evaluation.md", ".venv/bin/python -m core.evaluate --config FILE [--checkpoint PATH] [--split eval] "
                           "[--limit N] [--seed S] [--rollout NAME] [--metric KIND] [--out DIR] "
                           "[key=value ...]"): SYNOPSIS,
    ("docs/evaluation.md", ".venv/bin/python -m core.sft --config FILE [--output-dir DIR] [--template T] "
                           "[--box-format F] [key=value ...]"): SYNOPSIS,
    ("docs/evaluation.md", ".venv/bin/python -m core.sft --config examples/grounding_cpu/config.yaml "
                           "--show-targets 1"): Run(expect='"target": "[1, 34, 22, 55]"'),
    ("docs/evaluation.md", ".venv/bin/python -m core.sft --config examples/grounding_cpu/config.yaml "
                           "--show-targets 1 model.tiny.max_pixels=3136"): Run(expect='"target": "[1, 17, 11, 28]"'),
    # ---- docs/model_family_tutorial.md (tests/test_docs_model_family_tutorial.py runs these four, with the
    # example installed into a scratch folder instead of the shared venv) ----
    ("docs/model_family_tutorial.md", ".venv/bin/pip install -e examples/families/mistral3"): Skip(
        "installs into the shared venv; tests/test_docs_model_family_tutorial.py installs it into a scratch folder"),
    ("docs/model_family_tutorial.md", ".venv/bin/python -m core.plugins list --kind models"): Skip(
        "needs the tutorial's plugin installed; tests/test_docs_model_family_tutorial.py runs it"),
    ("docs/model_family_tutorial.md", ".venv/bin/python -m pytest examples/families/mistral3/tests"): Skip(
        "needs the tutorial's plugin importable; tests/test_docs_model_family_tutorial.py runs it"),
    ("docs/model_family_tutorial.md", ".venv/bin/python -m core.train --plugins mistral3,synthetic,text "
                                      "model.family=mistral3 logging.output_dir=runs/quickstart-mistral3"): Skip(
        "needs the tutorial's plugin installed; tests/test_docs_model_family_tutorial.py runs it at toy size"),
    # ---- docs/plugins.md ----
    ("docs/plugins.md", ".venv/bin/pip install -e examples/plugin_template"): Skip(
        "installs into the shared venv; tests/test_plugins_template.py installs the template into a scratch "
        "folder and runs it"),
    ("docs/plugins.md", 'pip install "vlmr1 @ git+https://github.com/OWNER/vlmr1@v0.2.0"'): Skip(
        "needs the network and a published repository; tests/test_install_from_wheels.py installs from wheels"),
    ("docs/plugins.md", "make dist"): Skip("tests/test_install_from_wheels.py runs it (slow: builds 16 wheels)"),
    ("docs/plugins.md", "pip install dist/vlmr1-0.2.0-py3-none-any.whl "
                        "dist/vlmr1_plugin_qwen_vl-0.2.0-py3-none-any.whl"): Skip(
        "installs into an environment; tests/test_install_from_wheels.py installs the wheels into a fresh venv"),
    ("docs/plugins.md", "pip install ./vlmr1-plugin-mything"): Skip("a placeholder plugin folder"),
    ("docs/plugins.md", ".venv/bin/python -m core.plugins list"): Run(expect="vlmr1-plugin-text"),
    ("docs/plugins.md", ".venv/bin/python -m pytest examples/plugin_template/tests"): Skip(
        "part of `make test` (pyproject's testpaths include examples/plugin_template/tests)"),
    ("docs/plugins.md", ".venv/bin/python -m core.plugins list --json"): Run(expect='"components"'),
    ("docs/plugins.md", ".venv/bin/python -m core.plugins list --kind rewards"): Run(expect="all_match"),
    ("docs/plugins.md", ".venv/bin/python -m core.plugins list --plugins qwen-vl,text"): Run(
        expect="not selected"),
    # ---- docs/training.md ----
    ("docs/training.md", ".venv/bin/python -m core.merge_lora ADAPTER_DIR --out DIR [--base PATH] "
                         "[--dtype bfloat16]"): SYNOPSIS,
}

# Whole kinds of command, by pattern: the OpenAI-compatible server and evaluation against one (their
# lines belong to the serving docs; tests/test_serve*.py and tests/test_evaluate_run.py run them).
PATTERNS: list[tuple[str, Skip]] = [
    (r"-m core\.serve\b", Skip("starts a server that runs until stopped (tests/test_serve*.py)")),
    (r"--rollout openai_server\b", Skip("needs a running OpenAI-compatible server (tests/test_evaluate_run.py)")),
]


# ---- the parser ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int
    text: str  # comment dropped, continuations joined, whitespace collapsed

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` that starts a shell word, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def fenced_commands(doc: str, text: str) -> list[DocCommand]:
    """The commands of the shell-fenced blocks of one Markdown file."""
    out: list[DocCommand] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not FENCE.match(lines[i]):
            i += 1
            continue
        i += 1
        pending, start = "", 0
        while i < len(lines) and not lines[i].strip().startswith("```"):
            raw = strip_comment(lines[i]) if not pending else lines[i].rstrip()
            if not pending:
                start = i + 1
            if raw.endswith("\\"):
                pending += raw[:-1] + " "
            elif pending or raw.strip():
                out.append(DocCommand(doc, start, " ".join(strip_comment(pending + raw).split())))
                pending = ""
            i += 1
        i += 1
    return out


def all_commands() -> list[DocCommand]:
    return [c for doc in DOCS for c in fenced_commands(doc, (ROOT / doc).read_text())]


def treatment(cmd: DocCommand) -> Run | Skip | None:
    if (cmd.doc, cmd.text) in COMMANDS:
        return COMMANDS[(cmd.doc, cmd.text)]
    for pattern, skip in PATTERNS:
        if re.search(pattern, cmd.text):
            return skip
    return None


def test_the_parser_reads_blocks_continuations_and_comments():
    text = "\n".join([
        "prose `python not a command`", "```bash", "make a   # comment", "", "# only a comment",
        "cmd --x 'a # b' \\", "    --y 1   # tail", "```", "```yaml", "key: value", "```",
        "  ```sh", "  indented run", "  ```"])
    assert [(c.line, c.text) for c in fenced_commands("x.md", text)] == [
        (3, "make a"), (6, "cmd --x 'a # b' --y 1"), (13, "indented run")]


def test_every_docs_command_is_classified():
    commands = all_commands()
    assert len(commands) >= 20, f"found only {len(commands)} fenced commands: is the parser broken?"
    unknown = [c for c in commands if treatment(c) is None]
    assert not unknown, (
        "fenced shell commands that tests/test_docs_commands.py does not classify; add each to COMMANDS (run at "
        "toy size, or skip with a reason):\n" + "\n".join(f"  {c.where}: ({c.doc!r}, {c.text!r})" for c in unknown))
    present = {(c.doc, c.text) for c in commands}
    stale = [key for key in COMMANDS if key not in present]
    assert not stale, "COMMANDS entries whose command is no longer in the docs:\n" + "\n".join(map(repr, stale))
    # What a newcomer pastes must use the venv the Makefile builds: a bare `python` or `pip` is whichever is on
    # PATH, where core and the plugins are not installed (a confusing "no plugin provides ..." error).
    checked = [c for c in commands if isinstance(treatment(c), Run) or treatment(c) is SYNOPSIS]
    bare = [c for c in checked if re.match(r"(python3?|pip3?|pytest)\b", c.text)]
    assert not bare, "use .venv/bin/python (or .venv/bin/pip) in docs commands:\n" + "\n".join(
        f"  {c.where}: {c.text}" for c in bare)


def test_readme_plugin_table_names_registered_components():
    """The README's plugin table lists each plugin's components as ``core.plugins list`` names them."""
    from core.plugins import PluginHost

    registry = PluginHost(None).registry
    rows = re.findall(r"^\| (models|rewards|tasks|devices|rollouts) \| (.*) \|$", (ROOT / "README.md").read_text(),
                      re.MULTILINE)
    assert [kind for kind, _ in rows] == ["models", "rewards", "tasks", "devices", "rollouts"], rows
    wrong = []
    for kind, cell in rows:
        for segment in cell.split(";"):
            plugin, _, listed = segment.partition(":")
            plugin = plugin.strip().strip("`")
            names = re.findall(r"`([\w-]+)`", re.sub(r"\([^)]*\)", "", listed))  # (remarks) dropped
            provided = [e.name for e in registry.entries(kind) if e.provider == f"vlmr1-plugin-{plugin}"]
            if sorted(names) != sorted(provided):
                wrong.append(f"{kind} row, plugin {plugin!r}: README lists {names}, the plugin provides {provided}")
    assert not wrong, "README.md's plugin table vs `core.plugins list`:\n" + "\n".join(wrong)


# ---- running them ----------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """``relative path -> (size, mtime_ns)`` of every file under ``folder``; links are not followed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                st = p.stat()
                out[p.relative_to(folder).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def output_folder(path: str) -> str | None:
    """The output folder a written path belongs to: ``runs/<name>``; None for the shared tiny-model cache."""
    parts = path.split("/")
    if parts[0] == ".cache":
        return None
    return "/".join(parts[:2]) if parts[0] == "runs" and len(parts) > 2 else path


def record_outputs(owners: dict[str, str], where: str, before: dict, after: dict, continues: str = "") -> None:
    """Attribute the files a command created, changed or deleted to output folders; fail on a shared one.

    ``owners`` maps each output folder to the command that first wrote it and is updated here.
    """
    touched = {p for p in after if before.get(p) != after[p]} | (set(before) - set(after))
    for folder in sorted({f for f in map(output_folder, touched) if f is not None}):
        assert folder.startswith("runs/"), f"{where}: wrote {folder} outside runs/ (and the tiny-model cache)"
        if folder in owners and folder != continues:
            pytest.fail(f"{where} writes into {folder}, the output folder of {owners[folder]}: give it its own "
                        f"logging.output_dir / --out / --output-dir")
        owners.setdefault(folder, where)


def test_output_folders_shared_by_two_commands_fail():
    """The README's old second command: 20 steps into the quickstart's folder, deleting its own checkpoint."""
    first = {"runs/quickstart/checkpoint-200/model.safetensors": (9, 1), "runs/quickstart/metrics.jsonl": (5, 1),
             ".cache/tiny/q/config.json": (1, 1)}
    owners: dict[str, str] = {}
    record_outputs(owners, "README.md:50", {}, first)
    assert owners == {"runs/quickstart": "README.md:50"}
    second = {**first, "runs/quickstart/metrics.jsonl": (7, 2)}  # checkpoint-20 written, then pruned
    with pytest.raises(pytest.fail.Exception, match="README.md:51 writes into runs/quickstart, the output folder "
                                                    "of README.md:50"):
        record_outputs(dict(owners), "README.md:51", first, second)
    record_outputs(dict(owners), "README.md:52", first, second, continues="runs/quickstart")  # a --resume
    record_outputs(owners, "README.md:53", first, {**first, "runs/quickstart-20/eval.json": (1, 3),
                                                   ".cache/tiny/q/model.safetensors": (1, 3)})
    assert owners["runs/quickstart-20"] == "README.md:53"
    with pytest.raises(AssertionError, match="wrote eval.json outside runs/"):
        record_outputs(owners, "docs/x.md:1", first, {**first, "eval.json": (1, 4)})


def shell_words(cmd: DocCommand, run: Run) -> list[str]:
    text = cmd.text
    for old, new in run.replace:
        assert old in text, f"{cmd.where}: the replacement {old!r} is not in {text!r}"
        text = text.replace(old, new)
    words = shlex.split(text)
    assert words[0] == VENV_PY, f"{cmd.where}: a runnable command starts with {VENV_PY}: {text}"
    # The extra overrides join the command's own (argparse takes one run of positionals: after a trailing
    # `--resume` a `key=value` would be read as its PATH).
    own = [i for i, w in enumerate(words) if "=" in w and not w.startswith("-")]
    at = own[-1] + 1 if own else len(words)
    return [sys.executable, *words[1:at], *run.extra, *words[at:]]


@pytest.mark.slow
def test_docs_commands_run_in_order_without_colliding(tmp_path):
    work = tmp_path / "clone"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MPLBACKEND": "Agg"}
    owners: dict[str, str] = {}  # output folder -> the command that first wrote it
    report = []
    for cmd in all_commands():
        run = treatment(cmd)
        if not isinstance(run, Run):
            continue
        words = shell_words(cmd, run)
        before = snapshot(work)
        t0 = time.perf_counter()
        try:
            proc = run_command(words, cwd=work, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{cmd.where}: still running after {COMMAND_TIMEOUT_S} s (toy size takes ~10 s on 2 idle "
                        f"cores; the limit allows a heavily shared machine): {shlex.join(words)}")
        seconds = time.perf_counter() - t0
        report.append(f"{seconds:6.1f} s  {cmd.where}")
        assert proc.returncode == 0, (f"{cmd.where}: exit {proc.returncode}: {shlex.join(words)}\n"
                                      f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        assert run.expect in proc.stdout, f"{cmd.where}: {run.expect!r} not in its output:\n{proc.stdout[-3000:]}"
        missing = [f for f in run.files if not (work / f).exists()]
        assert not missing, f"{cmd.where}: did not write {missing} (wrote {sorted(set(snapshot(work)) - set(before))})"
        record_outputs(owners, cmd.where, before, snapshot(work), continues=run.continues)
    print("\n".join(["docs commands run (seconds, where):", *report]))
    ran = sum(isinstance(treatment(c), Run) for c in all_commands())
    assert len(report) == ran >= 10
