"""Fuzz by class (issue 21): cases are generated per class of bad input and each is classified as
clear / traceback / silent / hang; the counts per class are printed (``docs/reliability.md`` quotes them).

- clear: refused with the project's own error (``ConfigError``, ``DataError``, ``RequestError``)
  naming the input, or an acceptable input accepted;
- traceback: any other exception escaped;
- silent: a bad input accepted, or refused without naming it;
- hang: no answer within ``CASE_LIMIT_S`` (a generous bound: the machine is shared and slow).

Run with ``-s`` to see the ``fuzz classes: ...`` lines.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image

from core.config import ConfigError, build_config, load_raw, to_yaml

CASE_LIMIT_S = 60  # per case; generous because other test runs share the 2 cores
QUICKSTART = Path(__file__).resolve().parents[1] / "core" / "defaults" / "quickstart.yaml"
COUNTS: dict[str, Counter] = {}
ROW = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image> colour?"},
                                            {"from": "gpt", "value": "red"}]}


class Hung(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int = CASE_LIMIT_S):
    def alarm(*_):
        raise Hung(f"no answer within {seconds} s (a generous bound on a shared machine)")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def classify(cls: str, name: str, fn: Callable[[], object], clear_errors: tuple[type[BaseException], ...], *,
             bad: bool | None = True, must_say: str = "") -> str:
    """Run ``fn`` and count its outcome under ``cls``.

    ``bad``: True = must be refused; False = must be accepted; None = either (an accepted
    value must then come back as plain data: ``fn`` checks that itself).
    """
    try:
        with time_limit():
            fn()
        outcome, detail = ("silent" if bad else "clear"), "accepted"
    except Hung as exc:
        outcome, detail = "hang", str(exc)
    except clear_errors as exc:
        ok = bad is not False and must_say in str(exc) and "Traceback" not in str(exc)
        outcome, detail = ("clear" if ok else "silent"), str(exc)[:300]
    except BaseException as exc:  # noqa: BLE001 - an escaping exception is what the fuzz looks for
        outcome, detail = "traceback", f"{type(exc).__name__}: {str(exc)[:300]}"
    COUNTS.setdefault(cls, Counter())[outcome] += 1
    if outcome != "clear":
        COUNTS[cls][f"! {name}: {outcome}: {detail}"] += 1
    return outcome


def report(cls: str) -> None:
    """Print ``fuzz classes: CLASS: N tried, ...`` and fail listing every case that was not clear."""
    c = COUNTS.get(cls, Counter())
    total = sum(v for k, v in c.items() if not k.startswith("!"))
    print(f"\nfuzz classes: {cls}: {total} tried, {c['clear']} clear, {c['traceback']} traceback, "
          f"{c['silent']} silent, {c['hang']} hang")
    problems = [k[2:] for k in c if k.startswith("!")]
    assert not problems, "\n".join(problems)


def _fifo(where: Path) -> Path:
    path = where / f"fifo{len(list(where.iterdir()))}"
    os.mkfifo(path)
    return path


# ---- config: YAML scalar tags, alias nesting, CLI and environment -----------------------------------
#: Every kind of value YAML's safe schema and its tags produce, plus ones it cannot build.
SCALARS = [
    "2024-01-01", "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10 -5", "!!timestamp 2024-01-01",
    "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1, b: 2]", "!!pairs [a: 1, a: 2]", "!!float abc",
    "!!int x", "!!bool maybe", "!custom 1", "!!python/object/apply:os.system [echo]", "!!python/name:os.system",
    "!!str 3", "!!null ''", "9" * 5000, "0o777777777777777777777777777777", ".nan", "-.inf", "1e400",
    "[" * 100 + "]" * 100, "{a: " * 60 + "1" + "}" * 60, "[2024-01-01, !!binary aGk=]", "{2024-01-01: 1}",
]
#: Where a generated value goes in an otherwise valid config (a typed key, free-form options, a key).
PLACEMENTS = {
    "train.seed": "train:\n  seed: {v}\n",
    "rewards.0.options.x": "rewards:\n  - name: all_match\n    options:\n      x: {v}\n",
    "as a key": "train:\n  {v}: 1\n",
    "in a list": "task:\n  name: synthetic_color\n  options:\n    extra: [1, {v}]\n",
}


def _config_case(path: Path, overrides: list[str] | None = None) -> Callable[[], None]:
    def run() -> None:
        cfg = build_config(load_raw(path), overrides or [])
        json.dumps(cfg.model_dump(mode="json"))  # an accepted value must be plain data
        to_yaml(cfg)
    return run


def test_yaml_scalar_tags(tmp_path):
    """Every generated value, in every placement of a file and as an override: a clear error or plain data."""
    base = yaml.safe_load(QUICKSTART.read_text())
    for i, value in enumerate(SCALARS):
        for where, template in PLACEMENTS.items():
            section = template.split(":", 1)[0]
            rest = {k: v for k, v in base.items() if k != section}
            path = tmp_path / f"c{i}-{where.replace(' ', '_')}.yaml"
            path.write_text(yaml.safe_dump(rest) + template.format(v=value))
            classify("yaml scalar tags", f"file {where}: {value[:40]!r}", _config_case(path), (ConfigError,),
                     bad=None)
        classify("yaml scalar tags", f"override train.seed={value[:40]!r}",
                 _config_case(QUICKSTART, [f"train.seed={value}"]), (ConfigError,), bad=None, must_say="train.seed")
        classify("yaml scalar tags", f"override task.options.x={value[:40]!r}",
                 _config_case(QUICKSTART, [f"task.options.x={value}"]), (ConfigError,), bad=None,
                 must_say="task.options.x")
    report("yaml scalar tags")


def _file_bomb(depth: int, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    lines += [f"a{d}: &a{d} [" + ", ".join([f"*a{d - 1}"] * width) + "]" for d in range(1, depth + 1)]
    return "\n".join(lines) + "\n"


def _flow_bomb(depth: int, width: int = 9) -> str:
    value = "[" + ", ".join(["x"] * width) + "]"
    for d in range(depth):
        value = f"[&b{d} {value}, " + ", ".join([f"*b{d}"] * (width - 1)) + "]"
    return value


@pytest.mark.parametrize("where", ["file", "override"])
def test_alias_nesting_depths(tmp_path, where):
    """Aliases nested 1..12 deep (9 ** 13 leaves at the end) are refused in well under a second, in small memory."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    worst = 0.0
    for depth in range(1, 13):
        if where == "file":
            path = tmp_path / f"bomb{depth}.yaml"
            path.write_text(QUICKSTART.read_text() + _file_bomb(depth))
            fn = _config_case(path)
        else:
            fn = _config_case(QUICKSTART, [f"task.options.x={_flow_bomb(depth)}"])
        t0 = time.perf_counter()
        classify("yaml alias nesting", f"{where} depth {depth}", fn, (ConfigError,), must_say="alias")
        worst = max(worst, time.perf_counter() - t0)
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(f"\nalias bombs ({where}): slowest refusal {worst * 1000:.1f} ms, peak RSS grew {grew_mb:.0f} MB")
    assert worst < 1.0, f"an alias bomb took {worst:.2f} s to refuse (limit 1 s, generous for a few hundred bytes)"
    assert grew_mb < 200, f"peak RSS grew {grew_mb:.0f} MB while refusing alias bombs"
    report("yaml alias nesting")


