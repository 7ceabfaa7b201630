"""core.testing: the pytest fixtures and the conformance checks (each must catch the defect it names)."""

import math
import random

import pytest
from pydantic import BaseModel, ConfigDict

from core.interfaces import (
    Completion,
    Device,
    PromptInput,
    Reward,
    RewardContext,
    RewardItem,
    RolloutContext,
    RolloutEngine,
    Sample,
    SamplingParams,
    TaskFormat,
)
from core.plugins import PluginError, PluginHost
from core.plugins.builtin.accuracy import AccuracyRouter
from core.plugins.builtin.cpu import CPUDevice
from core.plugins.builtin.rollout import TransformersRollout
from core.testing import ComponentsPlugin, make_image, make_sample, reward_batch
from core.testing.conformance import (
    ConformanceError,
    check_device,
    check_plugin,
    check_reward,
    check_rollout,
    check_task,
)


# ---- components used by the checks ----------------------------------------------------------
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExactReward(Reward):
    """1.0 if the completion equals the solution; None when there is no solution."""

    name = "exact"

    class Options(Strict):
        strip: bool = True

    def score(self, batch):
        out = []
        for item in batch:
            if item.solution is None:
                out.append(None)
            else:
                text = item.completion.strip() if self.options.strip else item.completion
                out.append(float(text == item.solution))
        return out


CASES = [(RewardItem(" red ", "red"), 1.0), (RewardItem("blue", "red"), 0.0), (RewardItem("x", None), None)]
ITEMS = [item for item, _ in CASES]  # the same cases without expected scores


def reward_variant(name, score=None, options=None, **attrs):
    body = {"name": "variant", "Options": options or ExactReward.Options, **attrs}
    if score is not None:
        body["score"] = score
    return type(name, (ExactReward,), body)


class ColourTask(TaskFormat):
    name = "colours"

    class Options(Strict):
        n: int = 3
        grey: bool = False

    def load(self, split="train"):
        mode = "L" if self.options.grey else "RGB"
        return [make_sample(id=f"{split}-{i}", images=[make_image((8, 8), "red", mode)], solution="red")
                for i in range(self.options.n)]


def task_variant(name, load):
    return type(name, (ColourTask,), {"load": load})


class EchoEngine(RolloutEngine):
    name = "echo"

    def generate(self, prompts, sampling):
        return [[Completion(ids=[1, 2], text=p.text, truncated=False, logprobs=[-0.1, -0.2])
                 for _ in range(sampling.n)] for p in prompts]


# ---- fixtures ----------------------------------------------------------------------------------
def test_plugin_host_fixture_has_only_builtins(plugin_host):
    assert isinstance(plugin_host, PluginHost)
    assert [i.distribution for i in plugin_host.infos] == ["vlmr1"]
    assert {e.qualified for e in plugin_host.registry.entries()} == {
        "vlmr1:accuracy", "vlmr1:cpu", "vlmr1:transformers", "vlmr1:mixture"}


def test_register_plugin_fixture(register_plugin, plugin_host):
    host = register_plugin(ExactReward, ColourTask, EchoEngine, distribution="vlmr1-plugin-mine", version="2.0")
    assert host is plugin_host
    assert host.registry.get("rewards", "mine:exact") is ExactReward
    assert host.registry.get("rollouts", "echo") is EchoEngine
    assert host.infos[-1].version == "2.0"
    assert host.infos[-1].components == {"rewards": ["exact"], "tasks": ["colours"], "rollouts": ["echo"]}
    with pytest.raises(PluginError, match="registers reward 'exact' twice"):
        register_plugin(ComponentsPlugin(ExactReward, ExactReward), distribution="vlmr1-plugin-twice")


def test_make_distribution_fixture_is_found_by_the_host(make_distribution):
    make_distribution("vlmr1-plugin-madeup", "0.4.0", modules={"vlmr1_madeup/hooks.py": (
        "from core.hookspecs import hookimpl\nfrom core.testing import ComponentsPlugin\n"
        "from core.plugins.builtin.cpu import CPUDevice\n\n\nclass Dev(CPUDevice):\n    name = 'madeup'\n\n\n"
        "@hookimpl\ndef vlmr1_register_devices(register):\n    register(Dev)\n")},
        entry_points={"madeup": "vlmr1_madeup.hooks"})
    host = PluginHost("madeup")
    info = next(i for i in host.infos if i.distribution == "vlmr1-plugin-madeup")
    assert (info.status, info.version, info.components) == ("loaded", "0.4.0", {"devices": ["madeup"]})


