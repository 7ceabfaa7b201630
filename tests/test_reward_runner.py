"""The engine's reward runner: weighted sums, time limits, error policies, metrics, parallelism."""

from __future__ import annotations

import logging
import math
import threading
import time

import pytest
import torch

from core.interfaces import Reward, RewardBatch, RewardItem
from core.runtime.reward_runner import (
    RewardContractError,
    RewardError,
    RewardResult,
    RewardRunner,
    RewardSpec,
    RewardTimeoutError,
)
from core.testing import HangsOnce


def batch(n: int) -> RewardBatch:
    return RewardBatch([RewardItem(completion=f"c{i}", solution="s") for i in range(n)])


class Fixed(Reward):
    """Returns a fixed list of scores."""

    name = "fixed"

    def __init__(self, values):
        super().__init__()
        self.values = values
        self.calls = 0

    def score(self, b):
        self.calls += 1
        return list(self.values)


class Sleeper(Reward):
    name = "sleeper"

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def score(self, b):
        time.sleep(self.seconds)
        return [1.0] * len(b)


class Boom(Reward):
    name = "boom"

    def score(self, b):
        raise ZeroDivisionError("division by zero in a reward")


def spec(name, reward, weight=1.0, timeout=5.0, on_error="zero"):
    return RewardSpec(name, reward, weight, timeout, on_error)


def as_list(t: torch.Tensor) -> list:
    return [None if math.isnan(v) else v for v in t.tolist()]


# ---- weighted sum and metrics (hand-computed) -----------------------------------------------
def test_weighted_sum_and_metrics_hand_computed():
    runner = RewardRunner([spec("a", Fixed([1.0, 0.5, None]), weight=2.0),
                           spec("b", Fixed([0.0, 1.0, 0.25]), weight=-1.0)])
    res = runner(batch(3))
    assert isinstance(res, RewardResult)
    assert res.per_reward.shape == (3, 2) and res.per_reward.dtype == torch.float32
    assert as_list(res.per_reward[:, 0]) == [1.0, 0.5, None]
    assert as_list(res.per_reward[:, 1]) == [0.0, 1.0, 0.25]
    # 2*1 - 0 = 2; 2*0.5 - 1 = 0; the None term counts 0: -0.25
    assert res.total.tolist() == pytest.approx([2.0, 0.0, -0.25])
    m = res.metrics
    assert m["rewards/a"] == pytest.approx(0.75)
    assert m["rewards/a_std"] == pytest.approx(math.sqrt(0.125))  # sample std of (1, 0.5)
    assert m["rewards/a_applicable_frac"] == pytest.approx(2 / 3)
    assert m["rewards/b"] == pytest.approx(1.25 / 3)
    assert m["rewards/a_errors"] == 0 and m["rewards/a_timeouts"] == 0
    assert res.names == ["a", "b"]


def test_all_terms_not_applicable_total_is_zero_and_mean_is_nan():
    res = RewardRunner([spec("a", Fixed([None, None]))])(batch(2))
    assert res.total.tolist() == [0.0, 0.0]
    assert math.isnan(res.metrics["rewards/a"]) and math.isnan(res.metrics["rewards/a_std"])
    assert res.metrics["rewards/a_applicable_frac"] == 0.0


def test_single_value_std_is_zero_and_numeric_types_accepted():
    import numpy as np

    res = RewardRunner([spec("a", Fixed([np.float32(0.5), True, torch.tensor(2.0)]))])(batch(3))
    assert res.per_reward[:, 0].tolist() == [0.5, 1.0, 2.0]
    res1 = RewardRunner([spec("a", Fixed([0.5]))])(batch(1))
    assert res1.metrics["rewards/a_std"] == 0.0


def test_empty_batch():
    res = RewardRunner([spec("a", Fixed([])), spec("b", Fixed([]))])(batch(0))
    assert res.per_reward.shape == (0, 2) and res.total.shape == (0,)


def test_duplicate_names_are_made_unique():
    res = RewardRunner([spec("a", Fixed([1.0])), spec("a", Fixed([0.0]))])(batch(1))
    assert res.names == ["a", "a_2"] and "rewards/a_2" in res.metrics


