"""The plugin host, in-process, against real distributions found by importlib.metadata.

``tests/fixtures/site`` holds four plugin distributions (module + ``.dist-info``) and is put
on ``sys.path`` per test; the ``make_distribution`` fixture writes more into a temp folder.
Nothing is pip-installed, so the shared environment is untouched (see tests/fixtures/README.md).
"""

from pathlib import Path

import pytest

from core import __version__
from core.config import ConfigError, build_config
from core.plugins import PluginError, PluginHost, parse_selection
from core.plugins.plan import make_plan
from core.plugins.registry import ComponentError

SITE = Path(__file__).parent / "fixtures" / "site"
FIXTURE_DISTS = ["vlmr1-plugin-broken", "vlmr1-plugin-dup", "vlmr1-plugin-fixtures", "vlmr1-plugin-incompatible"]

REWARD_SRC = '''
from core.hookspecs import hookimpl
from core.interfaces import Reward


class R(Reward):
    name = "{name}"

    def score(self, batch):
        return [1.0] * len(batch)


@hookimpl
def vlmr1_register_rewards(register):
    register(R)
'''


@pytest.fixture
def site(monkeypatch):
    monkeypatch.syspath_prepend(str(SITE))


def infos(host, only=FIXTURE_DISTS):
    return {i.distribution: i for i in host.infos if i.distribution in only}


def test_parse_selection_forms():
    assert parse_selection(None) is None
    assert parse_selection("all") is None
    assert parse_selection("none") == set() == parse_selection("") == parse_selection([])
    assert parse_selection("vlmr1-plugin-qwen-vl, math") == {"qwen-vl", "math"}
    assert parse_selection(["Vlmr1_Plugin_Qwen_VL"]) == {"qwen-vl"}
    assert parse_selection("vlmr1,math") == {"math"}  # core itself always loads


def test_default_loads_every_plugin_and_reports_failures(site):
    host = PluginHost()
    got = infos(host)
    assert sorted(got) == FIXTURE_DISTS
    assert got["vlmr1-plugin-fixtures"].status == "loaded"
    assert got["vlmr1-plugin-fixtures"].components == {"rewards": ["dup"], "tasks": ["fixture_colours"]}
    assert got["vlmr1-plugin-fixtures"].hooks == ["vlmr1_register_rewards", "vlmr1_register_tasks"]
    assert got["vlmr1-plugin-dup"].version == "0.2.0"
    broken = got["vlmr1-plugin-broken"]
    assert (broken.status, broken.version, broken.entry_point) == ("failed", "0.3.1", "vlmr1_broken.hooks")
    # The original traceback: the file and line that raised and the exception itself.
    assert "Traceback (most recent call last)" in broken.error
    assert "vlmr1_broken/hooks.py" in broken.error
    last_line = broken.error.strip().splitlines()[-1]
    assert last_line == "ImportError: vlmr1_broken needs libfixture >= 2 (deliberately broken test fixture)"
    assert {i.distribution for i in host.failures()} >= {"vlmr1-plugin-broken", "vlmr1-plugin-incompatible"}
    # Built-ins come first, always.
    assert host.infos[0].distribution == "vlmr1" and host.infos[0].status == "loaded"


def test_loading_order_is_sorted_and_repeatable(site, make_distribution):
    # Written (and so listed on disk) in reverse order; loading must still be sorted by name.
    for name in ("vlmr1-plugin-zz-order", "vlmr1-plugin-aa-order"):
        pkg = name.replace("-", "_")
        make_distribution(name, modules={f"{pkg}/hooks.py": REWARD_SRC.format(name="order_probe")},
                          entry_points={"x": f"{pkg}.hooks"})
    first, second = PluginHost(), PluginHost()
    names = [i.distribution for i in first.infos]
    assert names[0] == "vlmr1"
    assert names[1:] == sorted(names[1:], key=str.lower)
    assert names == [i.distribution for i in second.infos]
    order = [e.qualified for e in first.registry.entries()]
    assert order == [e.qualified for e in second.registry.entries()]
    assert order.index("vlmr1-plugin-aa-order:order_probe") < order.index("vlmr1-plugin-zz-order:order_probe")


@pytest.mark.parametrize("selection", ["fixtures", "vlmr1-plugin-fixtures", "VLMR1_PLUGIN_FIXTURES", ["fixtures"]])
def test_plugins_selection_with_or_without_prefix(site, selection):
    host = PluginHost(selection)
    got = infos(host)
    assert got["vlmr1-plugin-fixtures"].status == "loaded"
    for other in ("vlmr1-plugin-dup", "vlmr1-plugin-broken", "vlmr1-plugin-incompatible"):
        assert got[other].status == "not selected" and got[other].components == {}
    others = {i.status for i in host.infos if i.distribution not in ("vlmr1", "vlmr1-plugin-fixtures")}
    assert others == {"not selected"}
    assert host.failures() == []
    # Only one provider of `dup` is loaded, so the bare name resolves.
    assert host.registry.resolve("rewards", "dup").provider == "vlmr1-plugin-fixtures"


