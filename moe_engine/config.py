"""One config system for every stage: typed dataclasses that map 1:1 to params.yaml sections.

    @dataclass
    class EvaluateConfig(Config):
        batch_size: int = 16
        router: RouterSettings = field(default_factory=RouterSettings)   # nested configs are typed too

        def check(self):
            self.require(self.batch_size > 0, "batch_size", "> 0")

    cfg = load_section(EvaluateConfig, "params.yaml", "evaluate", sets=["batch_size=32"])

- ``from_dict`` refuses unknown keys (listing the valid ones), checks every value against its type
  hint (ints are accepted as floats; nested configs, ``Optional``, ``list[T]``, ``dict[str, T]`` and
  ``Literal`` are understood) and runs each class's ``check()`` range rules. Every message names the
  dotted key, e.g. ``pretrain.router.top_k = 0: must be in [1, num_experts]``.
- Numbers are read the YAML 1.2 way: ``lr: 3e-3`` is a float (PyYAML alone, being YAML 1.1, reads a
  string there).
- ``--set KEY=VALUE`` uses one dotted grammar in every command, relative to the stage's section:
  ``--set steps=50``, ``--set router.aux_loss_coef=0``, ``--set shards.seq_len=128``. The value is
  parsed as YAML (``[a, b]`` is a list, ``1e-3`` a float).
All of it runs before any model, data or DeepSpeed work starts, and raises :class:`ConfigError`
(exit code 2 in ``moe-lab``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from moe_engine.errors import ConfigError

C = TypeVar("C", bound="Config")

# YAML 1.2 core-schema floats (1e-3, 3E5, .5, -2.0e+1), which YAML 1.1 (PyYAML) reads as strings
_FLOAT_12 = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_FLOAT_RESOLVER = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


def _loader():
    import yaml

    class Yaml12Loader(yaml.SafeLoader):
        """SafeLoader that also resolves exponent floats without a dot (``1e-3``), as YAML 1.2 does."""

    Yaml12Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RESOLVER, list("-+0123456789."))
    return Yaml12Loader


_LOADER = None


def yaml_load(text: str) -> Any:
    """Parse YAML with YAML 1.2 number rules (safe: plain data only)."""
    import yaml

    global _LOADER
    if _LOADER is None:
        _LOADER = _loader()
    return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a SafeLoader subclass


class RuleBroken(ConfigError):
    """A ``check()`` rule failed; ``from_dict`` prefixes the dotted path of the section."""

    def __init__(self, key: str, value: Any, rule: str):
        self.key, self.value, self.rule = key, value, rule
        super().__init__(f"{key} = {value!r}: must be {rule}")


class Config:
    """Mixin for config dataclasses: typed ``from_dict`` / ``override`` / ``to_dict`` and ``check()``."""

    section: ClassVar[str] = ""  # the params.yaml section this config usually lives in (messages)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Range and consistency rules; call ``self.require(ok, key, rule)`` for each."""

    def require(self, ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise RuleBroken(key, getattr(self, key, None), rule)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None, where: str | None = None) -> C:
        where = where if where is not None else (cls.section or cls.__name__)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"'{where}' must be a mapping of settings, got {data!r}")
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown key(s) in '{where}': {', '.join(map(str, unknown))} (valid: {', '.join(known)})")
        values = {k: coerce(_join(where, k), v, hints[k]) for k, v in data.items()}
        try:
            return cls(**values)
        except RuleBroken as exc:
            raise ConfigError(f"{_join(where, exc.key)} = {exc.value!r}: must be {exc.rule}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def override(self: C, assignments: dict[str, Any] | list[str], where: str | None = None) -> C:
        """A copy with dotted keys replaced: ``{"router.top_k": 1}`` or ``["router.top_k=1"]`` (``--set``)."""
        if isinstance(assignments, list):
            assignments = parse_sets(assignments)
        where = where if where is not None else (self.section or type(self).__name__)
        data = self.to_dict()
        for key, value in assignments.items():
            set_dotted(data, key, value, type(self), where)
        return type(self).from_dict(data, where)

    def replace(self: C, **changes: Any) -> C:
        """``dataclasses.replace`` with the same checks as ``from_dict``."""
        return self.override(changes)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def set_dotted(data: dict, key: str, value: Any, cls: type | None = None, where: str = "") -> None:
    """``data[a][b] = value`` for ``key = "a.b"``; unknown levels of a typed config are refused."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {key}: expected KEY=VALUE with a dotted KEY such as router.top_k")
    node, node_cls, path = data, cls, where
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if node_cls is not None and dataclasses.is_dataclass(node_cls):
            known = [f.name for f in dataclasses.fields(node_cls) if f.init]
            if part not in known:
                raise ConfigError(f"--set {key}: '{_join(path, part)}' is not a setting (valid in '{path or 'this section'}': "
                                  f"{', '.join(known)})")
            hint = typing.get_type_hints(node_cls)[part]
            node_cls = _config_class(hint)
        else:
            node_cls = None
        if last:
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{_join(path, part)}' holds {child!r}, not a section of settings")
            node = child
        path = _join(path, part)


def _config_class(hint: Any) -> type | None:
    """The Config dataclass inside a hint (``X`` or ``X | None``), else None."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                return arg
    return None


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type hint (and converted where lossless), else ConfigError."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return coerce(name, value, option)
            except ConfigError as exc:
                errors.append(exc)
        nested = [e for e in errors if not str(e).startswith(f"{name}: expected")]
        if nested:  # a nested config matched by kind but broke a rule: that message is the useful one
            raise nested[0]
    elif hint is type(None):
        if value is None:
            return None
    elif origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigError(f"{name} = {value!r}: must be one of {', '.join(map(repr, typing.get_args(hint)))}")
    elif origin in (list, tuple):
        args = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            return [coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    elif origin is dict or hint is dict:
        args = typing.get_args(hint) or (str, Any)
        if isinstance(value, dict):
            return {coerce(f"{name} key", k, args[0]): coerce(_join(name, str(k)), v, args[1]) for k, v in value.items()}
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if value is None or isinstance(value, dict):
            return hint.from_dict(value, name) if issubclass(hint, Config) else hint(**(value or {}))
        raise ConfigError(f"'{name}' must be a mapping of settings, got {value!r}")
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_12.match(value.strip()):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{name}: expected {_hint_name(hint)}, got {value!r}")


def _hint_name(hint: Any) -> str:
    if typing.get_origin(hint) is None and hasattr(hint, "__name__"):
        return {"dict": "a mapping", "list": "a list"}.get(hint.__name__, hint.__name__)
    return str(hint).replace("typing.", "").replace("NoneType", "None")


# ----------------------------------------------------------------------------- --set and params files
def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``["router.top_k=1", "lr=1e-3"]`` -> ``{"router.top_k": 1, "lr": 0.001}`` (values parsed as YAML 1.2)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set steps=50 or --set router.top_k=1")
        try:
            out[key.strip()] = yaml_load(value) if value.strip() else ""
        except Exception as exc:  # yaml.YAMLError
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return out


def read_params(path: str | Path) -> dict[str, Any]:
    """A whole params file as a dict (YAML 1.2 numbers); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist (pass --params PATH, or leave it out for the defaults)")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"params file {path} is not UTF-8 text") from None
    except Exception as exc:  # yaml.YAMLError: position and problem in one line
        raise ConfigError(f"params file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"params file {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def load_section(cls: type[C], params: str | Path | None, section: str, sets: list[str] | dict[str, Any] | None = None,
                 known_sections: list[str] | None = None) -> C:
    """The ``section`` of a params file as ``cls``, with ``--set`` items applied.

    ``section`` may be dotted (``data``, ``finetune.lora``). Without a params file the defaults are
    used. ``known_sections``: the top-level sections a params file may have (a typo such as
    ``pretrian:`` is refused instead of silently ignored)."""
    data: Any = {}
    if params is not None:
        whole = read_params(params)
        if known_sections is not None:
            unknown = sorted(set(whole) - set(known_sections))
            if unknown:
                raise ConfigError(f"params file {params}: unknown section(s) {', '.join(map(str, unknown))} "
                                  f"(valid: {', '.join(known_sections)})")
        data = whole
        for part in section.split("."):
            if not isinstance(data, dict) or part not in data:
                have = ", ".join(map(str, data)) if isinstance(data, dict) else "none"
                raise ConfigError(f"params file {params} has no section '{section}' (sections there: {have})")
            data = data[part]
        if data is None:
            data = {}
    config = cls.from_dict(data, section)
    if sets:
        config = config.override(sets if isinstance(sets, dict) else parse_sets(sets), section)
    return config


def optional_fields(cls: type, name: str, doc: str = "") -> type:
    """A Config dataclass with every field of dataclass ``cls`` made optional (default None = keep
    the value the model or architecture brings); e.g. router overrides over an adapter's defaults."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, hints[f.name] | None, dataclasses.field(default=None)) for f in dataclasses.fields(cls)]
    made = dataclasses.make_dataclass(name, fields, bases=(Config,))
    made.__doc__ = doc or f"Overrides of {cls.__name__}; None keeps the default."

    def set_values(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    made.set_values = set_values
    return made