def test_components_plugin_rejects_non_components():
    with pytest.raises(TypeError, match="not a component class"):
        ComponentsPlugin(int)


def test_helpers():
    batch = reward_batch(["a", "b"], solution="a", prompt="q")
    assert [(i.completion, i.solution, i.prompt) for i in batch] == [("a", "a", "q"), ("b", "a", "q")]
    s = make_sample("Q?", images=[make_image()], system="be brief")
    assert [m["role"] for m in s.messages] == ["system", "user"] and s.question == "Q?"
    assert s.messages[1]["content"][0] == {"type": "image"}


# ---- check_reward ------------------------------------------------------------------------------
def test_check_reward_accepts_good_rewards(register_plugin):
    assert check_reward(ExactReward, CASES) == [1.0, 0.0, None]
    assert check_reward(ExactReward, [c[0] for c in CASES[:2]], {"strip": False}) == [0.0, 0.0]
    # The router builds the rewards serving each accu_reward_method from the registry in its context.
    host = register_plugin(reward_variant("Default", methods=("default",)))
    routed = [RewardItem("red", "red"), RewardItem("x", None), RewardItem("blue", "red", reward_method="default")]
    assert check_reward(AccuracyRouter, routed, context=RewardContext(registry=host.registry)) == [1.0, None, 0.0]


def nondeterministic(self, batch):
    return [random.random() for _ in batch]


def by_position(self, batch):
    return [float(i) for i in range(len(batch))]


def chokes_on_empty(self, batch):
    return [float(item.completion.split()[0] == item.solution) for item in batch]


class Loose(BaseModel):
    strip: bool = True


@pytest.mark.parametrize(
    ("cls", "cases", "message"),
    [
        (reward_variant("Wrong", score=lambda self, b: [1.0, 0.0, None]), [(RewardItem(" red ", "red"), 0.0)],
         "score() on an empty batch must return a list of 0 scores"),
        (ExactReward, [(RewardItem(" red ", "red"), 0.0)], "case 0 (' red ', solution 'red') scored 1.0, expected 0.0"),
        (ExactReward, [(RewardItem("x", None), 0.0)], "scored None, expected 0.0"),
        (reward_variant("Nan", score=lambda self, b: [math.nan] * len(b)), CASES, "returned non-scores"),
        (reward_variant("Bool", score=lambda self, b: [True] * len(b)), CASES, "returned non-scores"),
        (reward_variant("Random", score=nondeterministic), ITEMS, "not deterministic"),
        (reward_variant("Position", score=by_position), ITEMS, "depend on the order of the batch"),
        (reward_variant("Empty", score=chokes_on_empty), CASES[:1], "raised on empty/malformed completions"),
        (reward_variant("Loose", options=Loose), CASES, "ConfigDict(extra=\"forbid\")"),
        (reward_variant("Methods", methods="iou"), CASES, "`methods` must be a tuple of strings"),
    ],
    ids=["length", "expected", "none", "nan", "bool", "random", "order", "empty", "extra-options", "methods"],
)
def test_check_reward_catches(cls, cases, message):
    with pytest.raises(ConformanceError, match=None) as exc:
        check_reward(cls, cases)
    assert message in str(exc.value)


def test_check_reward_names_and_abstract():
    with pytest.raises(ConformanceError, match="needs a class attribute `name`"):
        check_reward(type("NoName", (ExactReward,), {"name": ""}), CASES)
    with pytest.raises(ConformanceError, match="abstract method"):
        check_reward(type("Abstract", (Reward,), {"name": "abstract"}), CASES)
    with pytest.raises(ConformanceError, match="Options rejects the given options"):
        check_reward(ExactReward, CASES, {"strip": "maybe"})


# ---- check_task ----------------------------------------------------------------------------------
def test_check_task_accepts_good_tasks():
    samples = check_task(ColourTask, {"n": 40}, max_samples=5)
    assert [s.id for s in samples] == [f"train-{i}" for i in range(5)]
    check_task(ColourTask, {"grey": True})  # non-RGB files are converted by Sample.load_images


def two_images_one_placeholder(self, split="train"):
    s = make_sample(images=[make_image()], id="a")
    s.images.append(make_image())
    return [s]


def answer_last(self, split="train"):
    s = make_sample(images=[make_image()], id="a")
    s.messages.append({"role": "assistant", "content": "red"})
    return [s]