def test_plugins_none_loads_only_builtins(site):
    host = PluginHost("none")
    assert [i.distribution for i in host.infos if i.status == "loaded"] == ["vlmr1"]
    assert {e.provider for e in host.registry.entries()} == {"vlmr1"}
    assert {e.name for e in host.registry.entries("devices")} == {"cpu"}


def test_selecting_a_plugin_that_is_not_installed_is_an_error(site):
    with pytest.raises(PluginError) as exc:
        PluginHost("fixtures,fixturez-not-here")
    msg = str(exc.value)
    assert "fixturez-not-here, which is not installed" in msg
    assert "vlmr1-plugin-fixtures" in msg  # lists what is installed


def test_ambiguous_bare_name_lists_every_provider(site):
    host = PluginHost("fixtures,dup")
    with pytest.raises(ComponentError) as exc:
        host.registry.resolve("rewards", "dup")
    msg = str(exc.value)
    assert "'dup' is ambiguous" in msg
    assert "'vlmr1-plugin-dup:dup' or 'vlmr1-plugin-fixtures:dup'" in msg
    # distribution:name, with or without the prefix, picks one; nothing was overwritten.
    assert host.registry.get("rewards", "vlmr1-plugin-dup:dup").__name__ == "OtherDup"
    assert host.registry.get("rewards", "fixtures:dup").__name__ == "FixtureDup"
    assert host.registry.names("rewards") == ["accuracy", "vlmr1-plugin-dup:dup", "vlmr1-plugin-fixtures:dup"]
    assert host.registry.providers("rewards", "dup") == ["vlmr1-plugin-dup", "vlmr1-plugin-fixtures"]


def test_broken_plugin_breaks_only_runs_that_need_it(site):
    host = PluginHost("fixtures,broken")
    assert infos(host)["vlmr1-plugin-broken"].status == "failed"
    assert host.registry.get("tasks", "fixture_colours")  # the healthy plugin still works
    with pytest.raises(ComponentError) as exc:
        host.registry.resolve("rewards", "libfixture_reward")
    # A lookup failure points at the failed plugin, which may be the one that provides it.
    assert "plugin vlmr1-plugin-broken 0.3.1 failed (ImportError: vlmr1_broken needs libfixture" in str(exc.value)


def test_strict_mode_makes_a_failure_fatal(site):
    with pytest.raises(PluginError, match=r"vlmr1-plugin-broken 0\.3\.1 failed \(strict mode\)"):
        PluginHost("broken", strict=True)
    with pytest.raises(PluginError, match="requires vlmr1>=9"):
        PluginHost("incompatible", strict=True)
    PluginHost("fixtures", strict=True)  # healthy selection: fine


def test_incompatible_vlmr1_requirement_is_refused_without_importing(site):
    host = PluginHost("incompatible")
    info = infos(host)["vlmr1-plugin-incompatible"]
    assert info.status == "incompatible" and info.version == "9.0.0"
    assert f"requires vlmr1>=9, but vlmr1 {__version__} is installed" in info.error
    assert "was imported" not in info.error  # the module (which raises on import) never ran


def test_requirement_with_an_extra_marker_is_ignored(make_distribution):
    # `vlmr1>=9; extra == "dev"` does not apply to a plain install.
    make_distribution("vlmr1-plugin-extra-req", modules={"vlmr1_extra_req/hooks.py": REWARD_SRC.format(name="xr")},
                      entry_points={"x": "vlmr1_extra_req.hooks"},
                      requires=['vlmr1>=0.2,<0.3', 'vlmr1>=9; extra == "dev"'])
    host = PluginHost("extra-req")
    assert host.registry.get("rewards", "xr")


