"""Checkpoints: no code runs on load, tampering is refused, re-saves survive a kill, resume checks the config.

Real torch optimizers and schedulers; faults are injected where a kill or a full disk would hit.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import ConfigError, build_config
from core.runtime import checkpoint as ck
from core.runtime.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    recover,
    resolve_resume,
    save_checkpoint,
    set_rng_state,
)
from core.runtime.outdir import check_output_dir

BASE = {"model": {"path": "/m"}, "task": {"name": "toy"}, "rewards": [{"name": "r"}]}


def trained(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    from transformers import get_scheduler

    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
    for _ in range(2):
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def save(root: Path, step: int, cfg=None, keep_last: int = 5, save_model=None, **state):
    model, opt, sched = trained(step)

    def default_model(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text("{}")

    cfg = cfg or build_config(BASE)
    return save_checkpoint(root, step, save_model=save_model or default_model, optimizer=opt, scheduler=sched,
                           state={"config": cfg.model_dump(mode="json"), "num_processes": 1, **state},
                           keep_last=keep_last)


# ---- section 1: nothing from a checkpoint runs code ----------------------------------------
def test_trainer_state_round_trips_without_pickle(tmp_path):
    random.seed(5)
    np.random.seed(6)
    ckpt = save(tmp_path, 2)
    expected = (random.random(), np.random.rand(), torch.rand(1))  # the draws right after the save
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["config.json", "manifest.json", "model.safetensors", "trainer_state.json",
                     "trainer_state.safetensors"]
    _, opt, sched = trained(2)
    state, meta = load_trainer_state(ckpt)
    assert meta["step"] == 2 and meta["num_processes"] == 1
    ref = opt.state_dict()
    assert state["optimizer"]["param_groups"] == ref["param_groups"]  # tuples (betas) come back as tuples
    for k, s in ref["state"].items():
        for name, v in s.items():
            assert torch.equal(state["optimizer"]["state"][k][name], v)
    assert state["scheduler"] == sched.state_dict()
    # the restored optimizer/scheduler/RNG are usable as they are
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


class Payload:
    """Unpickling this runs code (what a planted object in a pickled state file would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_planted_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "ran"
    ckpt = save(tmp_path / "out", 2)
    # An attacker (or an older vlmr1) leaves a pickled state beside or instead of the safe one.
    (ckpt / "trainer_state.pt").write_bytes(pickle.dumps({"optimizer": Payload(str(marker))}))
    with pytest.raises(CheckpointError, match="trainer_state.pt is not listed in its manifest.json"):
        load_trainer_state(ckpt)  # a checkpoint is a closed set
    state, _ = load_trainer_state(ckpt, verify=False)  # and unverified, only JSON + safetensors are read
    assert not marker.exists() and "optimizer" in state
    # A legacy-format checkpoint (pickle only) is refused with a reason, and nothing runs.
    legacy = tmp_path / "legacy" / "checkpoint-3"
    legacy.mkdir(parents=True)
    (legacy / "trainer_state.pt").write_bytes(pickle.dumps({"optimizer": Payload(str(marker))}))
    (legacy / "trainer_state.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(CheckpointError, match="older vlmr1.*pickle"):
        load_trainer_state(legacy)
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*; checkpoint-3 is there but it was "
                                              "written by an older vlmr1"):
        resolve_resume(build_config(BASE, ["checkpoint.resume=true"]), legacy.parent, log=lambda m: None)
    cfg = build_config(BASE, [f"checkpoint.resume={legacy}"])
    with pytest.raises(CheckpointError, match="not a complete vlmr1 checkpoint"):
        resolve_resume(cfg, tmp_path / "legacy", log=lambda m: None)
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["trainer_state.json", "trainer_state.safetensors", "model.safetensors"])
def test_tampered_file_is_refused(tmp_path, victim):
    ckpt = save(tmp_path, 4)
    data = bytearray((ckpt / victim).read_bytes())
    data[-2] ^= 0x01  # same size, different content
    (ckpt / victim).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim} does not match its SHA-256"):
        load_trainer_state(ckpt)
    cfg = build_config(BASE, ["checkpoint.resume=true"])
    with pytest.raises(CheckpointError, match="cannot be used"):
        resolve_resume(cfg, tmp_path, log=lambda m: None)


