"""Reading YAML safely for configs: bounded, plain data only, with the line of every key.

- :func:`yaml_load`: PyYAML's safe loader with YAML 1.2 floats (``1e-5``), aliases refused
  while parsing (an alias bomb of a few hundred bytes would expand to gigabytes before any
  check), nesting capped, and values JSON cannot hold (dates, ``!!binary``, sets ...) refused
  naming their key (:func:`plain_data_problem`);
- :func:`key_lines`: the line of every dotted key, so errors name ``file:line``;
- :class:`RawConfig`: a mapping read from a file that remembers the file and those lines.

What the keys mean (the pydantic models) and how overrides apply is :mod:`core.config`.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float.

    PyYAML implements YAML 1.1, where a float needs a dot (``1e-5`` is a *string*); every
    learning rate would then reach an ``options`` dict as text. YAML 1.2's float rule fixes it.
    """


_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in list("-+0123456789."):
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, rx) for tag, rx in _Loader.yaml_implicit_resolvers.get(_first, []) if tag != "tag:yaml.org,2002:float"
    ]
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    # PyYAML keeps the last of two equal keys: a second `train:` section silently replaced the first.
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key; PyYAML reports it below
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {first}): merge the two into one",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.construct_mapping = _construct_mapping  # type: ignore[method-assign]

#: Deepest nesting of sections/lists a config may have (the schema needs 4; PyYAML recursed to a crash at ~1000).
MAX_YAML_DEPTH = 32


class YamlRefused(yaml.YAMLError):
    """YAML that vlmr1 refuses on purpose (aliases, deep nesting), with the line it is on."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark, self.context = problem, mark, None


def _compose_node(loader: Any, parent: Any, index: Any) -> Any:
    # Refused while composing, before anything is built: an alias is a pointer, and a few
    # hundred bytes of nested aliases (a "billion laughs") expand to gigabytes once the
    # config is copied or validated. Configs have no use for them that a plain copy lacks.
    # An undefined alias keeps PyYAML's own error (an override `x=*.jsonl` then stays the text it is).
    if loader.check_event(yaml.AliasEvent) and loader.peek_event().anchor in loader.anchors:
        event = loader.peek_event()
        raise YamlRefused(f"found the alias *{event.anchor}: YAML aliases (and `<<: *name` merge keys) are not "
                          "accepted in vlmr1 configs (nested aliases expand exponentially); write the value out",
                          event.start_mark)
    depth = loader.__dict__.get("_depth", 0)
    if depth >= MAX_YAML_DEPTH:
        raise YamlRefused(f"nested more than {MAX_YAML_DEPTH} levels deep", loader.peek_event().start_mark)
    loader._depth = depth + 1
    try:
        return yaml.SafeLoader.compose_node(loader, parent, index)
    finally:
        loader._depth = depth


_Loader.compose_node = _compose_node  # type: ignore[method-assign]

#: The Python types a config value may have after loading (what JSON can hold).
_PLAIN = (str, int, float, bool, type(None))


def _yaml_type(value: Any) -> str:
    """How YAML spelled a value of this Python type (for error messages)."""
    import datetime

    if isinstance(value, datetime.datetime):
        return "a timestamp"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, bytes):
        return "!!binary data"
    if isinstance(value, set):
        return "a !!set"
    if isinstance(value, tuple):
        return "an !!omap/!!pairs entry"
    return f"a {type(value).__name__}"


def plain_data_problem(value: Any, path: str = "") -> tuple[str, str] | None:
    """``(dotted key, problem)`` for the first value JSON cannot hold (a YAML date, ``!!binary``, set ...).

    Mapping keys must be strings (numbers, booleans and null become their text, as in JSON).
    ``None`` when the whole value is plain data.
    """
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, _PLAIN):
                    return where or "(top level)", (f"a key is {_yaml_type(k)} ({k!r}); keys must be plain "
                                                    "text: quote it")
                stack.append((item, f"{where}.{k}" if where else str(k)))
        elif isinstance(v, list):
            stack.extend((item, f"{where}.{i}" if where else str(i)) for i, item in enumerate(v))
        elif not isinstance(v, _PLAIN):
            return where or "(top level)", (f"the value is {_yaml_type(v)} ({str(v)[:60]!r}), which no config "
                                            "option takes: quote it to make it text")
    return None


def yaml_load(text: str) -> Any:
    """Parse YAML safely, with YAML 1.2 floats (``1e-5`` is a number).

    Aliases and nesting deeper than :data:`MAX_YAML_DEPTH` are refused (:class:`YamlRefused`);
    a value Python cannot build (an integer of thousands of digits) is a ``yaml.YAMLError`` too.
    """
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RecursionError, OverflowError) as exc:
        # PyYAML's constructors raise these for values they cannot build: int('9' * 5000), `!!bool maybe`.
        raise YamlRefused(f"a value that cannot be read ({type(exc).__name__}: {str(exc).split(';')[0][:160]})",
                          None) from None
    finally:
        loader.dispose()


def key_lines(text: str) -> dict[str, int]:
    """Map each dotted key path of a YAML mapping (``train.learning_rate``, ``rewards.0``) to its line."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return {}
    out: dict[str, int] = {}

    def walk(node: yaml.Node | None, path: list[str]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = [*path, str(k.value)]
                out[".".join(p)] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = [*path, str(i)]
                out[".".join(p)] = v.start_mark.line + 1
                walk(v, p)

    walk(root, [])
    return out


class RawConfig(dict):
    """A config mapping read from a file, remembering the file and the line of every key."""

    def __init__(self, data: dict[str, Any], source: str = "config", lines: dict[str, int] | None = None) -> None:
        super().__init__(data)
        self.source = source
        self.lines = lines or {}
