"""completions.jsonl says what the model saw (its images) and which reward method scored each row."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from core.interfaces import RewardItem, Sample
from core.runtime.generation import completion_record


def test_record_carries_images_and_reward_method(tmp_path: Path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    s = Sample(id="row-7", images=[str(a), b, Image.new("RGB", (4, 4))], messages=[], solution="B",
               reward_method="mcq")
    item = RewardItem(completion="<answer>B</answer>", solution="B", prompt="Which?", reward_method="mcq")
    rec = completion_record(3, s, item, 1.0, 0.5, {"accuracy": 1.0})
    assert rec["images"] == [str(a), str(b), None] and rec["num_images"] == 3  # in-memory image: counted, no path
    assert rec["reward_method"] == "mcq" and rec["id"] == "row-7" and rec["step"] == 3
    assert json.loads(json.dumps(rec)) == rec  # one JSON line
    plain = completion_record(1, Sample(id="x", images=[], messages=[]), RewardItem("c", None), 0.0, 0.0, {})
    assert plain["images"] == [] and plain["num_images"] == 0 and plain["reward_method"] is None