@pytest.mark.parametrize("entry", [{"../../etc/hostname": {"size": 1}}, {"/etc/hostname": {"size": 1}},
                                   {"model.safetensors": "x"}])
def test_malformed_manifest_is_refused(tmp_path, entry):
    ckpt = save(tmp_path, 2)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"].update(entry)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest.json is malformed"):
        load_trainer_state(ckpt)
    assert list_checkpoints(tmp_path) == []


def test_state_json_cannot_smuggle_objects(tmp_path):
    ckpt = save(tmp_path, 1)
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    meta["state"] = {"__object__": "os.system"}
    (ckpt / "trainer_state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unexpected object"):
        load_trainer_state(ckpt, verify=False)


# ---- section 2: crash-safe re-save ---------------------------------------------------------
class Killed(BaseException):
    """Stands for kill -9: nothing after it runs (not even except/finally cleanup in our code)."""


def test_resave_survives_a_kill_at_every_point(tmp_path, monkeypatch):
    """Kill the re-save of an existing step at each rename/delete; a complete checkpoint always remains."""
    real_replace, real_rmtree = os.replace, shutil.rmtree
    for kill_at in (1, 2, 3):  # move the old folder aside / move the new one in / delete the old one
        root = tmp_path / f"k{kill_at}"
        save(root, 2)
        first = save(root, 4)
        calls = {"n": 0}

        def counting(fn, calls=calls, kill_at=kill_at):
            def wrapper(*a, **kw):
                calls["n"] += 1
                if calls["n"] == kill_at:
                    if fn is real_rmtree:  # die half-way through a delete
                        files = sorted(Path(a[0]).rglob("*"))
                        for f in files[: len(files) // 2]:
                            if f.is_file():
                                f.unlink()
                    raise Killed
                return fn(*a, **kw)
            return wrapper

        monkeypatch.setattr(ck.os, "replace", counting(real_replace))
        monkeypatch.setattr(ck.shutil, "rmtree", counting(real_rmtree))
        with pytest.raises(Killed):
            save(root, 4)  # re-save of the same step (as --resume on a finished run does)
        monkeypatch.setattr(ck.os, "replace", real_replace)
        monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
        recover(root)
        latest = latest_checkpoint(root)
        assert latest == first, (kill_at, sorted(p.name for p in root.iterdir()))
        load_trainer_state(latest)  # complete and unaltered
        assert not [p for p in root.iterdir() if p.name.startswith(".")], kill_at


def test_completeness_covers_every_file(tmp_path):
    ckpt = save(tmp_path, 2)
    (ckpt / "model.safetensors").unlink()  # e.g. a half-deleted folder whose trainer_state.json survived
    assert list_checkpoints(tmp_path) == []
    ckpt = save(tmp_path, 3)
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.truncate(10)
    assert list_checkpoints(tmp_path) == []


def test_disk_full_leaves_no_partial_folder(tmp_path):
    good = save(tmp_path, 2)

    def full_disk(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    with pytest.raises(CheckpointError) as err:
        save(tmp_path, 4, save_model=full_disk)
    msg = str(err.value)
    assert re.match(r"disk full while writing checkpoint-4 \(about \d+ KB needed \(as checkpoint-2\), \d+ [MK]B "
                    r"free in ", msg), msg
    assert " free in " in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert latest_checkpoint(tmp_path) == good


def test_real_write_failure_leaves_no_partial_folder(tmp_path):
    """A real failed write (file-size limit, like a full disk to the writer): one line, nothing partial left."""
    import resource
    import signal

    good = save(tmp_path, 2)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
    try:
        with pytest.raises(CheckpointError, match=r"^File too large while writing checkpoint-4 \(about"):
            save(tmp_path, 4)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert latest_checkpoint(tmp_path) == good


def test_pruning_keeps_the_last_and_never_a_half_folder(tmp_path):
    for s in (1, 2, 3):
        save(tmp_path, s, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


# ---- resume: what to resume from, and what changed ------------------------------------------
def test_resume_without_a_checkpoint_says_so(tmp_path):
    notes = []
    with pytest.raises(CheckpointError, match="--resume: no complete checkpoint in .*Run without --resume"):
        resolve_resume(build_config(BASE, ["checkpoint.resume=true"]), tmp_path, log=notes.append)
    assert resolve_resume(build_config(BASE, ["checkpoint.resume=auto"]), tmp_path, log=notes.append) is None
    assert notes == [f"note: checkpoint.resume=auto: no checkpoint in {tmp_path}; starting fresh"]
    with pytest.raises(CheckpointError, match="is not a folder"):
        resolve_resume(build_config(BASE, ["checkpoint.resume=/bad/path"]), tmp_path, log=notes.append)


def test_resume_reports_changes_and_refuses_breaking_ones(tmp_path):
    cosine = ["train.lr_scheduler=cosine", "train.max_steps=10"]
    save(tmp_path, 2, cfg=build_config(BASE, cosine))
    notes: list[str] = []

    def resume(*over: str):
        return resolve_resume(build_config(BASE, [*cosine, "checkpoint.resume=true", *over]), tmp_path,
                              log=notes.append)

    assert resume("logging.output_dir=elsewhere", "checkpoint.keep_last=9") == tmp_path / "checkpoint-2"
    assert notes == []
    resume("grpo.beta=0.1")
    assert notes == ["note: changed since checkpoint-2: grpo.beta: 0.04 -> 0.1"]
    with pytest.raises(CheckpointError) as err:
        resume("train.max_steps=20", "train.seed=1", "grpo.num_generations=4", "train.per_device_batch_size=4")
    msg = str(err.value)
    for part in ("train.max_steps: 10 -> 20 (changes the cosine learning-rate schedule)",
                 "train.seed: 0 -> 1 (changes the data order", "grpo.num_generations: 8 -> 4",
                 "train.per_device_batch_size: 8 -> 4", "--resume-force"):
        assert part in msg, msg
    notes.clear()
    assert resume("train.seed=1", "checkpoint.resume_force=true") is not None
    assert notes == ["warning: --resume-force: changed since checkpoint-2: train.seed: 0 -> 1 (changes the data "
                     "order and every sampling seed)"]
    with pytest.raises(CheckpointError, match="num_processes: 1 -> 2"):
        resolve_resume(build_config(BASE, [*cosine, "checkpoint.resume=true"]), tmp_path, 2, log=notes.append)


def test_longer_run_with_a_constant_schedule_may_resume(tmp_path):
    save(tmp_path, 2, cfg=build_config(BASE, ["train.max_steps=10"]))
    notes: list[str] = []
    cfg = build_config(BASE, ["train.max_steps=20", "checkpoint.resume=true"])
    assert resolve_resume(cfg, tmp_path, log=notes.append) == tmp_path / "checkpoint-2"
    assert notes == ["note: changed since checkpoint-2: train.max_steps: 10 -> 20 (fine: the learning-rate "
                     "schedule is constant)"]


# ---- the output folder ------------------------------------------------------------------------
def test_output_dir_is_checked(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output_dir(f)
    with pytest.raises(ConfigError, match="cannot write to .*a parent is a file"):
        check_output_dir(f / "sub")
    with pytest.raises(ConfigError, match="output_dir"):
        build_config(BASE, ["logging.output_dir="])
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(ConfigError, match="cannot write to .*Permission denied"):
                check_output_dir(ro)
        finally:
            ro.chmod(0o755)
    assert check_output_dir(tmp_path / "new" / "dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []
