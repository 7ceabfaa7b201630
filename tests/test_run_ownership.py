"""One run per output folder, resume only of the same model, checkpoints as closed sets (issue 21, items 1-3, 5).

Unit checks on real checkpoints written by :func:`save_checkpoint` (real torch optimizers), then the apps as
real processes on a tiny Qwen2.5-VL built offline: ``core.train``, ``core.evaluate``, ``core.serve``,
``core.sft``. The refusals all happen before weights load, so only one short training run is needed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core.config import ConfigError, build_config
from core.runtime import checkpoint as ck
from core.runtime import outdir
from core.runtime.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_trainer_state,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from core.runtime.outdir import OutputDirBusy, claim_output_dir, lock_output_dir, release_output_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
BASE = {"model": {"path": "/m"}, "task": {"name": "toy"}, "rewards": [{"name": "r"}]}
# Generous: the machine has 2 cores shared by several test runs.
SLOW = 900


def save(root: Path, step: int, run_id: str | None = "run-a", cfg=None, keep_last: int = 5, config_json=None,
         **state):
    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def save_model(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config_json or {"model_type": "lin", "hidden_size": 3}))

    cfg = cfg or build_config(BASE)
    extra = {"run_id": run_id} if run_id is not None else {}
    return save_checkpoint(root, step, save_model=save_model, optimizer=opt, scheduler=sched,
                           state={"config": cfg.model_dump(mode="json"), "num_processes": 1, **extra, **state},
                           keep_last=keep_last)


def resume(root: Path, *over: str, notes: list | None = None, dtype=None):
    cfg = build_config(BASE, ["checkpoint.resume=true", *over])
    return resolve_resume(cfg, root, log=(notes if notes is not None else []).append, dtype=dtype)


# ---- 1. one run per output folder -------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from core.runtime.outdir import lock_output_dir
    lock_output_dir(sys.argv[1], "holder")
    print("locked", flush=True)
    time.sleep(600)
""")