def test_cli_and_environment(tmp_path, capsys, monkeypatch):
    """--config '' / twice / a FIFO / a device, ~ in paths, launch variables, serve ports."""
    from core import serve, train
    from core.runtime.distributed import launch_world_size

    def exits_2(argv: list[str], module=train) -> Callable[[], None]:
        def run() -> None:
            try:
                rc = module.main(argv)
            except SystemExit as exc:  # argparse's usage error: exit 2 with a line naming the option
                rc = exc.code
            err = capsys.readouterr().err
            if rc != 2 or "Traceback" in err or "error:" not in err:
                raise AssertionError(f"exit {rc}: {err[-300:]}")
            raise ConfigError(err)
        return run

    cfg = tmp_path / "c.yaml"
    cfg.write_text(QUICKSTART.read_text())
    home = tmp_path / "home"
    home.mkdir()
    (home / "c.yaml").write_text(QUICKSTART.read_text())
    monkeypatch.setenv("HOME", str(home))
    for name, argv, say in [("--config ''", ["--config", "", "--dry-run"], "empty"),
                            ("--config twice", ["--config", str(cfg), "--config", str(cfg), "--dry-run"], "twice"),
                            ("--config FIFO", ["--config", str(_fifo(tmp_path)), "--dry-run"], "regular file"),
                            ("--config /dev/zero", ["--config", "/dev/zero", "--dry-run"], "regular file")]:
        classify("cli and environment", name, exits_2(argv), (ConfigError,), must_say=say)

    def tilde() -> None:
        assert train.main(["--config", "~/c.yaml", "--dry-run", "logging.output_dir=~/out"]) == 0
        out = capsys.readouterr().out
        assert f"output_dir: {home}/out" in out, out[-500:]

    classify("cli and environment", "~ in --config and a path option", tilde, (), bad=False)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        for value in ("abc", "1.5", "-1", "99999999999", "0x10", "", "1"):
            classify("cli and environment", f"{var}={value!r}", lambda e={"WORLD_SIZE": "2", var: value}:
                     launch_world_size(e), (ConfigError,), bad=value not in ("", "1"), must_say=var)
    for port in (-1, 65536, 10**9):
        classify("cli and environment", f"serve --port {port}",
                 exits_2([str(tmp_path), "--port", str(port)], serve), (ConfigError,), must_say="--port")
    report("cli and environment")