# ---- time limits ---------------------------------------------------------------------------
def test_reward_that_sleeps_forever_does_not_stop_the_step():
    stuck = Sleeper(1e6)
    good = Fixed([1.0, 0.0, 1.0])
    runner = RewardRunner([spec("stuck", stuck, timeout=0.5, on_error="zero"), spec("good", good, weight=2.0)])
    t0 = time.monotonic()
    res = runner(batch(3))
    elapsed = time.monotonic() - t0
    assert 0.45 <= elapsed < 2.0
    assert res.per_reward[:, 0].tolist() == [0.0, 0.0, 0.0]
    assert res.total.tolist() == [2.0, 0.0, 2.0]
    assert res.metrics["rewards/stuck_timeouts"] == 3 and res.metrics["rewards/stuck_errors"] == 3
    assert res.metrics["rewards/good_errors"] == 0

    # Next step: the reward is called fresh in a new thread (the abandoned one is left running)
    # and times out again; the step still ends on time.
    t0 = time.monotonic()
    res2 = runner(batch(3))
    assert time.monotonic() - t0 < 2.0
    assert res2.metrics["rewards/stuck_timeouts"] == 3
    assert res2.per_reward[:, 1].tolist() == [1.0, 0.0, 1.0]
    alive = [t for t in threading.enumerate() if t.name == "vlmr1-reward-stuck"]
    assert len(alive) == 2 and all(t.daemon for t in alive)


def test_a_timed_out_call_is_replaced_and_the_next_call_is_tried_fresh():
    r = HangsOnce(hang_s=30)
    runner = RewardRunner([spec("judge", r, timeout=0.3)])
    try:
        assert runner(batch(2)).metrics["rewards/judge_timeouts"] == 2
        res = runner(batch(2))  # the hung first call is still running: the old code skipped the reward here
        assert res.metrics["rewards/judge_timeouts"] == 0 and res.per_reward[:, 0].tolist() == [1.0, 1.0]
    finally:
        r.release.set()


def test_abandoned_calls_are_bounded_per_reward():
    from core.runtime.reward_runner import MAX_ABANDONED_CALLS

    stuck = Sleeper(1e6)
    runner = RewardRunner([spec("forever", stuck, timeout=0.05)])
    for _ in range(MAX_ABANDONED_CALLS + 2):
        assert runner(batch(1)).metrics["rewards/forever_timeouts"] == 1
    alive = [t for t in threading.enumerate() if t.name == "vlmr1-reward-forever"]
    assert len(alive) == MAX_ABANDONED_CALLS


def test_timeout_with_skip_policy_gives_nan_and_excludes_from_total():
    runner = RewardRunner([spec("slow", Sleeper(5.0), timeout=0.2, on_error="skip"), spec("one", Fixed([1.0, 1.0]))])
    res = runner(batch(2))
    assert torch.isnan(res.per_reward[:, 0]).all()
    assert res.total.tolist() == [1.0, 1.0]
    assert res.metrics["rewards/slow_applicable_frac"] == 0.0 and res.metrics["rewards/slow_timeouts"] == 2


def test_timeout_with_raise_policy_names_the_reward():
    runner = RewardRunner([spec("slowpoke", Sleeper(5.0), timeout=0.2, on_error="raise")])
    with pytest.raises(RewardTimeoutError, match="slowpoke"):
        runner(batch(1))


def test_reward_that_finishes_after_its_timeout_is_called_again_later():
    r = Sleeper(0.4)
    runner = RewardRunner([spec("late", r, timeout=0.1)])
    assert runner(batch(1)).metrics["rewards/late_timeouts"] == 1
    time.sleep(0.5)  # the abandoned call has returned by now
    res = runner(batch(1))
    assert res.metrics["rewards/late_timeouts"] == 1  # it ran (and timed out) again, not skipped...
    r.seconds = 0.0
    time.sleep(0.5)
    assert runner(batch(1)).per_reward.tolist() == [[1.0]]  # ...and scores once it is fast


# ---- exceptions, NaN, wrong results ----------------------------------------------------------
@pytest.mark.parametrize("policy, expected", [("zero", [0.0, 0.0]), ("skip", [None, None])])
def test_exception_policy(policy, expected):
    res = RewardRunner([spec("boom", Boom(), on_error=policy)])(batch(2))
    assert as_list(res.per_reward[:, 0]) == expected
    assert res.metrics["rewards/boom_errors"] == 2 and res.metrics["rewards/boom_timeouts"] == 0


def test_exception_raise_policy_keeps_the_cause():
    with pytest.raises(RewardError, match="'boom' raised ZeroDivisionError") as ei:
        RewardRunner([spec("boom", Boom(), on_error="raise")])(batch(2))
    assert isinstance(ei.value.__cause__, ZeroDivisionError)