def hold_lock(folder: Path) -> subprocess.Popen:
    """A live process of another run holding ``folder``'s lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked", "the lock holder did not start (waited without limit)"
    return proc


def test_lock_names_the_live_owner_and_takes_over_a_dead_ones(tmp_path, capfd):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        with pytest.raises(OutputDirBusy, match=rf"in use by another run: pid {holder.pid} on host "
                                                rf"{socket.gethostname()} \(holder, since "):
            lock_output_dir(out, "core.train")
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing (kill -9): its lock is stale and taken over, with a note
    assert json.loads((out / outdir.LOCK).read_text())["pid"] == holder.pid
    lock_output_dir(out, "core.train")
    assert "took over the stale lock of pid" in capfd.readouterr().err
    assert json.loads((out / outdir.LOCK).read_text())["pid"] == os.getpid()
    with pytest.raises(OutputDirBusy, match="already used by a run in this process"):
        lock_output_dir(out, "core.train")
    release_output_dir(out)
    assert not (out / outdir.LOCK).exists()
    # a lock from another machine cannot be checked: refused, naming the host and the file to delete
    (out / outdir.LOCK).write_text(json.dumps({"pid": 1, "host": "node-7", "app": "core.train", "since": "x"}))
    with pytest.raises(OutputDirBusy, match=r"in use by pid 1 on host node-7 .*another machine.*if it has ended, "
                                            r"delete .*\.vlmr1\.lock"):
        lock_output_dir(out, "core.train")


def test_fresh_run_refuses_an_earlier_runs_checkpoints_and_start_over_moves_them(tmp_path):
    out = tmp_path / "out"
    save(out, 2)
    save(out, 4)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"holds the outputs of an earlier run \(checkpoint-2, checkpoint-4\).*"
                                          r"--resume.*--start-over"):
        claim_output_dir(out, resume_from=None, start_over=False, log=print)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]  # untouched
    notes: list[str] = []
    run_id = claim_output_dir(out, resume_from=None, start_over=True, log=notes.append)
    assert run_id and run_id != "run-a"
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("out.previous-")]
    assert len(moved) == 1 and notes == [f"note: --start-over: moved the earlier contents of {out} (3 entries) to "
                                         f"{moved[0]}"]
    assert sorted(p.name for p in moved[0].iterdir()) == ["checkpoint-2", "checkpoint-4", "metrics.jsonl"]
    assert [p.name for p in list_checkpoints(moved[0])] == ["checkpoint-2", "checkpoint-4"]  # intact
    assert list(out.iterdir()) == []
    # resuming continues the checkpoint's run id; --start-over would move the checkpoint it resumes
    save(out, 6)
    assert claim_output_dir(out, resume_from=out / "checkpoint-6", start_over=False) == "run-a"
    with pytest.raises(ConfigError, match="--start-over .* resumes from .*checkpoint-6, which is inside it"):
        claim_output_dir(out, resume_from=out / "checkpoint-6", start_over=True)


def test_pruning_touches_only_this_runs_checkpoints(tmp_path):
    save(tmp_path, 10, run_id="old")
    save(tmp_path, 20, run_id="old")
    for step in (1, 2, 3):
        save(tmp_path, step, run_id="new", keep_last=2)
    # before: by step number across runs, which deleted the new run's own checkpoints 1, 2 and 3
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3", "checkpoint-10",
                                                            "checkpoint-20"]


def test_damaged_newest_checkpoint_is_refused_unless_forced(tmp_path):
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    with open(newest / "model.safetensors", "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match=r"newest checkpoint in .* cannot be used: checkpoint-4 "
                                              r"\(model.safetensors has 10 bytes.*would discard every step since it"):
        resume(tmp_path)
    notes: list[str] = []
    assert resume(tmp_path, "checkpoint.resume_force=true", notes=notes) == tmp_path / "checkpoint-2"
    assert notes[0].startswith("warning: --resume-force: the newest checkpoint in ") and "steps after it are lost" \
        in notes[0]
    # a truncated manifest likewise; and checkpoint.resume=auto never starts fresh past a damaged checkpoint
    (newest / "manifest.json").write_text('{"format": 2, "fil')
    with pytest.raises(CheckpointError, match="checkpoint-4 .*manifest.json is unreadable"):
        resume(tmp_path, "checkpoint.resume=auto")


# ---- 2. resume only of the same model --------------------------------------------------------
def test_resume_refuses_a_different_model(tmp_path):
    save(tmp_path, 2, cfg=build_config(BASE, ["model.family=qwen2_5_vl"]),
         config_json={"model_type": "qwen2_5_vl", "text_config": {"hidden_size": 64}, "dtype": "float32"})
    same = ["model.family=qwen2_5_vl"]
    assert resume(tmp_path, *same) == tmp_path / "checkpoint-2"
    with pytest.raises(CheckpointError, match=r"model.path: '/m' -> '/other' \(changes the model"):
        resume(tmp_path, *same, "model.path=/other")
    with pytest.raises(CheckpointError, match=r"model.family: 'qwen2_5_vl' -> 'qwen2_vl'"):
        resume(tmp_path, "model.family=qwen2_vl")
    with pytest.raises(CheckpointError, match=r"model.tiny: None -> \{'hidden_size': 32\}"):
        resume(tmp_path, *same, "model.tiny={hidden_size: 32}")
    with pytest.raises(CheckpointError, match=r"train.lora.r: 64 -> 4"):
        resume(tmp_path, *same, "train.lora.r=4")
    with pytest.raises(CheckpointError, match=r"model dtype: 'float32' -> 'bfloat16'"):
        resume(tmp_path, *same, dtype=torch.bfloat16)
    # the same path now holding a model of another size
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "text_config": {"hidden_size": 32}}))
    save(tmp_path / "b", 2, cfg=build_config(BASE, [f"model.path={base}"]),
         config_json={"model_type": "qwen2_5_vl", "text_config": {"hidden_size": 64}})
    with pytest.raises(CheckpointError, match=r"checkpoint-2 is not a .*base model \(text_config.hidden_size: 64 "
                                              r"-> 32\)"):
        resume(tmp_path / "b", f"model.path={base}")
    notes: list[str] = []
    assert resume(tmp_path / "b", f"model.path={base}", "checkpoint.resume_force=true", notes=notes)
    assert notes == [f"warning: --resume-force: changed since checkpoint-2: the model: checkpoint-2 is not a {base} "
                     "model (text_config.hidden_size: 64 -> 32)"]


# ---- 3. checkpoints are closed sets ----------------------------------------------------------
def test_an_unlisted_file_is_refused_everywhere(tmp_path):
    ckpt = save(tmp_path, 2)
    verify_checkpoint(ckpt)
    (ckpt / "adapter_model.safetensors").write_bytes(b"planted")  # changes what a PEFT-aware load picks up
    msg = "adapter_model.safetensors is not listed in its manifest.json"
    for check in (lambda: verify_checkpoint(ckpt, hashes=False), lambda: load_trainer_state(ckpt),
                  lambda: resume(tmp_path, "checkpoint.resume_force=true")):
        with pytest.raises(CheckpointError, match=msg):
            check()
    # a plain transformers folder (no manifest, no trainer state) has nothing to be verified against
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    verify_checkpoint(plain)
    # a trainer state without a manifest is an unfinished save, not a plain folder
    (plain / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        verify_checkpoint(plain)


# ---- 5. any trainer_state.json content: one clear error ---------------------------------------
BAD_STATES = {
    "non-numeric step": (lambda m: m.update(step="abc"), r"'step' must be a non-negative integer, not \"abc\""),
    "negative step": (lambda m: m.update(step=-3), r"'step' must be a non-negative integer, not -3"),
    "float step": (lambda m: m.update(step=2.5), "'step' must be a non-negative integer"),
    "bool step": (lambda m: m.update(step=True), "'step' must be a non-negative integer"),
    "step of another folder": (lambda m: m.update(step=7), "'step' is 7 but the folder is checkpoint-2"),
    "missing step": (lambda m: m.pop("step"), "it has no 'step'"),
    "missing state": (lambda m: m.pop("state"), "it has no 'state'"),
    "config a list": (lambda m: m.update(config=[1]), "'config' must be an object"),
    "num_processes text": (lambda m: m.update(num_processes="2"), "'num_processes' must be a positive integer"),
    "num_processes 0": (lambda m: m.update(num_processes=0), "'num_processes' must be a positive integer"),
    "eval a string": (lambda m: m.update(eval="x"), "'eval' must be an object"),
    "run id a number": (lambda m: m.update(run_id=5), "'run_id' must be a string"),
    "state a string": (lambda m: m.update(state="x"), "'state' must be an object"),
    "state badly nested": (lambda m: m.update(state={"__items__": 5}), "the \"state\" of its trainer_state.json is "
                                                                      "malformed"),
    "wrong format": (lambda m: m.update(format="2"), "'format' must be 2"),
}


@pytest.mark.parametrize("case", list(BAD_STATES) + ["a list", "not JSON", "not UTF-8"])
def test_any_trainer_state_content_is_one_clear_error(tmp_path, case):
    ckpt = save(tmp_path, 2)
    path = ckpt / "trainer_state.json"
    if case == "a list":
        path.write_text("[1, 2]")
        expect = "not a vlmr1 trainer state \\(a JSON list"
    elif case == "not JSON":
        path.write_text('{"step": ')
        expect = "cannot read trainer_state.json"
    elif case == "not UTF-8":
        path.write_bytes(b'{"step": "\xff"}')
        expect = "cannot read trainer_state.json"
    else:
        edit, expect = BAD_STATES[case]
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))
    write_manifest(ckpt)  # re-listed: the content itself, not the hash, must be what is refused
    checks = [lambda: load_trainer_state(ckpt)]
    if case != "state badly nested":  # resume reads the metadata; the state's nesting is read at restore
        checks.append(lambda: resume(tmp_path))
    for check in checks:
        with pytest.raises(CheckpointError, match=expect):
            check()
    assert ck.run_id_of(ckpt) in (None, "", "run-a")  # listing never raises on it either


# ---- the apps, as real processes ------------------------------------------------------------
def write_config(tiny: Path, out: Path, **over) -> Path:
    """A 2-step run into ``out`` (config file beside it) on the tiny model at ``tiny`` (built on first use)."""
    import yaml

    cfg = {
        "model": {"family": "qwen2_5_vl", "path": str(tiny), "tiny": {"hidden_size": 64, "num_layers": 2}},
        "task": {"name": "synthetic_color", "options": {"num_train": 32, "num_eval": 4}},
        "rewards": [{"name": "all_match"}],
        "grpo": {"num_generations": 2, "max_completion_length": 2, "beta": 0.04},
        "train": {"learning_rate": 1e-3, "per_device_batch_size": 4, "max_steps": 2, "seed": 1},
        "logging": {"output_dir": str(out), "tensorboard": False, "progress_bar": False, "plot": False,
                    "log_completions_every": 0},
        "checkpoint": {"save_every": 1, "keep_last": 5},
        "eval": {"enabled": False},
    }
    for key, val in over.items():
        sec, name = key.split("__")
        cfg[sec][name] = val
    path = out.parent / f"config-{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def app(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=SLOW)


def refused(proc: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit 2 with one ``error:`` paragraph holding ``parts``, no traceback."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    for part in parts:
        assert part in line, (part, line)
    return line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One real 2-step run with a checkpoint per step (``checkpoint-1``, ``checkpoint-2``)."""
    tmp = tmp_path_factory.mktemp("own")
    out = tmp / "out"
    cfg = write_config(tmp / "tiny", out)
    proc = app("core.train", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / outdir.LOCK).exists()  # released at the end
    return tmp, out, cfg