@pytest.mark.parametrize(
    ("load", "message"),
    [
        (lambda self, split="train": [make_sample(id="same"), make_sample(id="same")], "ids are not unique"),
        (lambda self, split="train": [make_sample(id="")], "non-empty string"),
        (lambda self, split="train": [], "returned no samples"),
        (two_images_one_placeholder, "1 image placeholder(s) in messages but 2 image(s)"),
        (answer_last, "the last message must be the user's"),
        (lambda self, split="train": [Sample("a", [], [{"role": "user", "content": [{"type": "video"}]}])],
         "has a part {'type': 'video'}"),
        (lambda self, split="train": [Sample("a", [], [{"role": "human", "content": "hi"}])],
         "role system|user|assistant"),
        (lambda self, split="train": [make_sample(id="a", images=["/no/such.png"])], "load_images() raised DataError"),
        (lambda self, split="train": [make_sample(id=str(random.random()))], "not deterministic"),
    ],
    ids=["dup-ids", "empty-id", "empty", "placeholders", "answer-last", "bad-part", "bad-role", "bad-image", "random"],
)
def test_check_task_catches(load, message):
    with pytest.raises(ConformanceError) as exc:
        check_task(task_variant("Bad", load))
    assert message in str(exc.value)


# ---- check_device ----------------------------------------------------------------------------------
def test_check_device_on_cpu():
    dev = check_device(CPUDevice)
    assert dev.torch_device().type == "cpu"


class GoneDevice(Device):
    name = "gone"

    def available(self):
        return False, ""


class NoSeedDevice(CPUDevice):
    name = "noseed"

    def seed(self, seed):
        pass


class Fp16OnlyDevice(CPUDevice):
    name = "fp16"

    def supported_dtypes(self):
        return ["float16", "half-ish"]


@pytest.mark.parametrize(
    ("cls", "message"),
    [(GoneDevice, "without a reason"), (NoSeedDevice, "seed() does not make"), (Fp16OnlyDevice, "including 'float32'")],
)
def test_check_device_catches(cls, message):
    with pytest.raises(ConformanceError, match=None) as exc:
        check_device(cls)
    assert message in str(exc.value)


# ---- check_rollout ------------------------------------------------------------------------------------
def test_check_rollout():
    assert check_rollout(TransformersRollout, {"prompt_batch_size": 2}) is None  # class-level checks only
    ctx = RolloutContext(model=None, processor=None, family=None, device=None)
    prompts = [PromptInput(messages=[], text="p0"), PromptInput(messages=[], text="p1")]
    out = check_rollout(EchoEngine, ctx=ctx, prompts=prompts, sampling=SamplingParams(n=3, max_new_tokens=2))
    assert [[c.text for c in g] for g in out] == [["p0"] * 3, ["p1"] * 3]

    class ShortEngine(EchoEngine):
        name = "short"

        def generate(self, prompts, sampling):
            return [[Completion(ids=[1, 2, 3], text="")] for _ in prompts]

    with pytest.raises(ConformanceError, match="1 completions, expected n=2"):
        check_rollout(ShortEngine, ctx=ctx, prompts=prompts)


# ---- check_plugin ---------------------------------------------------------------------------------------
def test_check_plugin_on_an_object_and_a_module(make_distribution):
    assert check_plugin(ComponentsPlugin(ExactReward), {"rewards": ["exact"]}) == {"rewards": ["exact"]}
    with pytest.raises(ConformanceError, match="registers no tasks named nope"):
        check_plugin(ComponentsPlugin(ExactReward), {"tasks": ["nope"]})
    with pytest.raises(ConformanceError, match="registers no components"):
        check_plugin(ComponentsPlugin())
    # A module by name is also imported in a fresh interpreter to check it stays light.
    make_distribution("vlmr1-plugin-heavy", modules={"vlmr1_heavy/hooks.py": (
        "from core.hookspecs import hookimpl\nfrom core.plugins.builtin.cpu import CPUDevice\n\n\n"
        "@hookimpl\ndef vlmr1_register_devices(register):\n    import colorsys  # stands in for torch_npu\n\n"
        "    register(type('Heavy', (CPUDevice,), {'name': 'heavy'}))\n")})
    assert check_plugin("vlmr1_heavy.hooks") == {"devices": ["heavy"]}
    with pytest.raises(ConformanceError, match="loading plugin module vlmr1_heavy.hooks imports colorsys"):
        check_plugin("vlmr1_heavy.hooks", forbid_imports=["colorsys"])
