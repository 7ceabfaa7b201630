"""Render ``grounding_splits.png``: three samples of each ``synthetic_grounding`` split.

Usage: ``python plugins/tasks/synthetic/docs/make_split_examples.py [OUT.png]``. Each panel is
the image the model gets (scaled 2x for reading), the target box outlined in white, and the
question underneath; one row per split.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw
from vlmr1_synthetic.grounding import SPLITS, SyntheticGrounding

SCALE, PER_ROW, CAPTION = 2, 3, 34


def main(out: str | None = None) -> Path:
    """Write the contact sheet and return its path."""
    task = SyntheticGrounding.from_options({"num_objects": 2, "num_eval": 8})
    side = task.options.image_size * SCALE
    splits = [s for s in SPLITS if s != "train"]
    sheet = Image.new("RGB", (PER_ROW * (side + 8) + 110, len(splits) * (side + CAPTION + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, split in enumerate(splits):
        y0 = r * (side + CAPTION + 8)
        draw.text((4, y0 + side // 2), split, fill="black")
        for c in range(PER_ROW):
            s = task.load(split)[c]
            img = s.load_images()[0].resize((side, side), Image.NEAREST)
            x1, y1, x2, y2 = (v * SCALE for v in s.solution)
            ImageDraw.Draw(img).rectangle((x1 - 1, y1 - 1, x2, y2), outline="white", width=2)
            x0 = 110 + c * (side + 8)
            sheet.paste(img, (x0, y0))
            words, line, lines = s.question.split(), "", []
            for w in words:  # wrap the question to the panel width
                if len(line) + len(w) > 34:
                    lines.append(line)
                    line = ""
                line = f"{line} {w}".strip()
            draw.multiline_text((x0, y0 + side + 2), "\n".join([*lines, line]), fill="black", spacing=1)
    path = Path(out or Path(__file__).with_name("grounding_splits.png"))
    sheet.save(path)
    return path


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else None))
