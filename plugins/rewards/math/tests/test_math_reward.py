"""The math reward: equivalences, fallbacks, and a hard time limit that really stops sympy."""

from __future__ import annotations

import threading
import time

import pytest
from vlmr1_math.check import is_equivalent, last_boxed, normalize_math
from vlmr1_math.rewards import MathReward

from core.interfaces import RewardBatch, RewardContext, RewardItem
from core.plugins import PluginHost
from core.runtime.reward_runner import RewardRunner, RewardSpec

#: sympy evaluates 9^(9^9) (a 370-million-digit integer) for minutes.
PATHOLOGICAL = "<answer>$9^{9^{9}}$</answer>"


@pytest.fixture(scope="module")
def reward():
    r = MathReward.from_options({"timeout_s": 5.0})
    r.setup(RewardContext())
    yield r
    r.close()


def one(reward, completion, solution):
    return reward.score(RewardBatch([RewardItem(completion=completion, solution=solution)]))[0]


EQUIVALENT = [
    ("<answer>\\frac{1}{2}</answer>", "0.5"),
    ("<answer>0.5</answer>", "<answer> \\frac{1}{2} </answer>"),
    ("The answer is (B): $\\boxed{0.5}$", "\\frac{1}{2}"),  # no answer block: the whole completion
    ("<think>half</think><answer>$\\boxed{\\dfrac{1}{2}}$</answer>", "1/2"),
    ("<answer>10%</answer>", "0.1"),
    ("<answer>$10\\%$</answer>", "0.1"),
    ("<answer>x = 3</answer>", "3"),
    ("<answer>$\\frac{\\sqrt{2}}{2}$</answer>", "\\sqrt{2}/2"),  # gold read only once wrapped in $
    ("<answer>\\frac34</answer>", "\\dfrac{3}{4}"),
    ("<answer>$\\boxed{1+x^2}$</answer>", "x^2+1"),
    ("<answer>East</answer>", "\\text{east}"),  # math-verify reads neither: normalised string fallback
    ("<answer>Red and blue.</answer>", "red and blue"),
]
DIFFERENT = [
    ("<answer>3</answer>", "2"),
    ("<answer>\\frac{1}{3}</answer>", "0.5"),
    ("<answer>$\\boxed{x^2-1}$</answer>", "x^2+1"),
    ("<answer>West</answer>", "east"),
    ("", "2"),
    ("<answer></answer>", "2"),
]


@pytest.mark.parametrize("completion, solution", EQUIVALENT)
def test_equivalent(reward, completion, solution):
    assert one(reward, completion, solution) == 1.0


@pytest.mark.parametrize("completion, solution", DIFFERENT)
def test_different(reward, completion, solution):
    assert one(reward, completion, solution) == 0.0


def test_empty_solution_is_not_applicable(reward):
    assert one(reward, "<answer>1</answer>", "<answer> </answer>") is None


def test_helpers():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None
    assert normalize_math("$\\left( \\dfrac{1}{2} \\right).$") == "(\\frac{1}{2})"
    assert is_equivalent("2", "3") is False
    t0 = time.monotonic()  # long prose is not retried as one LaTeX product of 5000 symbols (seconds)
    assert is_equivalent("0.5", "x" * 5000) is False
    assert time.monotonic() - t0 < 1.5


def test_hard_time_limit_kills_a_pathological_parse_and_recovers():
    r = MathReward.from_options({"timeout_s": 0.5})
    r.setup(RewardContext())
    try:
        items = [RewardItem("<answer>\\frac{1}{2}</answer>", "0.5"), RewardItem(PATHOLOGICAL, "5"),
                 RewardItem("<answer>\\frac{1}{2}</answer>", "0.5")]
        t0 = time.monotonic()
        out = r.score(RewardBatch(items))
        elapsed = time.monotonic() - t0
        assert out == [1.0, 0.0, 1.0]
        assert elapsed < 10.0  # unbounded, sympy would run for minutes (0.5 s limit + a worker restart)
        assert r.timeouts == 1 and r._worker.restarts == 1
    finally:
        r.close()
    none = MathReward.from_options({"timeout_s": 0.5, "on_timeout": "none"})
    try:
        assert none.score(RewardBatch([RewardItem(PATHOLOGICAL, "5")])) == [None]
    finally:
        none.close()


def test_in_the_reward_runner_threads():
    # The engine calls rewards from worker threads, where math-verify's signal timeouts cannot work.
    r = MathReward.from_options({"timeout_s": 0.5})
    runner = RewardRunner([RewardSpec("math", r, 1.0, 30.0, "zero")])
    try:
        items = [RewardItem("<answer>0.5</answer>", "\\frac{1}{2}"), RewardItem(PATHOLOGICAL, "5"),
                 RewardItem("<answer>4</answer>", "5")]
        res = runner(RewardBatch(items))
        assert res.per_reward[:, 0].tolist() == [1.0, 0.0, 0.0]
        assert res.metrics["rewards/math_timeouts"] == 0  # the reward handled its own time limit
        assert r.timeouts == 1
    finally:
        runner.close()
    assert r._worker._proc is None  # close() stopped the worker process


def test_inline_isolation_main_and_worker_thread():
    r = MathReward.from_options({"isolation": "inline"})
    assert one(r, "<answer>\\frac{1}{2}</answer>", "0.5") == 1.0
    out = []
    t = threading.Thread(target=lambda: out.append(one(r, "<answer>0.5</answer>", "1/2")))
    t.start()
    t.join()
    assert out == [1.0]
    assert r._worker is None  # no process was started


def test_accuracy_router_sends_math_rows_here():
    registry = PluginHost(plugins="math").registry
    router = registry.create("rewards", "accuracy", {"reward_options": {"math": {"timeout_s": 2.0}}})
    router.setup(RewardContext(registry=registry))
    # (the router's math worker process is killed by its finalizer)
    assert router.score(RewardBatch([RewardItem("<answer>0.5</answer>", "1/2", reward_method="math"),
                                     RewardItem("<answer>2</answer>", "1/2", reward_method="math")])) == [1.0, 0.0]