def test_apps_refuse_what_would_lose_or_mix_runs(run_dir, tmp_path):
    import shutil

    tmp, out, cfg = run_dir
    work = tmp_path / "out"
    shutil.copytree(out, work)
    wcfg = write_config(tmp / "tiny", work)
    # a second fresh run into the folder (before: exit 0, its checkpoints pruned by the old run's higher steps)
    refused(app("core.train", "--config", str(wcfg)), "holds the outputs of an earlier run (checkpoint-1, "
            "checkpoint-2)", "--start-over")
    # a second run while the first still holds the folder
    holder = hold_lock(work)
    try:
        refused(app("core.train", "--config", str(wcfg), "--resume"), f"in use by another run: pid {holder.pid} on "
                f"host {socket.gethostname()}")
    finally:
        holder.kill()
        holder.wait()
    # resume of a different model (before: a note, then KL against another model)
    refused(app("core.train", "--config", str(wcfg), "--resume", "model.tiny.hidden_size=32"),
            "model.tiny.hidden_size: 64 -> 32 (changes the model", "--resume-force")
    # a damaged newest checkpoint (before: checkpoint-1 taken without a word)
    meta = json.loads((work / "checkpoint-2" / "trainer_state.json").read_text())
    meta["step"] = "two"
    (work / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(meta))
    write_manifest(work / "checkpoint-2")
    refused(app("core.train", "--config", str(wcfg), "--resume"), "trainer_state.json: 'step' must be a "
            "non-negative integer, not \"two\"")
    # SFT into a folder holding a run's checkpoints
    refused(app("core.sft", "--config", str(wcfg), "--output-dir", str(work)),
            f"--output-dir {work} holds the outputs of an earlier run", "--start-over")


