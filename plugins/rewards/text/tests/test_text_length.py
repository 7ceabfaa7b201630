"""Golden values for the cosine length reward (correctness-dependent) and the repetition penalty."""

from __future__ import annotations

import math

import pytest
from vlmr1_text.length import LengthReward, RepetitionReward

from core.interfaces import Reward, RewardBatch, RewardContext, RewardItem
from core.plugins import PluginHost


@pytest.fixture(scope="module")
def registry():
    return PluginHost(plugins="text").registry


def item(answer: str, solution: str, n_tokens: int, **kw) -> RewardItem:
    return RewardItem(completion=f"<think>t</think><answer>{answer}</answer>", solution=solution,
                      completion_length=n_tokens, **kw)


# ---- the schedule (hand-computed) ------------------------------------------------------------
C256 = (1 + math.cos(math.pi / 4)) / 2  # 0.853553...


@pytest.mark.parametrize("length, correct, expected", [
    (0, True, 1.0), (256, True, 0.5 + 0.5 * C256), (512, True, 0.75), (1024, True, 0.5),
    (2048, True, 0.5),  # clamped (VLM-R1's unclamped cosine rose back to 1.0 at 2048)
    (0, False, -0.5), (256, False, -0.5 * C256), (512, False, -0.25), (1024, False, 0.0), (4096, False, 0.0),
])
def test_schedule_hand_computed(length, correct, expected):
    r = LengthReward.from_options({"correctness": "exact_match"})
    assert r.schedule(length, correct) == pytest.approx(expected)


def test_wrong_answers_are_not_scored_as_correct(registry):
    # VLM-R1 set acc_reward = 1.0 before testing correctness: a wrong answer got the correct branch.
    r = LengthReward.from_options({"correctness_reward": "all_match"})
    r.setup(RewardContext(registry=registry))
    out = r.score(RewardBatch([item("red", "red", 512), item("blue", "red", 512), item("blue", "red", 1024)]))
    assert out == pytest.approx([0.75, -0.25, 0.0])


def test_correctness_threshold_and_none_propagation(registry):
    # default chain: "red car" vs "red cat" scores 6/7 = 0.857 (fuzzy) -> correct at 0.7, wrong at 0.9
    b = RewardBatch([item("red car", "red cat", 512)])
    r = LengthReward.from_options({"correctness_reward": "default"})
    r.setup(RewardContext(registry=registry))
    assert r.score(b) == pytest.approx([0.75])
    strict = LengthReward.from_options({"correctness_reward": "default", "correct_threshold": 0.9})
    strict.setup(RewardContext(registry=registry))
    assert strict.score(b) == pytest.approx([-0.25])
    # mcq returns None for a solution without a letter -> the length reward does not apply either
    m = LengthReward.from_options({"correctness_reward": "mcq"})
    m.setup(RewardContext(registry=registry))
    assert m.score(RewardBatch([item("B", "B", 1024), item("B", "red", 1024)])) == [0.5, None]


def test_correctness_through_the_accuracy_router(registry):
    r = LengthReward.from_options({})  # correctness_reward: accuracy (routes by the row's method)
    r.setup(RewardContext(registry=registry))
    out = r.score(RewardBatch([item("yes", "yes", 1024, reward_method="yes_no"),
                               item("(C)", "B", 1024, reward_method="mcq")]))
    assert out == pytest.approx([0.5, 0.0])


def test_exact_match_mode_units_and_truncation():
    r = LengthReward.from_options({"correctness": "exact_match", "length_unit": "chars", "max_length": 100,
                                   "truncated_value": -1.0})
    text = "<answer>ok</answer>"  # 19 characters
    c = (1 + math.cos(math.pi * 19 / 100)) / 2
    out = r.score(RewardBatch([RewardItem(text, "ok"), RewardItem(text, "no"),
                               RewardItem(text, "ok", truncated=True)]))
    assert out == pytest.approx([0.5 + 0.5 * c, -0.5 * c, -1.0])
    w = LengthReward.from_options({"correctness": "exact_match", "length_unit": "words", "max_length": 4})
    assert w.score(RewardBatch([RewardItem("a b <answer>ok</answer>", "ok")])) == pytest.approx(
        [0.5 + 0.5 * (1 + math.cos(math.pi * 3 / 4)) / 2])


def test_token_length_must_be_set_and_setup_needs_registry():
    r = LengthReward.from_options({"correctness": "exact_match"})
    with pytest.raises(ValueError, match="completion_length"):
        r.score(RewardBatch([RewardItem("<answer>ok</answer>", "ok")]))
    assert r.score(RewardBatch([RewardItem("", "ok")])) == [-0.5]  # empty completion, 0 tokens, wrong
    with pytest.raises(ValueError, match="registry"):
        LengthReward.from_options({}).setup(RewardContext())
    with pytest.raises(RuntimeError, match="not set up"):
        LengthReward.from_options({}).score(RewardBatch([item("a", "a", 1)]))


def test_injected_correctness_reward_and_thread_safety():
    class Half(Reward):
        name = "half"
        thread_safe = False

        def score(self, batch):
            return [0.7, 0.69]

    r = LengthReward.from_options({})
    r.set_correctness_reward(Half())
    assert r.score(RewardBatch([item("a", "a", 1024), item("a", "a", 1024)])) == pytest.approx([0.5, 0.0])
    assert r.thread_safe is False


# ---- repetition -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, ngram, expected", [
    ("a b c a b c a b c", 3, -(1 - 3 / 7)),  # 7 trigrams, 3 distinct
    ("The cat sat on the mat", 6, 0.0),  # one 6-gram
    ("the the the the the the the", 6, -(1 - 1 / 2)),  # two identical 6-grams
    ("too short", 6, 0.0),
    ("", 6, 0.0),
    ("A b A B", 1, -(1 - 2 / 4)),  # lower-cased words
])
def test_repetition_text(text, ngram, expected):
    r = RepetitionReward.from_options({"ngram_size": ngram})
    assert r.score(RewardBatch([RewardItem(text, "")])) == [pytest.approx(expected)]


def test_repetition_detection_json():
    objs = ('[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}, {"bbox_2d": [1, 2, 3, 4], "label": "cat"}, '
            '{"bbox_2d": [5, 6, 7, 8], "label": "cat"}]')
    r = RepetitionReward()
    fenced = f"<answer>```json\n{objs}\n```</answer>"
    assert r.penalty(fenced) == pytest.approx(-1 / 3)  # 3 objects, 2 distinct
    assert r.penalty(f"<answer>{objs}</answer>") == pytest.approx(-1 / 3)  # bare list
    assert RepetitionReward.from_options({"max_penalty": -2.0}).penalty(objs) == pytest.approx(-2 / 3)
    # broken JSON falls back to words (fewer than 6 words -> 0)
    assert r.penalty('```json [{"bbox_2d": [1, 2, 3, 4], "label": ```') == 0.0
    # json_items off: 21 words, 16 6-grams, 2 of them repeat the first object -> -(1 - 14/16)
    assert RepetitionReward.from_options({"json_items": False}).penalty(objs) == pytest.approx(-2 / 16)