def test_nan_and_inf_scores_are_errors_per_completion():
    """NaN/inf (e.g. a 0/0 on one odd completion) get the on_error policy, row by row (docs/plugins.md)."""
    res = RewardRunner([spec("bad", Fixed([1.0, float("nan"), float("inf"), None]), on_error="zero")])(batch(4))
    assert as_list(res.per_reward[:, 0]) == [1.0, 0.0, 0.0, None]
    assert res.failed[:, 0].tolist() == [False, True, True, False]  # None is "not applicable", not a failure
    assert res.failed_rows().tolist() == [False, True, True, False]
    assert res.metrics["rewards/bad_errors"] == 2
    res = RewardRunner([spec("bad", Fixed([1.0, float("nan")]), on_error="skip")])(batch(2))
    assert as_list(res.per_reward[:, 0]) == [1.0, None]
    with pytest.raises(RewardError, match="non-finite"):
        RewardRunner([spec("bad", Fixed([float("nan")]), on_error="raise")])(batch(1))


@pytest.mark.parametrize("policy", ["zero", "skip"])
@pytest.mark.parametrize("value, shown", [
    (["0.5", 1.0], r"returned '0.5' \(str\) as the score of completion 0 of 2"),
    ([1.0, "True"], r"returned 'True' \(str\) as the score of completion 1 of 2"),
    ([{"score": 1}, 1.0], r"returned \{'score': 1\} \(dict\) as the score of completion 0"),
    ([[1.0], 1.0], r"returned \[1.0\] \(list\) as the score of completion 0"),
])
def test_a_non_number_score_stops_at_once_whatever_the_policy(value, shown, policy):
    """A string/dict/list score is a bug in the reward: RewardContractError on the first call, not a zero."""
    reward = Fixed(value)
    with pytest.raises(RewardContractError, match=r"reward 'w' \(tests\.test_reward_runner\.Fixed\) broke the "
                                                   r"Reward contract: score\(\) " + shown) as ei:
        RewardRunner([spec("w", reward, on_error=policy)])(batch(2))
    assert "fix the reward's score()" in str(ei.value)
    assert reward.calls == 1  # the first step, not after max_error_steps steps of zeros


@pytest.mark.parametrize("value, shown", [
    ([1.0], r"returned 1 score\(s\) for 2 completions: list \[1.0\]"),
    ([1.0, 1.0, 1.0], r"returned 3 score\(s\) for 2 completions"),
    ("ab", r"returned str 'ab' for 2 completions, not a list of scores"),
    (3.0, r"returned float 3.0 for 2 completions, not a list of scores"),
    ({"a": 1, "b": 2}, r"returned dict \{'a': 1, 'b': 2\} for 2 completions"),
    (None, r"returned NoneType None for 2 completions"),
])
def test_wrong_length_or_type_stops_at_once_naming_the_reward(value, shown):
    with pytest.raises(RewardContractError, match=r"reward 'w' \(.*_Returns\) broke the Reward contract: score\(\) "
                                                   + shown):
        RewardRunner([spec("w", _Returns(value), on_error="zero")])(batch(2))


def test_wrong_result_in_the_row_by_row_fallback_is_a_contract_break_too():
    """A batched call raises (transient), then a single row returns two scores: still the contract, not the row."""

    class TwoForOne(Reward):
        name = "two"

        def score(self, b):
            if len(b) > 1:
                raise TimeoutError("judge busy")
            return [1.0, 1.0]

    with pytest.raises(RewardContractError, match=r"returned list \[1.0, 1.0\] for a batch of 1 completion .*"
                                                   r"TimeoutError: judge busy"):
        RewardRunner([spec("w", TwoForOne())])(batch(3))


def test_origin_is_named_in_contract_errors():
    with pytest.raises(RewardContractError, match=r"reward 'w' \(plugin vlmr1-plugin-x 1.2.3, .*_Returns\)"):
        RewardRunner([RewardSpec("w", _Returns([1.0]), 1.0, 5.0, "zero", origin="plugin vlmr1-plugin-x 1.2.3")])(
            batch(2))


class _Returns(Reward):
    name = "returns"

    def __init__(self, value):
        super().__init__()
        self.value = value

    def score(self, b):
        return self.value


