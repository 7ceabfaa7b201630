"""Crash-safe checkpoints, exact resume, and trainer state that cannot run code when loaded.

A checkpoint folder ``OUTPUT/checkpoint-<step>/`` holds a standard transformers checkpoint
(``model.safetensors``, ``config.json``, ``generation_config.json``, processor files; a PEFT
adapter under LoRA) plus the trainer state:

- ``trainer_state.safetensors``: every tensor of the optimizer, scheduler and RNG states;
- ``trainer_state.json``: the step, data position, run config and the non-tensor rest of
  those states (tensors are referenced by key). Loading it is JSON parsing plus safetensors,
  so a planted object cannot execute (the old pickled ``trainer_state.pt`` could);
- ``optimizer_rank<r>.json`` + ``optimizer_rank<r>.safetensors``, one pair per process, in place of
  the optimizer entry of the trainer state when the optimizer state is sharded over the processes
  (DeepSpeed ZeRO): each rank writes and, on resume, reads back its own shard, in the same
  pickle-free JSON + safetensors form;
- ``manifest.json`` (written last): the size and SHA-256 of every other file. A checkpoint
  counts as complete only if every listed file exists with its size and no unlisted file is in
  the folder (a closed set); resume, ``core.evaluate`` and ``core.serve`` also check the hashes
  and refuse a checkpoint whose files do not match.

Each ``trainer_state.json`` carries the ``run_id`` of the run that saved it, so pruning deletes
only that run's checkpoints (who owns an output folder: :mod:`core.runtime.outdir`).

Writes go to ``.checkpoint-<step>.tmp`` and are renamed into place when complete. Re-saving an
existing step first renames the old folder aside (``.checkpoint-<step>.old``) and deletes it
only after the new one is in place, so a kill at any moment leaves a complete checkpoint;
:func:`recover` (run before resume looks) restores an aside folder whose replacement never
arrived.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from core.config import ConfigError

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
ASIDE_RE = re.compile(r"^\.checkpoint-(\d+)\.(tmp|old|del)$")
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
RANK_OPTIMIZER = "optimizer_rank{rank}"  # + .json / .safetensors: one optimizer shard per process
MANIFEST = "manifest.json"
LEGACY_PT = "trainer_state.pt"
FORMAT = 2  # trainer-state format; 1 was the pickled trainer_state.pt


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (incomplete, tampered, from another run), or one that failed to write."""


# ---- RNG --------------------------------------------------------------------------------
class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, permissions): a failure of the run, not of its input."""


def rng_state() -> dict[str, Any]:
    """Every RNG state a CPU/CUDA run depends on."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output (also as it comes back from :func:`load_trainer_state`)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---- state <-> (JSON, tensors) ------------------------------------------------------------
