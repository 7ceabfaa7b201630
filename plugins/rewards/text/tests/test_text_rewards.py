"""Golden values for the text rewards (format, all_match, mcq, yes_no, default) and routing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from vlmr1_text.parsing import extract_choice, extract_yes_no, normalize
from vlmr1_text.rewards import AllMatchReward, DefaultReward, FormatReward, MCQReward, YesNoReward

from core.interfaces import RewardBatch, RewardContext, RewardItem
from core.plugins import PluginHost


def scores(reward, completions, solution="x"):
    items = [RewardItem(completion=c, solution=s) for c, s in
             (completions if isinstance(completions[0], tuple) else [(c, solution) for c in completions])]
    return reward.score(RewardBatch(items))


# ---- format --------------------------------------------------------------------------------
GOOD = "<think>look at the image</think>\n<answer>red</answer>"
FORMAT_CASES = [
    # completion, strict, original, loose
    (GOOD, 1.0, 1.0, 1.0),
    ("<think>a</think><answer>b</answer>", 1.0, 1.0, 1.0),
    ("  " + GOOD + "\n", 1.0, 1.0, 1.0),  # surrounding whitespace is ignored (strip: true)
    ("", 0.0, 0.0, 0.0),
    ("<answer>red</answer>", 0.0, 0.0, 0.0),  # missing think
    ("<think>x</think>", 0.0, 0.0, 0.0),  # missing answer
    ("<answer>red</answer><think>x</think>", 0.0, 0.0, 0.0),  # wrong order
    ("Sure! " + GOOD, 0.0, 0.0, 1.0),  # text before: only loose accepts
    (GOOD + " done", 0.0, 0.0, 1.0),  # text after
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0, 1.0, 1.0),  # repeated block
    ("<think>a<think>b</think><answer>c</answer>", 0.0, 1.0, 1.0),  # nested/duplicated tag
    ("<think>a</think>\n\n<answer>\nb\n</answer>", 1.0, 1.0, 1.0),  # newlines inside and between
]


@pytest.mark.parametrize("completion, strict, original, loose", FORMAT_CASES)
def test_format_modes(completion, strict, original, loose):
    for mode, expected in (("strict", strict), ("original", original), ("loose", loose)):
        r = FormatReward.from_options({"mode": mode})
        assert scores(r, [completion]) == [expected], mode


def test_format_custom_tags_and_no_strip():
    r = FormatReward.from_options({"think_tag": "reasoning", "answer_tag": "final"})
    assert scores(r, ["<reasoning>r</reasoning><final>f</final>", GOOD]) == [1.0, 0.0]
    assert scores(FormatReward.from_options({"strip": False}), [" " + GOOD]) == [0.0]
    with pytest.raises(ValidationError, match="tag name"):
        FormatReward.from_options({"think_tag": "<think>"})
    with pytest.raises(ValidationError):
        FormatReward.from_options({"modus": "strict"})


# ---- all_match -----------------------------------------------------------------------------
@pytest.mark.parametrize("completion, solution, expected", [
    ("<think>...</think><answer>Red</answer>", "red", 1.0),
    ("<answer> red. </answer>", "<answer> Red </answer>", 1.0),  # tags, case, trailing period
    ("<answer>\"red\"</answer>", "red", 1.0),  # quotes trimmed
    ("<answer>dark\n  red</answer>", "dark red", 1.0),  # whitespace collapsed
    ("<answer>dark red</answer>", "red", 0.0),
    ("<answer>-5</answer>", "5", 0.0),  # the sign is kept
    ("<answer>a</answer><answer>b</answer>", "b", 1.0),  # the last block counts
    ("red", "red", 1.0),  # no tags: the whole completion
    ("", "red", 0.0),
    ("<answer></answer>", "", 1.0),  # empty equals empty
])
def test_all_match(completion, solution, expected):
    assert scores(AllMatchReward(), [(completion, solution)]) == [expected]


def test_all_match_case_sensitive_and_methods():
    r = AllMatchReward.from_options({"case_sensitive": True})
    assert scores(r, [("<answer>Red</answer>", "red"), ("<answer>Red</answer>", "Red")]) == [0.0, 1.0]
    assert set(AllMatchReward.methods) == {"all_match", "exact_match"}
    assert normalize("  The  CAT.  ") == "the cat"


# ---- mcq -------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("(b)", "B"), ("C.", "C"), ("The answer is (B)", "B"), ("Answer: C", "C"),
    ("I choose option D.", "D"), ("B. red car", "B"), ("(B) red car", "B"), ("I think B.", "B"),
    ("The answer is B, not A.", "B"), ("A cat sits on the mat", None), ("(A) or (C)", None),
    ("B or C", None), ("", None), ("I believe it is C", "C"), ("Z", "Z"), ("(K) a kite", "K"),
    # CJK text: "\\w" matched CJK characters, so these read as no choice before.
    ("答案是B", "B"), ("答案是B。", "B"), ("正确答案：C", "C"), ("我选B", "B"), ("选项D是对的", "D"),
    ("答案为（Ｂ）", "B"), ("【C】", "C"), ("因为A不对，所以答案是C", "C"), ("A和C都可以", None),
])
def test_extract_choice(answer, expected):
    assert extract_choice(answer) == expected


def test_extract_choice_letters_option():
    assert extract_choice("Z", "ABCDEFGHIJ") is None and extract_choice("(K)", "ABCDEFGHIJ") is None
    assert scores(MCQReward(), [("<answer>K</answer>", "K"), ("<answer>答案是B</answer>", "B")]) == [1.0, 1.0]


@pytest.mark.parametrize("completion, solution, expected", [
    ("<think>hmm</think><answer>The answer is (B)</answer>", "B", 1.0),
    ("<answer>B</answer>", "<answer> (B) </answer>", 1.0),
    ("<answer>B. The red one</answer>", "B. The red one", 1.0),
    ("<answer>C</answer>", "B", 0.0),
    ("<answer>B or C</answer>", "B", 0.0),  # a hedge is not an answer
    ("<answer>A B C D</answer>", "B", 0.0),
    ("<answer>no idea</answer>", "B", 0.0),
    ("", "B", 0.0),
    ("<answer>B</answer>", "the red one", None),  # solution names no letter: not applicable
])
def test_mcq(completion, solution, expected):
    assert scores(MCQReward(), [(completion, solution)]) == [expected]


# ---- yes/no ---------------------------------------------------------------------------------
@pytest.mark.parametrize("completion, solution, expected", [
    ("<answer>Yes.</answer>", "yes", 1.0),
    ("<answer>No, it is not.</answer>", "<answer> No </answer>", 1.0),
    ("<answer>yes</answer>", "no", 0.0),
    ("<answer>I know it is red</answer>", "no", 0.0),  # "know" is not "no" (VLM-R1 read it as no)
    ("<answer>yes or no</answer>", "yes", 0.0),  # hedge
    ("<answer>maybe</answer>", "yes", 0.0),
    ("", "yes", 0.0),
    ("<answer>red</answer>", "red", None),  # no yes/no in the solution: not applicable (VLM-R1 gave 1.0)
])
def test_yes_no(completion, solution, expected):
    assert scores(YesNoReward(), [(completion, solution)]) == [expected]
    assert extract_yes_no("Nothing else") is None


# ---- default chain ----------------------------------------------------------------------------
@pytest.mark.parametrize("completion, solution, expected", [
    ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0),  # math-verify
    ("<answer>$\\boxed{3}$</answer>", "3", 1.0),
    ("<answer>3.0</answer>", "3", 1.0),
    ("<answer>4</answer>", "3", 0.0),  # numeric, wrong: exact 0 (no partial credit for numbers)
    ("<answer>The answer is (B)</answer>", "B", 1.0),  # choice letter
    ("<answer>C</answer>", "B", 0.0),
    ("<answer>red car</answer>", "red cat", 6 / 7),  # fuzzy: Levenshtein ratio = 1 - 2/14
    ("<answer>red cat</answer>", "Red cat.", 1.0),
    ("", "red cat", 0.0),
    ("<answer>room B12</answer>", "room B13", 7 / 8),  # digits in gt, not a number: fuzzy 1 - 2/16
    # math-verify reads the first number and ignores words: VLM-R1's chain scores this 1.0
    ("<answer>3 dogs</answer>", "3 cats", 1.0),
])
def test_default_chain(completion, solution, expected):
    assert scores(DefaultReward(), [(completion, solution)]) == [pytest.approx(expected)]


def test_default_fuzzy_can_be_hacked_and_switched_off():
    # An answer that merely shares characters with the solution earns partial credit ...
    hack = "<answer>a photo of a red cat</answer>"
    # Levenshtein ratio: 1 - indel distance 13 / (20 + 7) = 14/27
    assert scores(DefaultReward(), [(hack, "red cat")]) == [pytest.approx(14 / 27)]
    # ... which fuzzy: false turns into exact matching.
    assert scores(DefaultReward.from_options({"fuzzy": False}), [(hack, "red cat"), ("<answer>red cat</answer>",
                                                                                     "red cat")]) == [0.0, 1.0]


def test_default_runs_in_a_worker_thread():
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(scores(DefaultReward(), [("<answer>0.5</answer>", "\\frac{1}{2}")])))
    t.start()
    t.join()
    assert out == [[1.0]]


# ---- routing through the accuracy router -------------------------------------------------------
def test_accuracy_router_dispatches_text_methods():
    registry = PluginHost(plugins="text").registry
    router = registry.create("rewards", "accuracy")
    router.setup(RewardContext(registry=registry))
    items = [
        RewardItem("<answer>(C)</answer>", "C", reward_method="mcq"),
        RewardItem("<answer>no</answer>", "yes", reward_method="yes_no"),
        RewardItem("<answer>Left Screen</answer>", "left screen", reward_method="exact_match"),
        RewardItem("<answer>left screen</answer>", "left", reward_method="all_match"),
        RewardItem("<answer>0.5</answer>", "1/2", reward_method=None),  # default chain
    ]
    assert router.score(RewardBatch(items)) == [1.0, 0.0, 1.0, 0.0, 1.0]
