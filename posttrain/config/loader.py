"""The recipe loader: YAML → the schema's dataclasses, with `key=value` overrides; every mistake is
one UserError line naming the file, the key and what is allowed."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from posttrain.config.schema import ObjectiveConfig
from posttrain.errors import UserError
from posttrain.losses import OBJECTIVES

@dataclass
class _Where:
    """Where values came from, so every error can name the file and the override or flag."""

    file: str
    given: dict[str, str] = field(default_factory=dict)  # key -> how the user wrote it, e.g. "--limit 0"

    def fail(self, key: str, problem: str) -> typing.NoReturn:
        origin = self.file
        if key in self.given:
            origin += f" ({self.given[key]})"
        raise UserError(problem, key=key, file=origin)


def load_recipe(path: str | Path, schema: type, overrides: list[str] | None = None) -> Any:
    """Read a YAML recipe, merge `key=value` overrides, validate against `schema`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    raw = parse_yaml(read_utf8(path), str(path))
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the recipe must be a YAML mapping of keys to values")
    where = _Where(str(path))
    for item in overrides or []:
        _apply_override(raw, item, where)
    return _build(schema, raw, "", where)


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                        "save the file as UTF-8") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a recipe with `lr` twice is a mistake."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def parse_yaml(text: str, label: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{label}: malformed YAML{at}: {problem}") from None


def from_dict(schema: type, raw: dict, label: str, given: dict[str, str] | None = None) -> Any:
    """Validate an in-memory mapping (e.g. CLI flags merged over a recipe); `given` says how the
    user wrote a key (e.g. "--limit 0") for the error message."""
    return _build(schema, raw, "", _Where(label, given or {}))


def to_dict(obj: Any) -> Any:
    """A recipe object back to plain YAML-able data (objective params flattened next to name)."""
    if isinstance(obj, ObjectiveConfig):
        return {"name": obj.name, **to_dict(obj.params)}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def _apply_override(raw: dict, item: str, where: _Where) -> None:
    if "=" not in item:
        raise UserError(f"{where.file}: override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
    key, text = item.split("=", 1)
    key = key.strip()
    where.given[key] = f"override {key}={text}"
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where.fail(".".join(parts[: i + 1]), "is not a section, so it has no sub-keys")
        node = child
    node[parts[-1]] = value


def _build(schema: type, raw: Any, prefix: str, where: _Where) -> Any:
    if schema is ObjectiveConfig:
        return _objective(raw, prefix, where)
    if not isinstance(raw, dict):
        where.fail(prefix or "(top level)", f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(schema, include_extras=True)
    known = [f.name for f in dataclasses.fields(schema)]
    for key in raw:
        if key not in known:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            where.fail(full, f"is unknown{hint}; allowed here: {', '.join(known)}")
    values = {}
    for f in dataclasses.fields(schema):
        full = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in raw:
            values[f.name] = _coerce(raw[f.name], hints[f.name], full, where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            where.fail(full, f"is required ({_describe(hints[f.name])})")
    return schema(**values)


def _objective(raw: Any, key: str, where: _Where) -> ObjectiveConfig:
    """`objective:`: the name from the registry, the other keys that objective's Params."""
    if not isinstance(raw, dict):
        where.fail(key, f"must be a mapping with at least 'name' (one of: {', '.join(OBJECTIVES)})")
    name = raw.get("name")
    if name is None:
        where.fail(f"{key}.name", f"is required; allowed: {', '.join(OBJECTIVES)}")
    if name not in OBJECTIVES:
        where.fail(f"{key}.name", f"must be one of: {', '.join(OBJECTIVES)}; got {name!r}")
    rest = {k: v for k, v in raw.items() if k != "name"}
    params = _build(OBJECTIVES[name].Params, rest, key, where)
    for unused, why in OBJECTIVES[name].unused_keys(params).items():
        if unused in rest:
            where.fail(f"{key}.{unused}", f"is not used {why}; remove it")
    return ObjectiveConfig(name=name, params=params)


def _coerce(value: Any, hint: Any, key: str, where: _Where) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, where)
    if hint is Any:
        return value
    if origin is Annotated:
        value = _coerce(value, args[0], key, where)
        for bounds in hint.__metadata__:
            if not bounds.allows(value):
                where.fail(key, f"must be {_describe(hint)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, key, where)
    if origin is Literal:
        # the type must match too: YAML's 1 is not the literal True (1 == True in Python)
        if not any(value == a and type(value) is type(a) for a in args):
            where.fail(key, f"must be one of: {_choices(args)}; got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            where.fail(key, f"must be {_describe(hint)}, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                where.fail(key, f"must be {_describe(hint)}, got {value!r}")
            return tuple(_coerce(v, a, key, where) for v, a in zip(value, args))
        return [_coerce(v, args[0], key, where) for v in value]
    if hint in (bool, int, float, str):
        return _coerce_scalar(value, hint, key, where)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            where.fail(key, f"must be a mapping, got {value!r}")
        return value
    raise TypeError(f"schema type {hint!r} for {key} is not supported by the loader")


def _coerce_scalar(value: Any, hint: type, key: str, where: _Where) -> Any:
    """A bool, int, float or str key: the YAML value, or its text, as that type."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        where.fail(key, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        where.fail(key, f"must be an integer, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            where.fail(key, f"must be a number, got {value!r}")
        if not math.isfinite(number):  # nan/inf would train (or sample) silently at NaN
            where.fail(key, f"must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        where.fail(key, f"must be a string, got {value!r}")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is Annotated:
        return " ".join([_describe(args[0])] + [bounds.describe() for bounds in hint.__metadata__])
    if origin is Literal:
        return "one of: " + _choices(args)
    if origin is list:
        return f"a list, each item {_describe(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} items, each {_describe(args[0])}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _choices(args) -> str:
    """The allowed literals as a recipe spells them (YAML's true/false, not Python's True/False)."""
    return ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