@pytest.mark.parametrize(
    ("source", "error"),
    [
        # A hook that raises after registering one component: all of it is rolled back.
        (REWARD_SRC + "\n@hookimpl\ndef vlmr1_register_tasks(register):\n    raise RuntimeError('no data dir')\n",
         "RuntimeError: no data dir"),
        # A misspelt hook name would be silently ignored by pluggy.
        (REWARD_SRC.replace("vlmr1_register_rewards", "vlmr1_register_reward"),
         "unknown hook vlmr1_register_reward; did you mean vlmr1_register_rewards?"),
        (REWARD_SRC.replace("@hookimpl\n", ""), "vlmr1_register_rewards is not decorated with @hookimpl"),
        # pluggy validates argument names against the spec.
        (REWARD_SRC.replace("(register)", "(registry)"), "PluginValidationError"),
        (REWARD_SRC.replace("register(R)", "register(object)"), "expected a subclass of Reward"),
        (REWARD_SRC.replace("    def score(self, batch):\n        return [1.0] * len(batch)\n", "    pass\n"),
         "does not implement the abstract method(s) score"),
        (REWARD_SRC.replace('name = "{name}"', 'name = "a:b"'), "needs a class attribute `name`"),
        (REWARD_SRC.replace("register(R)", "register(R)\n    register(R)"), "registers reward 'probe' twice"),
    ],
    ids=["hook-raises", "typo", "no-hookimpl", "bad-signature", "not-a-component", "abstract", "bad-name", "twice"],
)
def test_plugin_defects_are_reported_as_failed(make_distribution, source, error):
    make_distribution("vlmr1-plugin-defect", "1.2.3", modules={"vlmr1_defect/hooks.py": source.format(name="probe")},
                      entry_points={"defect": "vlmr1_defect.hooks"})
    host = PluginHost("defect")
    info = next(i for i in host.infos if i.distribution == "vlmr1-plugin-defect")
    assert (info.status, info.version) == ("failed", "1.2.3")
    assert error in info.error
    assert "probe" not in {e.name for e in host.registry.entries()}


def test_register_in_process_objects(plugin_host):
    from core.testing import ComponentsPlugin

    class Probe:
        pass

    info = plugin_host.register(Probe(), "vlmr1-plugin-nothing")
    assert info.status == "loaded" and info.components == {} and info.hooks == []
    import types

    mod = types.ModuleType("inline_hooks")
    exec(REWARD_SRC.format(name="inline"), mod.__dict__)
    assert plugin_host.register(mod, "vlmr1-plugin-inline").components == {"rewards": ["inline"]}
    # The same object twice is a failure, not a crash.
    assert plugin_host.register(mod, "vlmr1-plugin-inline").status == "failed"
    # Another distribution may provide the same name: both are kept, the bare name is ambiguous.
    assert plugin_host.register(ComponentsPlugin(mod.R), "vlmr1-plugin-other").status == "loaded"
    assert plugin_host.registry.providers("rewards", "inline") == ["vlmr1-plugin-inline", "vlmr1-plugin-other"]
    with pytest.raises(ComponentError, match="ambiguous"):
        plugin_host.registry.resolve("rewards", "inline")


def test_make_plan_reports_an_ambiguous_reward_in_config_terms(site):
    host = PluginHost("fixtures,dup")
    cfg = build_config({"model": {"path": "/nowhere"}, "task": {"name": "fixture_colours"},
                        "rewards": [{"name": "dup"}], "grpo": {"num_generations": 2},
                        "train": {"per_device_batch_size": 2}})
    with pytest.raises(ConfigError, match=r"rewards\.0\.name: reward 'dup' is ambiguous"):
        make_plan(cfg, host.registry)
    cfg.rewards[0].name = "dup:dup"
    assert make_plan(cfg, host.registry).rewards[0].provider == "vlmr1-plugin-dup"


def test_options_without_extra_forbid_are_refused_at_load_time():
    """A misspelt option must be an error: the registry refuses an Options model that ignores unknown keys."""
    from pydantic import BaseModel, ConfigDict

    from core.interfaces import Reward
    from core.plugins.registry import Registry

    class LooseOptions(BaseModel):
        scale: float = 1.0

    class Loose(Reward):
        name = "loose"
        Options = LooseOptions

        def score(self, batch):
            return [1.0] * len(batch)

    with pytest.raises(TypeError, match=r"Loose.Options must set model_config = ConfigDict\(extra=\"forbid\"\)"):
        Registry().add("rewards", Loose, "dist")

    class Strict(Loose):
        name = "strict"

        class Options(LooseOptions):
            model_config = ConfigDict(extra="forbid")

    Registry().add("rewards", Strict, "dist")


# ---- rollout engines: their own hook (0.2), the devices hook deprecated for them ------------------
ENGINE_SRC = '''
from core.interfaces import RolloutEngine, hookimpl


class Engine(RolloutEngine):
    name = "{name}"

    def generate(self, prompts, sampling):
        return [[] for _ in prompts]


@hookimpl
def {hook}(register):
    register(Engine)
'''
MAJOR, MINOR = (int(v) for v in __version__.split(".")[:2])
#: The pin a plugin built for this core declares (make_distribution's default may lag behind it).
CURRENT_PIN = [f"vlmr1>={MAJOR}.{MINOR},<{MAJOR}.{MINOR + 1}"]