def test_warning_logged_once_per_reward_and_kind(caplog):
    runner = RewardRunner([spec("boom", Boom())])
    with caplog.at_level(logging.WARNING, logger="core.runtime.reward_runner"):
        runner(batch(1))
        runner(batch(1))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'boom' raised ZeroDivisionError" in warnings[0].getMessage()
    assert "on_error: zero" in warnings[0].getMessage()


# ---- parallelism -------------------------------------------------------------------------
def test_thread_safe_rewards_run_in_parallel():
    runner = RewardRunner([spec(f"s{i}", Sleeper(0.3)) for i in range(3)], max_workers=4)
    t0 = time.monotonic()
    res = runner(batch(2))
    assert time.monotonic() - t0 < 0.75  # serial would take 0.9 s
    assert res.per_reward.tolist() == [[1.0] * 3] * 2


class Tracked(Reward):
    """Not thread-safe: records how many calls of this class overlap."""

    name = "tracked"
    thread_safe = False
    active = 0
    peak = 0
    lock = threading.Lock()

    def score(self, b):
        with Tracked.lock:
            Tracked.active += 1
            Tracked.peak = max(Tracked.peak, Tracked.active)
        time.sleep(0.1)
        with Tracked.lock:
            Tracked.active -= 1
        return [0.5] * len(b)


def test_non_thread_safe_rewards_never_overlap():
    Tracked.peak = 0
    runner = RewardRunner([spec(f"t{i}", Tracked()) for i in range(3)] + [spec("s", Sleeper(0.2))], max_workers=4)
    res = runner(batch(2))
    assert Tracked.peak == 1
    assert res.per_reward.tolist() == [[0.5, 0.5, 0.5, 1.0]] * 2


def test_max_workers_bounds_concurrency():
    runner = RewardRunner([spec(f"s{i}", Sleeper(0.2)) for i in range(4)], max_workers=1)
    t0 = time.monotonic()
    runner(batch(1))
    assert time.monotonic() - t0 >= 0.75


def test_bad_specs_are_rejected():
    with pytest.raises(ValueError, match="on_error"):
        RewardRunner([spec("a", Fixed([]), on_error="ignore")])
    with pytest.raises(ValueError, match="timeout_s"):
        RewardRunner([spec("a", Fixed([]), timeout=0)])
    with pytest.raises(ValueError, match="max_workers"):
        RewardRunner([], max_workers=0)


def test_close_calls_reward_close_once():
    class Closable(Fixed):
        closed = 0

        def close(self):
            Closable.closed += 1

    r = Closable([1.0])
    runner = RewardRunner([spec("a", r), spec("b", r)])
    runner.close()
    runner.close()
    assert Closable.closed == 1
    with pytest.raises(RuntimeError, match="closed"):
        runner(batch(1))


# ---- per-completion isolation and the error budget --------------------------------------------
class PoisonRow(Reward):
    """Raises on any batch holding a completion that contains "poison"; scores the rest 1."""

    name = "poison"

    def score(self, b):
        if any("poison" in it.completion for it in b):
            raise ValueError("cannot parse this completion")
        return [1.0] * len(b)


def poisoned(n: int, bad: set[int]) -> RewardBatch:
    return RewardBatch([RewardItem(completion="poison" if i in bad else f"c{i}", solution="s") for i in range(n)])


@pytest.mark.parametrize("policy, fill", [("zero", 0.0), ("skip", None)])
def test_one_raising_row_costs_only_its_own_score(policy, fill):
    res = RewardRunner([spec("p", PoisonRow(), on_error=policy)])(poisoned(4, {2}))
    assert as_list(res.per_reward[:, 0]) == [1.0, 1.0, fill, 1.0]  # the old code scored every row by the policy
    assert res.metrics["rewards/p_errors"] == 1


def test_row_fallback_with_raise_policy_names_the_row():
    with pytest.raises(RewardError, match="1 of 3 completion.*index 0"):
        RewardRunner([spec("p", PoisonRow(), on_error="raise")])(poisoned(3, {0}))


def test_error_budget_stops_the_run_after_n_bad_steps_in_a_row():
    s = RewardSpec("p", PoisonRow(), 1.0, 5.0, "zero", max_error_frac=0.5, max_error_steps=3)
    runner = RewardRunner([s])
    runner(poisoned(4, {0, 1, 2}))
    runner(poisoned(4, {0, 1, 2}))
    runner(poisoned(4, {0}))  # under half: the streak restarts
    runner(poisoned(4, {0, 1, 2}))
    runner(poisoned(4, {0, 1}))  # exactly half counts (a reward failing on half the rows is broken)
    with pytest.raises(RewardError, match=r"'p' failed on at least 50% .* last 3 steps \(3/4 in the last.*"
                                          r"cannot parse this completion"):
        runner(poisoned(4, {0, 1, 2}))


