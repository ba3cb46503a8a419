"""Typed settings: a dataclass field declares its default, its limits and its meaning once.

`setting(default, "meaning", minimum=1)` is a dataclass field whose metadata holds JSON-schema
keywords. From those one declaration come the config schema's section for the dataclass
(`schema_of`), the check of a mapping of values (`build_settings`) and the docs. Rules that
tie several fields together (e.g. gamma_min < gamma_max) stay in the class's `__post_init__`:
they are the only checks written by hand, and the schema does not repeat them.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from klbench.errors import ConfigError

SCHEMA_KEYS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "multipleOf", "minItems",
               "maxItems", "items", "uniqueItems")


def setting(default: Any, description: str, **limits: Any) -> Any:
    """A dataclass field with a default, a one-line meaning and JSON-schema limits
    (minimum, exclusiveMinimum, ..., and `items` for the elements of a list)."""
    unknown = set(limits) - set(SCHEMA_KEYS)
    if unknown:
        raise TypeError(f"unknown schema keywords {sorted(unknown)}")
    metadata = {"description": description, **limits}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _type_schema(annotation: Any) -> dict[str, Any]:
    """JSON schema of a field's annotation: int, float, bool, str, Literal[...], list[T] or
    tuple[T, ...], and X | None."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (types.UnionType, typing.Union):
        options = [_type_schema(a) for a in args if a is not type(None)]
        (inner,) = options
        return {"anyOf": [inner, {"type": "null"}]}
    if origin in (list, tuple):
        return {"type": "array", "items": _type_schema(args[0])}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if annotation in simple:
        return {"type": simple[annotation]}
    raise TypeError(f"no schema for settings of type {annotation!r}")


def schema_of(cls: type, required: bool = False) -> dict[str, Any]:
    """The JSON schema of a settings dataclass: an object with exactly its fields. Defaults are
    left to the dataclass, so that a config states only what it changes (required=False)."""
    hints = typing.get_type_hints(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        schema = _type_schema(hints[f.name])
        metadata = dict(f.metadata)
        if "items" in metadata and "items" in schema:
            schema["items"] = {**schema["items"], **metadata.pop("items")}
        schema.update(metadata)
        properties[f.name] = schema
    out = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = [f.name for f in dataclasses.fields(cls)]
    return out


def defaults_of(cls: type) -> dict[str, Any]:
    """Field name -> default value (for the docs and the tests)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def describe_schema_error(error: Any, where: str = "") -> str:
    """One line naming the key, e.g. "config key 'train.steps': -1 is less than the minimum of 1"."""
    import re

    path = ".".join([where] * bool(where) + [str(p) for p in error.absolute_path]) or "(top level)"
    message = error.message
    if error.validator == "additionalProperties":
        names = re.findall(r"'([^']+)' (?:was|were) unexpected", message)
        allowed = sorted(error.schema.get("properties", {}))
        prefix = f"{path}." if path != "(top level)" else ""
        return f"unknown config key '{prefix}{names[0] if names else '?'}'; allowed here: {', '.join(allowed)}"
    if len(message) > 200:
        message = message[:200] + "..."
    return f"config key '{path}': {message}"


def check_against(schema: Mapping[str, Any], values: Any, where: str) -> None:
    """ConfigError naming the first offending key if `values` does not fit `schema`."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(values))
    if error is not None:
        raise ConfigError(describe_schema_error(error, where)) from None


def build_settings(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Settings dataclass `cls` from a mapping: checked against its schema (unknown keys, types,
    limits), defaults filled, lists made tuples where the field is a tuple, then the class's own
    cross-field rules. Every failure is one ConfigError naming the key."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    check_against(schema_of(cls), values, where)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing key '{f.name}'")
        if f.name in values and typing.get_origin(hints[f.name]) is tuple:
            values[f.name] = tuple(values[f.name])
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def _limits_text(schema: Mapping[str, Any]) -> str:
    """A schema's type and limits in words: 'int >= 1', 'number in (0, 1)', 'list of int >= 1'."""
    if "enum" in schema:
        return " / ".join(f"`{v}`" for v in schema["enum"])
    if "anyOf" in schema:
        return _limits_text(schema["anyOf"][0]) + " or null"
    names = {"integer": "int", "number": "number", "boolean": "bool", "string": "string"}
    if schema.get("type") == "array":
        text = "list of " + _limits_text(schema.get("items", {}))
        return text + (f", >= {schema['minItems']} items" if schema.get("minItems") else "")
    text = names.get(schema.get("type"), "value")
    low = [f"{'>' if key == 'exclusiveMinimum' else '>='} {schema[key]:g}" for key in ("minimum", "exclusiveMinimum")
           if key in schema]
    high = [f"{'<' if key == 'exclusiveMaximum' else '<='} {schema[key]:g}" for key in ("maximum", "exclusiveMaximum")
            if key in schema]
    parts = low + high + ([f"multiple of {schema['multipleOf']:g}"] if "multipleOf" in schema else [])
    return text + (" " + ", ".join(parts) if parts else "")


def settings_table(cls: type) -> str:
    """The Markdown table of a settings dataclass (key, type and limits, default, meaning), as
    config/README.md shows it; generated, so the docs say what the code does."""
    schema = schema_of(cls)["properties"]
    defaults = defaults_of(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, spec in schema.items():
        default = defaults.get(name)
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        rows.append(f"| `{name}` | {_limits_text(spec)} | `{shown}` | {spec['description'].replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"
