"""A line torn by a kill or a full disk in metrics.jsonl / completions.jsonl never breaks a later run."""

from __future__ import annotations

import json

from core.runtime.runlog import MetricsWriter, plot_rewards, read_jsonl


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    good = [json.dumps({"step": s, "reward": s / 10}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(good) + "\n" + '{"step": 4, "rew')
    (tmp_path / "completions.jsonl").write_bytes(b'{"step": 1, "completion": "ok"}\n{"step": 2, "completion": "\xe4')
    w = MetricsWriter(tmp_path, tensorboard=False)
    assert w.truncate_after(2) == {"metrics.jsonl": 1, "completions.jsonl": 1}
    w.log(3, {"reward": 0.5})
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["reward"] == 0.5
    assert (tmp_path / "completions.jsonl").read_text() == '{"step": 1, "completion": "ok"}\n'
    assert not list(tmp_path.glob("*.tmp"))


def test_plot_and_reader_tolerate_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 0.1}\n[1, 2]\n{"step": 2, "reward": 0.2}\n{"step": 3, "re')
    assert [rec is not None for _, rec in read_jsonl(path)] == [True, False, True, False]
    assert plot_rewards(tmp_path).is_file()


def test_reward_plot_names_a_per_reward_curve_equal_to_the_total():
    from core.runtime.runlog import reward_curves

    one = [{"step": s, "reward": s / 4, "rewards/all_match": s / 4, "rewards/all_match_std": 0.1} for s in (1, 2, 3)]
    assert [(label, total) for label, _, total in reward_curves(one)] == [("reward (= rewards/all_match)", True)]
    two = [{"step": s, "reward": s / 2, "rewards/iou": s / 4, "rewards/format": s / 4} for s in (1, 2)]
    assert [label for label, _, _ in reward_curves(two)] == ["reward", "rewards/format", "rewards/iou"]
    gap = [{"step": 1, "reward": 0.5, "rewards/iou": 0.5}, {"step": 2, "reward": 0.7}]  # iou missing at step 2
    assert [label for label, _, _ in reward_curves(gap)] == ["reward", "rewards/iou"]
