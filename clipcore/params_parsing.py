"""Building frozen dataclasses from plain YAML data: each value's type and range checked, and
every problem one ParamsError line naming the key and the file. The schema is clipcore.params."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import field

from clipcore.errors import ClipcoreError


class ParamsError(ClipcoreError):
    """A params.yaml key is unknown, missing, mistyped or out of range."""


def _metadata(*, ge=None, gt=None, le=None, lt=None, choices=None, contains=None, auto=False):
    """Field metadata: the bounds, choices or required text a value must respect; `auto`: the
    word "auto" (or the word given, e.g. "all") stands for a value chosen at run time."""
    return {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "contains": contains,
            "auto": auto}


def checked(default=dataclasses.MISSING, **check):
    """A dataclass field whose value `build` checks against these bounds or choices."""
    return field(default=default, metadata=_metadata(**check))


def build(cls, raw, prefix: str, source: str):
    """An instance of dataclass `cls` from `raw`, nested dataclasses built in turn."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: {where} must be a mapping of keys, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise ParamsError(f"{source}: {_unknown_key(prefix + str(unknown[0]), cls, prefix)}")
    values = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            raise ParamsError(f"{source}: missing key '{key}'")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = build(hint, raw[name], prefix=key + ".", source=source)
        else:
            values[name] = _convert(raw[name], hint, key, f.metadata, source)
    try:
        return cls(**values)
    except ParamsError as exc:  # a rule between keys (__post_init__): name the file too
        raise ParamsError(f"{source}: {exc}") from None


def _unknown_key(key: str, cls, prefix: str) -> str:
    """What to say about an unknown key: the schema's nearest key (a typo, or a dotted key that
    YAML read as one name: `train.epochs: 3` on one line) or the keys this level holds."""
    known = _dotted_keys(cls, prefix)
    written_dotted = "." in key[len(prefix):]
    if written_dotted and key in known:
        return f"'{key}' is one key named with dots to YAML: {_nested(key)}"
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if near:
        nested = f", {_nested(near[0])}" if written_dotted else ""
        return f"unknown key '{key}' (did you mean '{near[0]}'{nested}?)"
    return (f"unknown key '{key}' (expected one of: "
            f"{', '.join(f.name for f in dataclasses.fields(cls))})")


def _nested(key: str) -> str:
    *sections, name = key.split(".")
    return f"write '{name}:' under {' '.join(f'{s}:' for s in sections)}"


def _dotted_keys(cls, prefix: str) -> list[str]:
    """Every key of dataclass `cls` and of the dataclasses nested in it, as dotted paths."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(hint):
            keys += _dotted_keys(hint, f"{prefix}{name}.")
    return keys


def _convert(value, hint, key: str, check, source: str):
    auto = bool(check) and check["auto"]
    word = auto if isinstance(auto, str) else "auto"
    if auto:  # an integer, or the word ("auto", "all")
        if value == word:
            return value
        hint = int
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        # PyYAML (YAML 1.1) reads `1e-3` as a string: a float needs a dot there (1.0e-3).
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):  # `.inf`: no bound holds it (a timeout overflows)
            raise ParamsError(f"{source}: '{key}' must be a finite number, got {value!r}")
    elif hint is str:
        # An empty YAML value (`url:`) reads as None; for strings it means "".
        value = "" if value is None else value
        ok = isinstance(value, str)
    else:  # pragma: no cover - a new field type needs a branch here
        raise TypeError(f"no conversion for {hint}")
    if not ok:
        raise ParamsError(f"{source}: '{key}' must be {_type_name(hint)}"
                          f"{f' or {word}' if auto else ''}, got {_describe(value)}")
    _check_range(value, key, check, source)
    return value


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_range(value, key: str, check, source: str) -> None:
    if not check:
        return
    if check["choices"] is not None and value not in check["choices"]:
        raise ParamsError(
            f"{source}: '{key}' must be one of {', '.join(check['choices'])}, got {value!r}")
    if check["contains"] is not None and check["contains"] not in value:
        raise ParamsError(f"{source}: '{key}' must contain {check['contains']}, got {value!r}")
    bounds = [("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
              ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b)]
    for name, symbol, holds in bounds:
        limit = check[name]
        if limit is not None and not holds(value, limit):
            raise ParamsError(f"{source}: '{key}' must be {symbol} {limit}, got {value!r}")


def _type_name(hint) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"