def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested state into JSON-ready data and a flat ``{key: tensor}`` dict for safetensors.

    Tensors (and numpy arrays) become ``{"__tensor__": key}``; tuples and dicts with non-string
    keys (optimizer state is keyed by parameter index) are tagged so :func:`unflatten_state`
    rebuilds them exactly.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(x, np.ndarray):
            tensors[path] = torch.from_numpy(x.astype(np.int64) if x.dtype == np.uint32 else x.copy())
            return {"__ndarray__": path, "dtype": str(x.dtype)}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"__map__": {k: enc(v, f"{path}.{k}") for k, v in x.items()}}
            return {"__items__": [[k, enc(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"trainer state holds a {type(x).__name__} at {path}; only tensors and plain data are saved")

    return enc(obj, "s"), tensors


def unflatten_state(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`; a reference to a missing tensor is a :class:`CheckpointError`."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x or "__ndarray__" in x:
            key = x.get("__tensor__", x.get("__ndarray__"))
            if key not in tensors:
                raise CheckpointError(f"trainer state refers to tensor {key!r}, which is not in {STATE_TENSORS}")
            t = tensors[key]
            return t if "__tensor__" in x else t.numpy().astype(x["dtype"])
        if "__map__" in x:
            return {k: dec(v) for k, v in x["__map__"].items()}
        if "__items__" in x:
            return {k: dec(v) for k, v in x["__items__"]}
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        raise CheckpointError(f"unexpected object in {STATE_JSON}: keys {sorted(x)[:5]}")

    return dec(data)


# ---- manifest ---------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record size and SHA-256 of every file under ``folder`` (written last: it marks completeness)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    _write_synced(folder / MANIFEST, json.dumps({"format": FORMAT, "files": files}, indent=1).encode())


def check_manifest(folder: str | Path, *, hashes: bool, require_state: bool = True) -> str | None:
    """``None`` if ``folder`` is complete (and, with ``hashes``, unaltered); else what is wrong.

    ``require_state``: the manifest must list the trainer state (a checkpoint to resume from);
    loading weights only (evaluate, serve) needs no trainer state (``core.sft``'s have none).
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        if (folder / LEGACY_PT).is_file():
            return (f"it was written by an older vlmr1 ({LEGACY_PT} is a pickle, which can run code when "
                    "loaded, so it is not read)")
        return f"it has no {MANIFEST} (its save never finished)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {MANIFEST} is unreadable ({exc})"
    if not isinstance(files, dict):
        return f"its {MANIFEST} is malformed"
    for rel, info in files.items():
        if not isinstance(info, dict) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"its {MANIFEST} is malformed (entry {rel!r})"
        p = folder / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != info.get("size"):
            return f"{rel} has {size} bytes, the manifest says {info.get('size')}"
        if hashes and _sha256(p) != info.get("sha256"):
            return f"{rel} does not match its SHA-256 in {MANIFEST} (changed after it was saved)"
    for rel in (STATE_JSON, STATE_TENSORS) if require_state else ():
        if rel not in files:
            return f"its manifest does not list {rel}"
    # A checkpoint is a closed set: a file added later (a PEFT adapter dropped beside full weights,
    # a second weights file) would change what loads without changing any listed file.
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if (p.is_file() or p.is_symlink()) and rel != MANIFEST and rel not in files:
            return f"{rel} is not listed in its {MANIFEST} (added after the save; remove it)"
    return None


# ---- listing and recovery ----------------------------------------------------------------
def recover(output_dir: str | Path) -> list[str]:
    """Finish or undo a save that a crash interrupted; returns what was done (for a note).

    - ``.checkpoint-N.old`` without a complete ``checkpoint-N``: the kill came between the two
      renames of a re-save; the old folder is renamed back.
    - leftover ``.tmp`` / ``.old`` / ``.del`` folders are deleted.
    """
    root = Path(output_dir)
    done: list[str] = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        m = ASIDE_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        final = root / f"checkpoint-{m.group(1)}"
        if m.group(2) == "old" and check_manifest(final, hashes=False) is not None \
                and check_manifest(p, hashes=False) is None:
            if final.exists():
                shutil.rmtree(final)
            os.replace(p, final)
            done.append(f"restored {final.name} from an interrupted re-save")
        else:
            shutil.rmtree(p, ignore_errors=True)
    return done


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (every manifest file present with its size) in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and check_manifest(p, hashes=False) is None:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-N`` folder in ``output_dir``, complete or not, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def verify_checkpoint(folder: str | Path, *, hashes: bool = True) -> None:
    """Refuse a vlmr1 checkpoint folder that is incomplete, holds unlisted files, or (``hashes``) was altered.

    For ``core.evaluate --checkpoint`` and ``core.serve``. A folder without ``manifest.json`` and
    without a trainer state is a plain transformers checkpoint (a ``model.path``, a ``core.sft``
    output, a download): there is nothing to verify it against, and it passes.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).exists() and not (folder / STATE_JSON).exists() and not (folder / LEGACY_PT).exists():
        return
    problem = check_manifest(folder, hashes=hashes, require_state=False)
    if problem:
        raise CheckpointError(f"checkpoint {folder} cannot be used: {problem}.")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


# ---- save -------------------------------------------------------------------------------
def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep_last: int,
    is_main: bool = True,
    rank: int = 0,
    optimizer_per_rank: bool = False,
    barrier: Callable[[], None] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` crash-safely; prune to the last ``keep_last`` of this run's.

    With ``state["run_id"]`` only checkpoints saved with the same run id count (and are pruned).

    ``save_model(folder)`` writes the transformers/PEFT files (it may gather sharded
    weights, so every process calls this function; only the main one writes). With
    ``optimizer_per_rank`` (a sharded optimizer: DeepSpeed ZeRO) every process writes its own
    ``optimizer_rank<rank>`` shard; ``barrier`` (all processes) then orders the folder's creation,
    the shards and the manifest. A write failure (disk full, quota, I/O error) removes the
    temporary folder and raises a :class:`CheckpointError` with one line saying what happened.
    """
    from safetensors.torch import save_file

    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    wait = barrier or (lambda: None)
    try:
        if is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        save_model(tmp)
        if optimizer_per_rank:
            wait()  # the main process has created tmp
            shard, shard_tensors = flatten_state(optimizer.state_dict())
            name = RANK_OPTIMIZER.format(rank=rank)
            save_file(shard_tensors, str(tmp / f"{name}.safetensors"))
            _write_synced(tmp / f"{name}.json", json.dumps({"format": FORMAT, "rank": rank, "state": shard},
                                                           indent=1, default=str).encode())
            wait()  # every shard is written before the manifest lists the folder's files
        if not is_main:
            return final
        whole = {} if optimizer_per_rank else {"optimizer": optimizer.state_dict()}
        data, tensors = flatten_state({**whole, "scheduler": scheduler.state_dict(), "rng": rng_state()})
        save_file(tensors, str(tmp / STATE_TENSORS))
        meta = {"format": FORMAT, "step": step, **state, "optimizer_per_rank": optimizer_per_rank, "state": data}
        _write_synced(tmp / STATE_JSON, json.dumps(meta, indent=1, default=str).encode())
        _fsync_tree(tmp)
        write_manifest(tmp)
    except (OSError, SafetensorError) as exc:  # safetensors reports a failed write as its own error type
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(_write_failure(exc, final, tmp, root)) from None
    _swap_in(tmp, final)
    # Only this run's checkpoints are pruned (``state["run_id"]``): never another run's, whatever their steps.
    mine = [p for p in list_checkpoints(root) if "run_id" not in state or run_id_of(p) == state["run_id"]]
    for old in mine[:-keep_last]:
        doomed = root / f".{old.name}.del"  # renamed first: a kill mid-delete leaves no half checkpoint
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and deleted last."""
    aside = final.parent / f".{final.name}.old"
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)


def _write_failure(exc: Exception, final: Path, tmp: Path, root: Path) -> str:
    code = getattr(exc, "errno", None)
    if code is None:  # SafetensorError: "... I/O error: No space left on device (os error 28)"
        m = re.search(r"os error (\d+)", str(exc))
        code = int(m.group(1)) if m else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "disk full"
    else:
        what = os.strerror(code) if code else str(exc)
    need = ""
    earlier = [p for p in list_checkpoints(root) if p != final]
    if earlier:  # the previous checkpoint's size is the best estimate of what this one needs
        try:
            files = json.loads((earlier[-1] / MANIFEST).read_text())["files"]
            need = f"about {_size(sum(f['size'] for f in files.values()))} needed (as {earlier[-1].name}), "
        except (OSError, ValueError, KeyError, TypeError):
            pass
    try:
        where = f"{need}{_size(shutil.disk_usage(root).free)} free in {root}"
    except OSError:
        where = f"{need}in {root}"
    return (f"{what} while writing {final.name} ({where}); the partial checkpoint was removed and any earlier "
            f"checkpoints are intact. Free space (or lower checkpoint.keep_last) and rerun with --resume. "
            f"[{type(exc).__name__}: {exc}]")


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- load -------------------------------------------------------------------------------
def load_trainer_state(ckpt: str | Path, *, verify: bool = True,
                       rank: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state with optimizer/scheduler/rng, metadata with step, data position, config ...)``.

    Nothing here unpickles: the state is JSON plus safetensors. With ``verify`` every file is
    checked against the manifest first (sizes and SHA-256); a mismatch is a :class:`CheckpointError`.
    A checkpoint whose optimizer is sharded (``meta["optimizer_per_rank"]``) gives process
    ``rank`` its own shard as ``state["optimizer"]``.
    """
    ckpt = Path(ckpt)
    if verify:
        problem = check_manifest(ckpt, hashes=True)
        if problem:
            raise CheckpointError(f"checkpoint {ckpt} cannot be used: {problem}.")
    meta = read_trainer_meta(ckpt)
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(ckpt / STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: cannot read the trainer state: {exc}") from None
    try:
        state = unflatten_state(meta.pop("state"), tensors)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # hand-edited nesting
        raise CheckpointError(f"checkpoint {ckpt}: the \"state\" of its {STATE_JSON} is malformed "
                              f"({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and meta.get("optimizer_per_rank"):
        state["optimizer"] = _load_rank_optimizer(ckpt, rank, meta.get("num_processes"))
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= set(state):
        raise CheckpointError(f"checkpoint {ckpt}: the trainer state lacks optimizer/scheduler/rng")
    return state, meta


#: ``trainer_state.json`` keys: (type check, what it must be); the ones marked required must be there.
_META_FIELDS: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "format": (lambda v: v == FORMAT, f"{FORMAT} (this vlmr1's trainer-state format)", True),
    "step": (lambda v: _is_int(v) and v >= 0, "a non-negative integer", True),
    "state": (lambda v: isinstance(v, dict), "an object", True),
    "config": (lambda v: isinstance(v, dict), "an object (the run config)", False),
    "num_processes": (lambda v: _is_int(v) and v >= 1, "a positive integer", False),
    "data_position": (lambda v: _is_int(v) and v >= 0, "a non-negative integer", False),
    "eval": (lambda v: isinstance(v, dict), "an object", False),
    "metrics": (lambda v: v is None or isinstance(v, dict), "an object", False),
    "backend": (lambda v: isinstance(v, dict), "an object", False),
    "optimizer_per_rank": (lambda v: isinstance(v, bool), "true or false", False),
    "run_id": (lambda v: isinstance(v, str), "a string", False),
    "dtype": (lambda v: isinstance(v, str), "a string", False),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_trainer_meta(ckpt: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of ``ckpt``, checked key by key: any other content is a :class:`CheckpointError`.

    The file is data a user (or a bad disk) can change; a wrong type must end in one line naming
    the file and the key, never in a traceback later in the resume.
    """
    path = Path(ckpt) / STATE_JSON
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8
        raise CheckpointError(f"checkpoint {ckpt}: cannot read {STATE_JSON}: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a vlmr1 trainer state (a JSON {type(meta).__name__}, not an object)")
    for key, (ok, what, required) in _META_FIELDS.items():
        if key not in meta:
            if required:
                raise CheckpointError(f"{path}: not a vlmr1 trainer state of format {FORMAT}: it has no {key!r}")
            continue
        if not ok(meta[key]):
            raise CheckpointError(f"{path}: {key!r} must be {what}, not {json.dumps(meta[key])[:60]}")
    m = CKPT_RE.match(Path(ckpt).name)
    if m and int(m.group(1)) != meta["step"]:
        raise CheckpointError(f"{path}: 'step' is {meta['step']} but the folder is {Path(ckpt).name}")
    return meta


def _load_rank_optimizer(ckpt: Path, rank: int, saved_processes: Any) -> Any:
    """Process ``rank``'s optimizer shard (JSON + safetensors, like the trainer state)."""
    from safetensors.torch import load_file

    name = RANK_OPTIMIZER.format(rank=rank)
    if not (ckpt / f"{name}.json").is_file():
        raise CheckpointError(f"checkpoint {ckpt}: no optimizer shard for process {rank} ({name}.json); it was saved "
                              f"by {saved_processes} processes with a sharded optimizer: resume with as many")
    try:
        shard = json.loads((ckpt / f"{name}.json").read_text())
        tensors = load_file(str(ckpt / f"{name}.safetensors"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: cannot read the optimizer shard {name}: {exc}") from None
    if not isinstance(shard, dict) or (shard.get("format"), shard.get("rank")) != (FORMAT, rank) \
            or "state" not in shard:
        raise CheckpointError(f"checkpoint {ckpt}: {name}.json is not a vlmr1 optimizer shard of process {rank}")
    return unflatten_state(shard["state"], tensors)


# ---- resume -----------------------------------------------------------------------------
#: Settings that change which prompts, seeds or learning rates later steps use: changing one on
#: resume cannot continue the checkpointed run exactly, so it is refused unless forced.
BREAKING = {
    "train.per_device_batch_size": "the prompts per step and the data position",
    "train.gradient_accumulation_steps": "the prompts per step and the data position",
    "grpo.num_generations": "the prompts per step and the data position",
    "train.seed": "the data order and every sampling seed",
    "train.shuffle": "the data order",
    "task": "the training data",
    "train.lr_scheduler": "the learning-rate schedule",
    "train.warmup_steps": "the learning-rate schedule",
    "grpo.num_iterations": "the learning-rate schedule",
    "train.learning_rate": "nothing: the checkpoint's optimizer state keeps its own learning rate",
    "train.weight_decay": "nothing: the checkpoint's optimizer state keeps its own weight decay",
    "train.mode": "which weights train (the optimizer state would not fit)",
    "num_processes": "the prompts per step and each rank's share",
    "model.path": "the model: the checkpoint's weights and the reference model come from the saved one",
    "model.family": "the model family",
    "model.tiny": "the model (a tiny build of another size)",
    "train.lora": "the LoRA adapters (their shape and scale)",
}
#: Never compared: where things go, how they are logged, and resume itself.
IGNORED = ("logging", "checkpoint", "plugins", "eval")
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for every setting that differs."""
    out: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if key.split(".")[0] in IGNORED:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        elif a != b:
            out.append((key, a, b))

    walk(saved, current, "")
    return out


def resume_problems(changes: list[tuple[str, Any, Any]], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Split changes into ``(refused, noted)`` messages; see :data:`BREAKING`."""
    refused, noted = [], []
    for key, old, new in changes:
        line = f"{key}: {old!r} -> {new!r}"
        hit = next((k for k in BREAKING if key == k or key.startswith(k + ".")), None)
        if key == "train.max_steps":
            if current["train"]["lr_scheduler"] in CONSTANT_SCHEDULES:
                noted.append(f"{line} (fine: the learning-rate schedule is constant)")
            else:
                refused.append(f"{line} (changes the {current['train']['lr_scheduler']} learning-rate schedule)")
        elif hit is not None:
            refused.append(f"{line} (changes {BREAKING[hit]})")
        else:
            noted.append(line)
    return refused, noted


def resolve_resume(cfg: Any, output_dir: str | Path, num_processes: int = 1,
                   log: Callable[[str], None] = print, dtype: Any = None) -> Path | None:
    """The checkpoint to resume from per ``checkpoint.resume``, checked for exact continuation.

    ``true`` needs a checkpoint in ``output_dir``; ``auto`` takes one if there is one (and says so
    when there is none); a path must be a complete checkpoint. The checkpoint's files are verified
    against its manifest, and its run config is compared with ``cfg``: changes that would break
    exact continuation (the model included: path, family, size, ``dtype`` = the torch dtype this
    run trains in, mode) are refused unless ``checkpoint.resume_force`` (``--resume-force``).
    A newest checkpoint that is damaged is refused too (resuming from an older one would discard
    every step since); ``--resume-force`` skips it with a warning.
    """
    r = cfg.checkpoint.resume
    force = cfg.checkpoint.resume_force
    if r is False or r == "false":
        return None
    out = Path(output_dir)
    for note in recover(out):
        log(f"note: {note}")
    if r is True or r in ("auto", "true"):
        found, damaged, first = None, [], ""
        for folder in reversed(checkpoint_folders(out)):  # newest first, until one is intact
            problem = check_manifest(folder, hashes=True)
            if problem is None:
                found = folder
                break
            if not damaged and check_manifest(folder, hashes=False) is None:
                first = f"checkpoint {folder} cannot be used: {problem}"  # complete, but altered since saved
            damaged.append(f"{folder.name} ({problem})")
            first = first or f"; {folder.name} is there but {problem}"
        if found is None:
            if r == "auto" and not damaged:
                log(f"note: checkpoint.resume=auto: no checkpoint in {out}; starting fresh")
                return None
            if first.startswith("checkpoint "):
                raise CheckpointError(f"{first}. Delete it to resume from an earlier checkpoint, or start fresh.")
            raise CheckpointError(
                f"--resume: no complete checkpoint in {out}{first} (a checkpoint is written every "
                "checkpoint.save_every steps and at the end). Run without --resume to start fresh, or set "
                "checkpoint.resume=auto to resume only when a checkpoint exists.")
        if damaged:
            what = f"the newest checkpoint in {out} cannot be used: {'; '.join(damaged)}"
            if not force:
                raise CheckpointError(
                    f"{what}. Resuming from {found.name} instead would discard every step since it: repair or "
                    "remove the damaged folder, or pass --resume-force (checkpoint.resume_force=true) to resume "
                    f"from {found.name} anyway.")
            log(f"warning: --resume-force: {what}; resuming from {found.name}, the steps after it are lost")
    else:
        found = Path(str(r))
        if not found.is_dir():
            raise CheckpointError(f"checkpoint.resume: {found} is not a folder (give a checkpoint-<step> folder, "
                                  "or use --resume to take the latest in logging.output_dir)")
        problem = check_manifest(found, hashes=False)
        if problem:
            raise CheckpointError(f"checkpoint.resume: {found} is not a complete vlmr1 checkpoint: {problem}.")
    problem = check_manifest(found, hashes=True)
    if problem:
        raise CheckpointError(f"checkpoint {found} cannot be used: {problem}. Delete it to resume from an "
                              "earlier checkpoint, or start fresh.")
    meta = read_trainer_meta(found)
    saved = dict(meta.get("config") or {})
    saved_procs = meta.get("num_processes", num_processes)
    current = cfg.model_dump(mode="json")
    changes = config_changes({**saved, "num_processes": saved_procs}, {**current, "num_processes": num_processes})
    moved = next(((old, new) for key, old, new in changes if key == "model.path"), None)
    if moved and same_model_files(saved_model_path(found), cfg.model.resolved_path()):
        # The same model at another path (copied or moved): identical files are no different model.
        changes = [c for c in changes if c[0] != "model.path"]
        log(f"note: model.path: {moved[0]!r} -> {moved[1]!r} holds the same model files (same SHA-256)")
    refused, noted = resume_problems(changes, current)
    refused += model_differences(found, cfg, dtype)
    for line in noted:
        log(f"note: changed since {found.name}: {line}")
    if refused:
        if not force:
            raise CheckpointError(
                f"resuming from {found} with settings that break exact continuation: " + "; ".join(refused)
                + ". Restore them, or pass --resume-force (checkpoint.resume_force=true) to continue anyway.")
        for line in refused:
            log(f"warning: --resume-force: changed since {found.name}: {line}")
    return found


#: ``config.json`` entries that fix a model's shape (at any depth: text and vision configs too).
_SHAPE_KEY = re.compile(r"(^model_type$|^num_|_size$|_layers$|_heads$|^depth$|_dim$)")


def _shape(config: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(config, dict):
        for k, v in config.items():
            if isinstance(v, dict):
                out.update(_shape(v, f"{prefix}{k}."))
            elif _SHAPE_KEY.search(str(k)) and (_is_int(v) or isinstance(v, str)):
                out[f"{prefix}{k}"] = v
    return out


def model_differences(ckpt: Path, cfg: Any, dtype: Any = None) -> list[str]:
    """How the checkpoint's weights differ from the model this run is configured with (empty: none found).

    Compares the checkpoint's ``config.json`` (full and frozen-vision checkpoints; a LoRA checkpoint
    holds only the adapter) with ``model.path``'s when both are local folders: model type and every
    size, layer and head count; and its saved dtype with ``dtype``, the one this run trains in. The
    saved run config's ``model.*`` keys are compared by :func:`resume_problems`.
    """
    found: list[str] = []
    try:
        mine = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError):
        mine = {}  # a LoRA checkpoint: the adapter only
    if not isinstance(mine, dict):
        mine = {}
    try:
        base = Path(cfg.model.resolved_path(), "config.json")
        theirs = json.loads(base.read_text()) if base.is_file() else None
    except (ConfigError, OSError, ValueError):
        theirs = None
    if mine and isinstance(theirs, dict):
        a, b = _shape(mine), _shape(theirs)
        diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diff:
            found.append(f"the model: {ckpt.name} is not a {cfg.model.resolved_path()} model ("
                         + ", ".join(diff[:4]) + (", ..." if len(diff) > 4 else "") + ")")
    # The dtype the saving run trained in (recorded since LoRA checkpoints have no config.json), else the weights'.
    saved = read_trainer_meta(ckpt).get("dtype") or mine.get("dtype", mine.get("torch_dtype"))
    if dtype is not None and isinstance(saved, str):
        want = str(dtype).removeprefix("torch.")
        if saved != want:
            found.append(f"model dtype: {saved!r} -> {want!r} (the weights were trained in {saved})")
    return found


@functools.lru_cache(maxsize=8)  # asked again by the trainer when it picks the reference's source
def same_model_files(a: str | None, b: str | None) -> bool:
    """Whether local model folders ``a`` and ``b`` hold the same files (names, sizes, then SHA-256).

    Hashes are read only when every name and size matches (a model moved or copied elsewhere).
    """
    if not a or not b:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if not (pa.is_dir() and pb.is_dir()):
        return False

    def files(root: Path) -> dict[str, int]:
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")
                if p.is_file() and not p.name.startswith(".")}

    try:
        fa, fb = files(pa), files(pb)
        return fa == fb and bool(fa) and all(_sha256(pa / rel) == _sha256(pb / rel) for rel in fa)
    except OSError:
        return False


def saved_model_path(ckpt: str | Path) -> str | None:
    """The ``model.path`` (resolved: a tiny build's cache folder too) of the run that saved ``ckpt``."""
    from core.config import ModelConfig

    model = (read_trainer_meta(ckpt).get("config") or {}).get("model")
    try:
        return ModelConfig.model_validate(model).resolved_path() if isinstance(model, dict) else None
    except (ValueError, ConfigError):
        return None


def run_id_of(ckpt: Path) -> str | None:
    """The run id a checkpoint was saved with; ``""`` for one from before run ids, ``None`` if unreadable."""
    try:
        meta = json.loads((Path(ckpt) / STATE_JSON).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    rid = meta.get("run_id", "")
    return rid if isinstance(rid, str) else None