def test_start_over_moves_the_earlier_run_aside_and_trains(run_dir, tmp_path):
    import shutil

    tmp, out, _ = run_dir
    work = tmp_path / "out"
    shutil.copytree(out, work)
    cfg = write_config(tmp / "tiny", work, train__max_steps=1, checkpoint__keep_last=1)
    proc = app("core.train", "--config", str(cfg), "--start-over")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"moved the earlier contents of {work}" in proc.stdout
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("out.previous-")]
    assert [p.name for p in list_checkpoints(aside)] == ["checkpoint-1", "checkpoint-2"]
    assert [p.name for p in list_checkpoints(work)] == ["checkpoint-1"]
    ids = {ck.run_id_of(p) for p in [*list_checkpoints(aside), *list_checkpoints(work)]}
    assert len(ids) == 2 and "" not in ids  # every checkpoint names its run


def test_evaluate_and_serve_refuse_unlisted_and_altered_files(run_dir, tmp_path):
    import shutil

    tmp, out, cfg = run_dir
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", ckpt)
    (ckpt / "adapter_config.json").write_text("{}")  # planted beside the full weights
    refused(app("core.evaluate", "--config", str(cfg), "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev")),
            "adapter_config.json is not listed in its manifest.json")
    refused(app("core.serve", str(ckpt), "--port", "0"), "adapter_config.json is not listed in its manifest.json")
    (ckpt / "adapter_config.json").unlink()
    # same size, other content: only the hashes tell (before: evaluate and serve checked none)
    state = (ckpt / "trainer_state.json").read_text()
    (ckpt / "trainer_state.json").write_text(state.replace('"step": 2', '"step": 3', 1))
    refused(app("core.serve", str(ckpt), "--port", "0"), "trainer_state.json does not match its SHA-256")
    # a run folder whose newest checkpoint is damaged is not silently evaluated at an older step
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "checkpoint-2" / "model.safetensors").write_bytes(b"")
    refused(app("core.evaluate", "--config", str(cfg), "--checkpoint", str(run), "--out", str(tmp_path / "ev")),
            "its newest checkpoint, checkpoint-2, cannot be used: model.safetensors has 0 bytes")
    # --no-verify-hashes skips only the hashes: the altered checkpoint loads for serving
    from core.serving.model_server import load_for_serving

    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        load_for_serving(ckpt, plugins=None, device="cpu")
    bundle, _, _ = load_for_serving(ckpt, plugins=None, device="cpu", verify_hashes=False)
    assert bundle.model is not None