def test_error_budget_is_off_by_default_and_validated():
    runner = RewardRunner([spec("boom", Boom())])
    for _ in range(20):
        runner(batch(2))
    with pytest.raises(ValueError, match="max_error_frac"):
        RewardRunner([RewardSpec("x", Boom(), 1.0, 1.0, "zero", max_error_frac=1.5)])


# ---- routed rewards (the accuracy router) keep the runner's limits ---------------------------
class _Exact(Reward):
    name = "r_exact"
    methods = ("exact",)

    def score(self, b):
        return [1.0 if it.completion == it.solution else 0.0 for it in b]


class _Stuck(Reward):
    name = "r_stuck"
    methods = ("stuck",)
    release = threading.Event()

    def score(self, b):
        self.release.wait(60)
        return [1.0] * len(b)


class _Picky(Reward):
    name = "r_picky"
    methods = ("picky",)

    def score(self, b):
        if any(it.completion == "poison" for it in b):
            raise ValueError("poisoned row")
        return [0.5] * len(b)


def _router():
    from core.interfaces import RewardContext
    from core.plugins import PluginHost
    from core.testing import ComponentsPlugin

    host = PluginHost("none")
    host.register(ComponentsPlugin(_Exact, _Stuck, _Picky), "test-routed")
    router = host.registry.create("rewards", "accuracy", {})
    router.setup(RewardContext(registry=host.registry, config=None))
    return router


def test_routed_rewards_get_the_time_limit_and_row_isolation_of_the_runner():
    """A routed reward that hangs times out alone; a raising row or an unknown method fails only its own row."""
    items = [RewardItem("a", "a", reward_method="exact"), RewardItem("x", "a", reward_method="stuck"),
             RewardItem("ok", "a", reward_method="picky"), RewardItem("poison", "a", reward_method="picky"),
             RewardItem("b", "a", reward_method="exact"), RewardItem("?", "a", reward_method="nobody")]
    runner = RewardRunner([spec("accuracy", _router(), timeout=1.0)])
    try:
        t0 = time.monotonic()
        res = runner(RewardBatch(items))
        assert time.monotonic() - t0 < 30  # the hanging routed reward is abandoned at its limit, not waited for
        assert as_list(res.per_reward[:, 0]) == [1.0, 0.0, 0.5, 0.0, 0.0, 0.0]
        assert res.failed[:, 0].tolist() == [False, True, False, True, False, True]
        assert res.timed_out[:, 0].tolist() == [False, True, False, False, False, False]
        assert res.metrics["rewards/accuracy_errors"] == 3 and res.metrics["rewards/accuracy_timeouts"] == 1
        assert [t for t in threading.enumerate() if t.name == "vlmr1-reward-accuracy/r_stuck"]
    finally:
        _Stuck.release.set()
        runner.close()


class _Exits(Reward):
    name = "exits"

    def score(self, b):
        raise SystemExit(0)


def test_sys_exit_inside_score_stops_the_run_naming_the_reward():
    """``sys.exit(0)`` in a reward is never "scored 0 and carry on" (a run trained on zeros would exit 0)."""
    with pytest.raises(RewardError, match=r"reward 'x' \(.*_Exits\) called sys.exit\(0\) inside score\(\)"):
        RewardRunner([spec("x", _Exits(), on_error="zero")])(batch(2))


class _ExitsInSetup(Reward):
    name = "exits_in_setup"

    def setup(self, ctx):
        raise SystemExit(0)

    def score(self, b):
        return [1.0] * len(b)


def test_sys_exit_inside_setup_is_the_rewards_failure():
    """``sys.exit(0)`` in ``setup`` must not end the run "successfully": a RewardError naming the reward."""
    from core.runtime.reward_runner import setup_reward

    with pytest.raises(RewardContractError, match=r"reward 'x' \(plugin p 0.1, .*_ExitsInSetup\) called "
                                                  r"sys.exit\(0\) inside setup\(\)"):
        setup_reward(_ExitsInSetup(), "x", None, "plugin p 0.1")