def test_rollouts_hook_registers_an_engine_without_warnings(make_distribution, recwarn):
    make_distribution("vlmr1-plugin-new-engine", modules={"vlmr1_new_engine/hooks.py": ENGINE_SRC.format(
        name="new_engine", hook="vlmr1_register_rollouts")}, entry_points={"x": "vlmr1_new_engine.hooks"},
        requires=CURRENT_PIN)
    host = PluginHost("new-engine")
    info = infos(host, ["vlmr1-plugin-new-engine"])["vlmr1-plugin-new-engine"]
    assert (info.status, info.hooks, info.components) == ("loaded", ["vlmr1_register_rollouts"],
                                                          {"rollouts": ["new_engine"]})
    assert info.warnings == [] and not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    assert host.registry.get("rollouts", "new_engine").__name__ == "Engine"
    # Core's own transformers engine comes through the same hook.
    builtin = host.infos[0]
    assert "vlmr1_register_rollouts" in builtin.hooks and builtin.warnings == []
    assert host.registry.resolve("rollouts", "transformers").provider == "vlmr1"


def test_rollouts_hook_refuses_a_device(make_distribution):
    src = ENGINE_SRC.replace("RolloutEngine", "Device")
    make_distribution("vlmr1-plugin-wrong-hook", modules={"vlmr1_wrong_hook/hooks.py": src.format(
        name="dev", hook="vlmr1_register_rollouts")}, entry_points={"x": "vlmr1_wrong_hook.hooks"},
        requires=CURRENT_PIN)
    info = infos(PluginHost("wrong-hook"), ["vlmr1-plugin-wrong-hook"])["vlmr1-plugin-wrong-hook"]
    assert info.status == "failed" and "expected a subclass of RolloutEngine" in info.error


def test_engine_through_the_devices_hook_still_loads_with_a_deprecation_warning(make_distribution, capsys):
    make_distribution("vlmr1-plugin-old-engine", modules={"vlmr1_old_engine/hooks.py": ENGINE_SRC.format(
        name="old_engine", hook="vlmr1_register_devices")}, entry_points={"x": "vlmr1_old_engine.hooks"},
        requires=CURRENT_PIN)
    with pytest.warns(DeprecationWarning, match=r"plugin vlmr1-plugin-old-engine registers rollout engine\(s\) "
                      r"old_engine through vlmr1_register_devices.*register them with vlmr1_register_rollouts"):
        host = PluginHost("old-engine")
    info = infos(host, ["vlmr1-plugin-old-engine"])["vlmr1-plugin-old-engine"]
    assert (info.status, info.components) == ("loaded", {"rollouts": ["old_engine"]})
    assert host.registry.get("rollouts", "old_engine").__name__ == "Engine"  # it still works
    # The plugin list (JSON and table) and the start of every run show it too.
    listed = next(p for p in host.as_json()["plugins"] if p["distribution"] == "vlmr1-plugin-old-engine")
    assert len(listed["warnings"]) == 1 and "vlmr1_register_rollouts" in listed["warnings"][0]
    host.warn_failures()
    assert "warning: plugin vlmr1-plugin-old-engine registers rollout engine(s) old_engine" in capsys.readouterr().err
    from core.plugins.__main__ import _print_table

    _print_table(host, None)
    assert "vlmr1-plugin-old-engine registers rollout engine(s) old_engine" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("pin", ["vlmr1>=0.1,<0.2", "vlmr1<0.2", "vlmr1==0.1.*"])
def test_plugin_built_for_0_1_is_refused_as_incompatible(make_distribution, pin):
    make_distribution("vlmr1-plugin-old-pin", "0.1.0", modules={"vlmr1_old_pin/hooks.py": (
        "raise RuntimeError('an incompatible plugin must not be imported')\n")},
        entry_points={"x": "vlmr1_old_pin.hooks"}, requires=[pin])
    info = infos(PluginHost("old-pin"), ["vlmr1-plugin-old-pin"])["vlmr1-plugin-old-pin"]
    assert info.status == "incompatible"
    assert f"but vlmr1 {__version__} is installed" in info.error


def test_first_party_plugins_pin_this_core_version():
    """Every first-party plugin (and the template) declares the vlmr1 range this core is in."""
    import tomllib

    root = Path(__file__).parents[1]
    tomls = [*root.glob("plugins/*/*/pyproject.toml"), root / "examples" / "plugin_template" / "pyproject.toml"]
    assert len(tomls) > 10
    for toml in tomls:
        project = tomllib.loads(toml.read_text())["project"]
        pins = [d for d in project["dependencies"] if d.replace(" ", "").startswith("vlmr1")]
        assert pins == CURRENT_PIN, (toml, pins)
        assert project["version"] == __version__, toml