def test_forced_resume_takes_the_reference_from_the_saving_runs_model(run_dir, tmp_path):
    """``--resume-force`` with another ``model.path``: the reference still comes from the saving run's model."""
    import shutil

    tmp, out, _ = run_dir
    work = tmp_path / "out"
    work.mkdir()
    shutil.copytree(out / "checkpoint-1", work / "checkpoint-1")
    # model.path now names a folder whose weights cannot load: the run succeeds only if nothing reads them
    other = tmp_path / "other-model"
    shutil.copytree(tmp / "tiny", other)
    (other / "model.safetensors").write_bytes(b"not weights")
    cfg = write_config(tmp / "tiny", work)
    refused(app("core.train", "--config", str(cfg), "--resume", f"model.path={other}"),
            f"model.path: '{tmp / 'tiny'}' -> '{other}' (changes the model")
    proc = app("core.train", "--config", str(cfg), "--resume", "--resume-force", f"model.path={other}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"note: the reference model (and a LoRA base) is {tmp / 'tiny'}, the model checkpoint-1 was trained " \
           f"from, not model.path={other}" in proc.stdout
    assert [p.name for p in list_checkpoints(work)] == ["checkpoint-1", "checkpoint-2"]


def test_the_same_model_moved_elsewhere_may_resume(tmp_path):
    import shutil

    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text(json.dumps({"model_type": "lin", "hidden_size": 3}))
    (a / "model.safetensors").write_bytes(b"weights-1")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    save(tmp_path / "out", 2, cfg=build_config(BASE, [f"model.path={a}"]))
    notes: list[str] = []
    assert resume(tmp_path / "out", f"model.path={b}", notes=notes) == tmp_path / "out" / "checkpoint-2"
    assert notes == [f"note: model.path: '{a}' -> '{b}' holds the same model files (same SHA-256)"]
    (b / "model.safetensors").write_bytes(b"weights-2")  # same size, other weights: another model
    ck.same_model_files.cache_clear()
    with pytest.raises(CheckpointError, match=rf"model.path: '{a}' -> '{b}' \(changes the model"):
        resume(tmp_path / "out", f"model.path={b}")