# ---- data: file kinds, image formats, special tokens, prompt lengths -----------------------------------
def _task(data_files: str, folder: Path, **options):
    from vlmr1_jsonl.jsonl import VlmR1Jsonl

    return VlmR1Jsonl.from_options({"data_files": data_files, "image_folders": str(folder), **options})


def test_data_file_kinds(tmp_path):
    """A data file or an image that is a FIFO, a device, a folder or a link to a FIFO: refused, never opened."""
    from core.interfaces import DataError

    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    kinds = {"a FIFO": _fifo(tmp_path), "/dev/zero": Path("/dev/zero"), "/dev/null": Path("/dev/null"),
             "a folder": tmp_path / "dir", "a link to a FIFO": tmp_path / "link"}
    kinds["a folder"].mkdir()
    os.symlink(kinds["a FIFO"], kinds["a link to a FIFO"])
    for i, (name, path) in enumerate(kinds.items()):
        classify("data file kinds", f"data file is {name}", lambda p=path: _task(str(p), tmp_path).load("train"),
                 (DataError,), must_say=str(path))
        data = tmp_path / f"rows{i}.jsonl"
        data.write_text(json.dumps(dict(ROW, image=str(path))) + "\n")
        classify("data file kinds", f"image is {name}",
                 lambda d=data: _task(str(d), tmp_path, allow_outside_image_folder=True).load("train"),
                 (DataError,), must_say=f"{data}:1")
    report("data file kinds")


def _writable_formats() -> list[str]:
    Image.init()
    out = []
    for fmt in sorted(Image.SAVE):
        try:
            Image.new("RGB", (8, 8), "red").save(io.BytesIO(), format=fmt)
        except Exception:  # noqa: BLE001, S112 - registered, but no encoder for RGB here
            continue
        out.append(fmt)
    return out


def test_image_formats(tmp_path):
    """Every format PIL writes here (EPS included), named .png: only the allow-list opens, in data and the server."""
    from core.interfaces import IMAGE_FORMATS, DataError, RequestError, data_url_to_image

    formats = _writable_formats()
    assert {"EPS", "PNG", "PDF"} <= set(formats), formats
    for fmt in formats:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(buf, format=fmt)
        raw = buf.getvalue()
        (tmp_path / f"{fmt}.png").write_bytes(raw)
        data = tmp_path / f"{fmt}.jsonl"
        data.write_text(json.dumps(dict(ROW, image=f"{fmt}.png")) + "\n")

        def load(d=data) -> None:
            _task(str(d), tmp_path, check_images="decode").load("train")[0].load_images()

        allowed = fmt in IMAGE_FORMATS
        classify("image formats", f"data image in {fmt}", load, (DataError,), bad=not allowed, must_say=f"{data}:1")
        url = "data:image/png;base64," + base64.b64encode(raw).decode()
        classify("image formats", f"server data URL in {fmt}", lambda u=url: data_url_to_image(u, "image"),
                 (RequestError,), bad=not allowed, must_say="accepted image")
    print(f"\nimage formats PIL writes here: {len(formats)} ({', '.join(formats)}); of them allowed: "
          f"{', '.join(sorted(set(formats) & set(IMAGE_FORMATS)))}")
    report("image formats")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from vlmr1_qwen_vl.family import Qwen25VLFamily

    path = tmp_path_factory.mktemp("tiny") / "qwen"
    Qwen25VLFamily.build_tiny_checkpoint(path)
    return Qwen25VLFamily().load_processor(path).tokenizer


