"""A task sample the model family cannot render stops the run before step 1 (issue 22, item 3).

Before: a sample whose image placeholders did not match its images (or whose messages the chat
template cannot render) passed loading and ``--dry-run``, and ``core.train`` died at step 1 with
a raw transformers traceback naming neither the task nor the sample. Now the per-row screen
(:mod:`core.runtime.data_limits`) refuses placeholder mismatches under the task's bad-row policy,
and the render check takes the first samples through the family's chat template and processor
(no weights) at start-up and in ``--dry-run``: one ``error:`` paragraph naming the task and sample.
Real tiny Qwen2.5-VL processor; real ``python -m core.train`` subprocesses with a throwaway task plugin.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from core.interfaces import DataError, Sample
from core.testing import make_image, make_sample, write_distribution
from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]

# A task plugin a third-party author might write. ``mode`` picks the fault in rows 1 and 5:
# ``missing``: an image attached but no {"type": "image"} part; ``double``: two parts, one image;
# ``int_content``: a text-only row whose user content is a number (the chat template cannot iterate it).
_TASK_PLUGIN = '''
from pydantic import BaseModel, ConfigDict
from PIL import Image

from core.hookspecs import hookimpl
from core.interfaces import Sample, TaskFormat


def _image():
    return Image.new("RGB", (28, 28), (200, 30, 30))


class Faulty(TaskFormat):
    name = "faulty_render"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mode: str = "missing"
        skip: bool = False
        num: int = 8

    def load(self, split="train"):
        out = []
        for i in range(self.options.num):
            bad = i in (1, 5)  # row 1 is in step 1's batch (no shuffle): before, step 1 crashed
            images, content = [_image], [{"type": "image"}, {"type": "text", "text": "What colour is this image?"}]
            if bad and self.options.mode == "missing":
                content = content[1:]
            elif bad and self.options.mode == "double":
                content = [{"type": "image"}, *content]
            elif bad and self.options.mode == "int_content":
                images, content = [], 42
            out.append(Sample(id=f"{split}-{i}", images=images, messages=[{"role": "user", "content": content}],
                              solution="red", reward_method="all_match",
                              meta={"source_file": f"gen/{split}.rows", "source_line": i + 1}))
        return out

    def skips_bad_samples(self):
        return self.options.skip


@hookimpl
def vlmr1_register_tasks(register):
    register(Faulty)
'''


@pytest.fixture(scope="module")
def tiny(tiny_qwen_path) -> Path:
    """The shared tiny Qwen2.5-VL checkpoint on disk (so ``--dry-run`` can load its processor)."""
    return tiny_qwen_path


@pytest.fixture(scope="module")
def family_and_processor(tiny):
    from core.plugins.host import PluginHost

    fam = PluginHost().registry.get("models", "qwen2_5_vl")()
    return fam, fam.load_processor(tiny)


def _where(sample: Sample, i: int) -> Sample:
    sample.meta.update(source_file="data.jsonl", source_line=i)
    return sample


def test_screen_refuses_image_placeholders_that_do_not_match_the_images(family_and_processor):
    from core.runtime.data_limits import PromptScreen

    _, proc = family_and_processor
    img = make_image()
    good = _where(make_sample(images=[img], id="good"), 1)
    missing = _where(make_sample(images=[img], id="no-placeholder"), 2)
    missing.messages[0]["content"] = missing.messages[0]["content"][1:]  # the text only
    double = _where(make_sample(images=[img], id="two-placeholders"), 3)
    double.messages[0]["content"].insert(0, {"type": "image"})
    screen = PromptScreen(proc, 4096, "my_task")

    with pytest.raises(DataError) as err:
        screen.screen([good, missing], skip=False, log=lambda m: None)
    msg = str(err.value)
    assert msg.startswith("data.jsonl:2: task 'my_task', sample 'no-placeholder': the prompt has 0 image "
                          "placeholder(s)"), msg
    assert "but the sample has 1 image(s)" in msg and "[image_placeholders]" in msg

    with pytest.raises(DataError, match=r"data.jsonl:3: .*'two-placeholders': the prompt has 2 image placeholder"):
        screen.screen([double], skip=False, log=lambda m: None)

    logged: list[str] = []
    kept, counts = screen.screen([good, missing, double], skip=True, log=logged.append)
    assert [s.id for s in kept] == ["good"]
    assert counts == {"image_placeholders": 2}
    assert "warning: skipped 2 train row(s) for their prompt: image_placeholders 2" in logged


def test_render_check_names_the_task_the_sample_and_the_processors_complaint(family_and_processor):
    from core.runtime.data_limits import check_render

    fam, proc = family_and_processor
    good = [_where(make_sample(images=[make_image()], id=f"ok{i}"), i + 1) for i in range(2)]
    assert check_render(fam, proc, good, task_name="my_task") == 2
    bad = _where(Sample(id="numeric", images=[], messages=[{"role": "user", "content": 42}]), 7)
    with pytest.raises(DataError) as err:
        check_render(fam, proc, [*good, bad], task_name="my_task")
    msg = str(err.value)
    assert msg.startswith("data.jsonl:7: task 'my_task', sample 'numeric': model family 'qwen2_5_vl' cannot render "
                          "this sample as generation would: TypeError: 'int' object is not iterable"), msg
    # Only the first few are rendered (the check is cheap): a bad fifth sample is left to the run.
    assert check_render(fam, proc, [*good, *good, bad], task_name="my_task", n=4) == 4


def _run(tmp_path: Path, tiny: Path, task: dict, *extra: str, save: bool = False):
    """``python -m core.train`` with the throwaway task plugin on PYTHONPATH (generous time limit: a busy machine)."""
    site = tmp_path / "site"
    write_distribution(site, "vlmr1-plugin-faulty", "0.2.0", modules={"faulty_pkg/hooks.py": _TASK_PLUGIN},
                       entry_points={"faulty": "faulty_pkg.hooks"})
    cfg = {
        "model": {"family": "qwen2_5_vl", "path": str(tiny)},
        "task": task,
        "rewards": [{"name": "default"}],
        "grpo": {"num_generations": 2, "max_completion_length": 2, "beta": 0.0},
        "train": {"per_device_batch_size": 4, "max_steps": 1, "shuffle": False},
        "logging": {"output_dir": str(tmp_path / "out"), "tensorboard": False, "progress_bar": False, "plot": False},
        "checkpoint": {"save_every": 1 if save else 0, "save_final": save},
        "eval": {"enabled": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return run_command([sys.executable, "-m", "core.train", "--config", str(path), *extra], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)


def _one_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("mode, says", [
    ("int_content", "gen/train.rows:2: task 'faulty_render', sample 'train-1': model family 'qwen2_5_vl' cannot "
                    "render this sample as generation would: TypeError: 'int' object is not iterable"),
    ("missing", "gen/train.rows:2: task 'faulty_render', sample 'train-1': the prompt has 0 image placeholder(s)"),
])
def test_dry_run_catches_a_sample_the_family_cannot_render(tmp_path, tiny, mode, says):
    """Before: --dry-run exited 0 and the real run died at step 1 with a transformers traceback."""
    proc = _run(tmp_path, tiny, {"name": "faulty_render", "options": {"mode": mode}}, "--dry-run")
    assert says in _one_error(proc)
    assert "# plan" in proc.stdout  # the plan is still printed first
    assert not (tmp_path / "out").exists()


def test_dry_run_renders_good_samples_and_skips_without_a_local_model(tmp_path, tiny):
    proc = _run(tmp_path, tiny, {"name": "faulty_render", "options": {"mode": "missing", "skip": True}}, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "render check: the first 4 training sample(s) of task 'faulty_render' render through model family " \
           "'qwen2_5_vl'" in proc.stderr
    # A tiny checkpoint not built yet: --dry-run builds nothing and says the check waits for the run.
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    cfg["model"] = {"family": "qwen2_5_vl", "path": str(tmp_path / "unbuilt"), "tiny": {}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = run_command([sys.executable, "-m", "core.train", "--config", str(tmp_path / "config.yaml"), "--dry-run"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: render check skipped (model.tiny is not built yet)" in proc.stderr
    assert not (tmp_path / "unbuilt").exists()


def test_train_refuses_a_missing_placeholder_before_weights_load(tmp_path, tiny):
    """Before: exit 1 at step 1 with 'The total number of <|image_pad|> tokens ...' and a traceback."""
    proc = _run(tmp_path, tiny, {"name": "faulty_render", "options": {"mode": "double"}}, save=True)
    error = _one_error(proc)
    assert "gen/train.rows:2: task 'faulty_render', sample 'train-1': the prompt has 2 image placeholder(s)" in error
    assert "(set on_bad_row: skip to skip such rows)" in error
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_train_skips_and_counts_mismatched_rows_under_skip(tmp_path, tiny):
    proc = _run(tmp_path, tiny, {"name": "faulty_render", "options": {"mode": "missing", "skip": True}})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "warning: skipping gen/train.rows:2 (train): the prompt has 0 image placeholder(s)" in text
    assert "warning: skipped 2 train row(s) for their prompt: image_placeholders 2" in text
    assert (tmp_path / "out" / "metrics.jsonl").read_text().strip()


def test_jsonl_rows_with_more_tags_than_images_name_file_and_line(tmp_path, tiny):
    """The jsonl task's own check (image_tag_mismatch); a row with no tag gets its placeholder prepended."""
    img = tmp_path / "a.png"
    make_image().save(img)
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "red"}]}
            for q in ("<image>What colour?", "What colour?", "<image><image>What colour?", "<image>Colour?")]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"name": "vlmr1_jsonl", "options": {"data_files": [str(data)], "image_folders": [str(tmp_path)],
                                              "on_bad_row": "error"}}
    error = _one_error(_run(tmp_path, tiny, task, save=True))
    assert f"{data}:3: " in error and "2 <image> tag(s) but the row has 1 image(s)" in error, error
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    # Under skip the row is counted, and the tag-less row 2 renders (placeholder prepended): --dry-run passes.
    task["options"]["on_bad_row"] = "skip"
    proc = _run(tmp_path, tiny, task, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping {data}:3: the human turn has 2 <image> tag(s) but the row has 1 image(s) " \
           "[image_tag_mismatch]" in proc.stderr
    assert "render check: the first 3 training sample(s)" in proc.stderr


# ---- the same "machine busy?" hint as core.testing.procs when a served model starts too slowly ----------
def test_server_process_startup_timeout_says_machine_busy(tmp_path):
    """A 0.05 s limit: ``python -m core.serve`` cannot even import torch in that time, so the limit is what ends it."""
    from core.serving import ServerProcess

    srv = ServerProcess(tmp_path / "no-checkpoint", startup_timeout=0.05)
    with pytest.raises(RuntimeError) as err:
        srv.start()
    srv.stop()
    assert "core.serve did not start within 0 s (machine busy? other jobs on these cores slow every step; rerun " \
           "with VLMR1_TEST_TIMEOUT_SCALE=3 for longer limits in tests, or give a larger startup_timeout)" \
           in str(err.value)
