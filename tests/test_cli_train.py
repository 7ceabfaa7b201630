"""``python -m core.train --dry-run``: validates config + plugins, prints config and plan, loads no weights.

Uses ``tests/fixtures/configs/dry_run.yaml`` with the fixture plugins of ``tests/fixtures/site``
(on ``sys.path`` in-process, on ``PYTHONPATH`` for the subprocess).
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from core.testing.procs import run_command
from core.train import main

FIXTURES = Path(__file__).parent / "fixtures"
SITE = FIXTURES / "site"
CONFIG = FIXTURES / "configs" / "dry_run.yaml"


def split_output(out: str) -> tuple[dict, dict]:
    """The two documents ``--dry-run`` prints: the resolved config (YAML) and the plan (JSON)."""
    head, plan = out.split("# plan\n", 1)
    return yaml.safe_load(head.split("# resolved config\n", 1)[1]), json.loads(plan)


def test_dry_run_subprocess_loads_no_weights():
    # A fresh interpreter, so "torch was never imported" proves no model or weights were loaded.
    code = ("import sys\nfrom core.train import main\nrc = main(sys.argv[1:])\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules),"
            " file=sys.stderr)\nsys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = run_command([sys.executable, "-c", code, "--config", str(CONFIG), "--dry-run", "train.max_steps=5"],
                       capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr
    assert elapsed < 20, elapsed  # validation only: well under a second of work plus interpreter start
    cfg, plan = split_output(proc.stdout)
    assert cfg["model"]["path"] == "/nonexistent/checkpoint"  # never opened
    assert cfg["train"]["max_steps"] == 5 and cfg["train"]["learning_rate"] == 1e-5
    assert plan["task"] == "vlmr1-plugin-fixtures:fixture_colours"
    assert plan["rewards"] == [{"name": "vlmr1-plugin-fixtures:dup", "weight": 1.0},
                               {"name": "vlmr1:accuracy", "weight": 0.5}]
    assert (plan["device"], plan["rollout"]) == ("vlmr1:cpu", "vlmr1:transformers")
    assert plan["options"]["task"] == {"num_samples": 4, "image_size": 8, "mode": "single"}
    assert plan["batch"] == {"num_processes": 1, "completions_per_step": 8, "prompts_per_step": 2,
                             "completions_per_micro_batch": 4, "micro_batches_per_step": 2, "optimizer_steps": 5,
                             "optimizer_updates_per_step": 1, "total_completions": 40}


@pytest.fixture
def site(monkeypatch):
    monkeypatch.syspath_prepend(str(SITE))


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["--config", str(CONFIG), "--dry-run", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_dry_run_world_size_and_resume(site, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, out, err = run(capsys, "--resume")
    assert rc == 0, err
    cfg, plan = split_output(out)
    assert cfg["checkpoint"]["resume"] is True  # --resume: the latest checkpoint, an error if none
    assert plan["batch"]["num_processes"] == 2 and plan["batch"]["prompts_per_step"] == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.learnig_rate=1e-5"], "error: override 'train.learnig_rate=1e-5': unknown key 'train.learnig_rate'. "
                                      "Did you mean 'train.learning_rate'?"),
        (["task.options.mode=triple"], "task.options.mode = 'triple': Input should be 'single' or 'pair'. (task "
                                       "vlmr1-plugin-fixtures:fixture_colours takes the options: num_samples, "
                                       "image_size, mode.)"),
        (["task.name=colours"], "task.name: no task named 'colours'. Did you mean 'fixture_colours'? "
                                "Available tasks: mixture, fixture_colours."),
        # --plugins wins over the config's `plugins:`; two providers of `dup` make the bare name ambiguous.
        (["--plugins", "fixtures,dup", "rewards.0.name=dup"],
         "reward 'dup' is ambiguous: it is provided by 2 plugins (vlmr1-plugin-dup, vlmr1-plugin-fixtures)"),
        (["--plugins", "none"], "no task named 'fixture_colours'. Did you mean 'mixture'? Available tasks: mixture."),
        (["--plugins", "fixtures,broken", "--strict-plugins"], "plugin vlmr1-plugin-broken 0.3.1 failed (strict mode)"),
        (["train.per_device_batch_size=3"], "not divisible by grpo.num_generations=4"),
    ],
)
def test_dry_run_errors_exit_nonzero_with_one_message(site, capsys, args, message):
    rc, out, err = run(capsys, *args)
    assert rc == 2
    assert out == ""
    assert message in err


def test_broken_plugin_is_a_warning_when_not_needed(site, capsys):
    rc, out, err = run(capsys, "--plugins", "fixtures,broken")
    assert rc == 0
    # The documented line (docs/plugins.md §6): distribution, version, status and the reason.
    assert ("warning: plugin vlmr1-plugin-broken 0.3.1 failed (ImportError: vlmr1_broken needs libfixture >= 2 "
            "(deliberately broken test fixture)); run `python -m core.plugins list` for the traceback") in err


def test_misspelt_key_in_file_names_the_line(site, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("  max_steps: 3", "  max_step: 3"))
    line = bad.read_text().splitlines().index("  max_step: 3") + 1
    rc = main(["--config", str(bad), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}:{line}: unknown key 'train.max_step'. Did you mean 'train.max_steps'?" in err


def test_missing_config_file(capsys):
    assert main(["--config", "/no/such/run.yaml", "--dry-run"]) == 2
    assert "config file /no/such/run.yaml does not exist" in capsys.readouterr().err


# Every run config under examples/ (accelerate launcher configs in examples/multinode are not run configs).
EXAMPLES = sorted(p for p in (FIXTURES.parents[1] / "examples").rglob("*.yaml")
                  if "plugin_template" not in p.parts and not p.name.startswith("accelerate_"))


@pytest.mark.parametrize("config", EXAMPLES, ids=[str(p.relative_to(FIXTURES.parents[1])) for p in EXAMPLES])
def test_every_example_config_validates(config, capsys):
    # With every installed plugin, as a user would run it; no weights are loaded.
    rc = main(["--config", str(config), "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "# plan" in out