def test_special_tokens_in_text(tmp_path, tokenizer):
    """Each of the vocabulary's special tokens in a prompt: refused per row (skip: counted; error: file:line)."""
    from core.interfaces import DataError
    from core.runtime.data_limits import PromptScreen, special_tokens

    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    specials = special_tokens(tokenizer)
    assert {"<|image_pad|>", "<|vision_start|>", "<|im_start|>"} <= set(specials), specials
    rows = [json.dumps(ROW)] + [json.dumps(dict(ROW, conversations=[
        {"from": "human", "value": f"<image> colour {t} now?"}, {"from": "gpt", "value": "red"}])) for t in specials]
    data = tmp_path / "special.jsonl"
    data.write_text("\n".join(rows) + "\n")
    screen = PromptScreen(tokenizer, 4096)
    samples = _task(str(data), tmp_path, on_bad_row="skip").load("train")
    kept, counts = screen.screen(samples, skip=True, log=lambda _m: None)
    assert len(kept) == 1 and counts["special_token"] == len(specials), counts
    for line, token in enumerate(specials, start=2):
        one = [s for s in samples if s.meta["source_line"] == line]
        classify("special tokens in text", token, lambda o=one: screen.screen(o, skip=False), (DataError,),
                 must_say=f"{data}:{line}: ")
    report("special tokens in text")


def test_prompt_lengths(tmp_path, tokenizer):
    """Prompts of generated lengths around data.max_prompt_tokens: over it refused naming file:line, else kept."""
    from core.interfaces import DataError
    from core.runtime.data_limits import PromptScreen, prompt_text

    limit = 64
    screen = PromptScreen(tokenizer, limit)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    for target in sorted({1, limit // 2, limit - 2, limit - 1, limit, limit + 1, limit + 2, 2 * limit, 10 * limit,
                          40 * limit, 1000 * limit}):
        text = "colour?" + " red" * target
        data = tmp_path / f"len{target}.jsonl"
        data.write_text(json.dumps(dict(ROW, conversations=[{"from": "human", "value": "<image>" + text},
                                                           {"from": "gpt", "value": "red"}])) + "\n")
        samples = _task(str(data), tmp_path).load("train")
        n_tokens = len(tokenizer(prompt_text(samples[0]), add_special_tokens=False)["input_ids"])
        classify("prompt lengths", f"{n_tokens} tokens", lambda s=samples: screen.screen(s, skip=False),
                 (DataError,), bad=n_tokens > limit, must_say=f"{data}:1: ")
    report("prompt lengths")


def test_special_token_row_stops_a_real_run_before_weights(tmp_path, capsys):
    """End to end: core.train with a special token in row 2 exits 2 naming data:2, and writes no checkpoint."""
    from core.train import main

    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    bad = dict(ROW, conversations=[{"from": "human", "value": "<image> <|vision_start|> colour?"},
                                   {"from": "gpt", "value": "red"}])
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(ROW) + "\n" + json.dumps(bad) + "\n")
    argv = [f"model.path={tmp_path / 'tiny'}", "task.name=vlmr1_jsonl", f"task.options={{data_files: [{data}]}}",
            "eval.enabled=false", f"logging.output_dir={tmp_path / 'out'}", "logging.tensorboard=false",
            "logging.progress_bar=false", "train.max_steps=1", "device.name=cpu"]
    with time_limit(300):
        rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert f"{data}:2: " in err and "<|vision_start|>" in err and "Traceback" not in err, err[-2000:]
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize("app", ["evaluate", "sft"])
def test_special_token_row_is_refused_by_evaluate_and_sft_too(app, tmp_path, capsys):
    """core.evaluate and core.sft screen rows as core.train does: exit 2 naming data:2 (``on_bad_row: error``)."""
    import importlib

    main = importlib.import_module(f"core.{app}").main
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    bad = dict(ROW, conversations=[{"from": "human", "value": "<image> <|vision_start|> colour?"},
                                   {"from": "gpt", "value": "red"}])
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(ROW) + "\n" + json.dumps(bad) + "\n")
    over = [f"model.path={tmp_path / 'tiny'}", "task.name=vlmr1_jsonl",
            f"task.options={{data_files: [{data}], on_bad_row: error}}", "device.name=cpu"]
    argv = (["--split", "train", "--out", str(tmp_path / "ev"), "--quiet", *over] if app == "evaluate"
            else ["--output-dir", str(tmp_path / "sft"), *over, "train.max_steps=1"])
    with time_limit(300):
        rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert f"{data}:2: " in err and "<|vision_start|>" in err and "Traceback" not in err, err[-2000:]
