"""Unreadable images (not an image, empty, decompression bomb, extreme aspect) are bad rows found at load.

Under ``on_bad_row: skip`` they are counted and skipped like any other bad row; under ``error`` they
are a ``DataError`` naming the row. The pixel budget refuses a bomb from its header, before decoding.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from vlmr1_jsonl.common import ImageLimits, ImageRef
from vlmr1_jsonl.jsonl import VlmR1Jsonl

from core.interfaces import DataError


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width x height`` (a decompression bomb, without the bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def data(tmp_path):
    Image.new("RGB", (8, 6), "red").save(tmp_path / "good.png")
    (tmp_path / "text.png").write_text("this is not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    png_header_only(tmp_path / "bomb.png", 20_000, 20_000)  # 400 Mpx
    Image.new("RGB", (1, 400), "blue").save(tmp_path / "thin.png")
    names = ["good.png", "text.png", "empty.png", "bomb.png", "thin.png"]
    rows = [{"image": n, "conversations": [{"from": "human", "value": "<image> colour?"},
                                           {"from": "gpt", "value": "<answer>red</answer>"}]} for n in names]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_images_are_counted_and_skipped(data):
    task = VlmR1Jsonl(VlmR1Jsonl.Options(data_files=[str(data)], on_bad_row="skip"))
    samples = task.load("train")
    assert [s.images[0].path.endswith("good.png") for s in samples] == [True]
    stats = task.stats()
    assert stats["skipped_rows"] == 4
    assert stats["skipped/unreadable_image"] == 2
    assert stats["skipped/image_too_large"] == 1 and stats["skipped/image_aspect"] == 1
    assert samples[0].load_images()[0].size == (8, 6)


@pytest.mark.parametrize(("line", "reason"), [(2, "unreadable_image"), (3, "unreadable_image"),
                                              (4, "image_too_large"), (5, "image_aspect")])
def test_bad_images_are_errors_naming_the_row(data, line, reason):
    lines = data.read_text().splitlines()
    data.write_text(lines[0] + "\n" + lines[line - 1] + "\n")
    task = VlmR1Jsonl(VlmR1Jsonl.Options(data_files=[str(data)]))
    with pytest.raises(DataError, match=rf"{data}:2: .*\[{reason}\] \(set on_bad_row: skip"):
        task.load("train")


def test_pixel_budget_refuses_a_bomb_before_decoding(tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 20_000, 20_000)
    ref = ImageRef(str(bomb), "data.jsonl", 7, ImageLimits(max_pixels=50_000_000))
    with pytest.raises(DataError, match=r"data.jsonl:7: .*bomb.png is over the pixel budget max_image_pixels=50000000"):
        ref()
    mid = png_header_only(tmp_path / "mid.png", 10_000, 6_000)  # 60 Mpx: under PIL's limit, over ours
    with pytest.raises(DataError, match=r"mid.png is 10000x6000 = 60 Mpx, over the pixel budget"):
        ImageRef(str(mid), limits=ImageLimits(max_pixels=50_000_000))()
    big = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(big)
    assert ImageRef(str(big), limits=ImageLimits(max_pixels=60_000))().size == (300, 200)
    with pytest.raises(DataError, match="over the pixel budget"):
        ImageRef(str(big), limits=ImageLimits(max_pixels=59_999))()
    opts = VlmR1Jsonl.Options(data_files=["x.jsonl"], max_image_pixels=1000, check_images="exists")
    assert VlmR1Jsonl(opts).limits.max_pixels == 1000
