"""Strict YAML configs: one YAML section = one dataclass, every mistake reported at once.

A config class is a plain dataclass whose fields are typed with `str`, `int`, `float`, `bool`,
`Literal[...]`, `list[...]`, `X | None`, another config dataclass (a nested YAML section) or
`dict[str, Any]` (a section passed through to a backend, checked by `check_backend_args`).
`load_config` walks the YAML against those types and raises one `ConfigError` that lists every
unknown key (with a did-you-mean), wrong type and missing required key, with its YAML path.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from self_model.core.errors import ConfigError

T = TypeVar("T")
_MISSING = dataclasses.MISSING
# PyYAML follows YAML 1.1, where `5e-5` (no dot) is a string. Numbers like that are accepted where a
# number is expected: users write them in every config they copy from a paper.
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the converted value or append to `errors`."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if len(options := [a for a in args if a is not type(None)]) == 1:
            return coerce(value, options[0], path, errors)  # `X | None`: X's own message (a section's keys)
        for arg in options:
            trial: list[str] = []
            result = coerce(value, arg, path, trial)
            if not trial:
                return result
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if value is None:
        errors.append(f"{path}: expected {_type_name(tp)}, got nothing (null)")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping (a YAML section), got {value!r}")
            return value
        return _build(tp, value, path, errors)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = did_you_mean(str(value), [str(a) for a in allowed])
            errors.append(f"{path}: {value!r} is not allowed; expected one of {list(allowed)}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {value!r}")
            return value
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(item, item_tp, f"{path}[{i}]", errors) for i, item in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            errors.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            errors.append(f"{path}: expected a number, got {value!r}")
            return value
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        errors.append(f"{path}: expected a number, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str, errors: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    errors_before = len(errors)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            errors.append(f"{path}: unknown key{did_you_mean(str(key), fields)}; known keys: {sorted(fields)}")
            continue
        before = len(errors)
        kwargs[key] = coerce(value, hints[key], path, errors)
        check = fields[key].metadata.get("check")
        if check is not None and len(errors) == before and kwargs[key] is not None:
            errors.extend(check(kwargs[key], path))
    for name, f in fields.items():
        required = f.metadata.get("required") or (f.default is _MISSING and f.default_factory is _MISSING)
        if name not in kwargs and required:
            path = f"{prefix}.{name}" if prefix else name
            errors.append(f"{path}: required key is missing ({_type_name(hints[name])})")
    if len(errors) > errors_before:
        return data  # type: ignore[return-value]  # the caller raises; never construct a half-checked object
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # single-section checks in __post_init__
        errors.append(f"{prefix or '(top level)'}: {exc}")
        return data  # type: ignore[return-value]


def existing_files(value: str | list[str], path: str) -> list[str]:
    """Field check (`field(metadata={"check": existing_files})`): every named file exists."""
    paths = value if isinstance(value, list) else [value]
    return [f"{path}: file not found: {p}" for p in paths if p and not Path(p).is_file()]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` command-line overrides; the value is parsed as YAML (`1.0e-4`, `true`, `[q, v]`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"override {item!r}: expected KEY=VALUE, e.g. training_args.learning_rate=1.0e-4"])
        dotted, raw = item.split("=", 1)
        node = data
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"override {item!r}: '{part}' is not a section"])
            node = child
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"], source=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"], source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"])
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> T:
    """Load a YAML file (or an already-read mapping) into `cls`, raising one ConfigError with every problem."""
    raw = dict(data) if data is not None else read_yaml(path)  # type: ignore[arg-type]
    raw = apply_overrides(raw, overrides or [])
    errors: list[str] = []
    cfg = _build(cls, raw, "", errors)
    if not errors and hasattr(cfg, "validate"):
        errors.extend(cfg.validate())
    if errors:
        raise ConfigError(errors, source=str(path) if path else None)
    return cfg


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists, for writing the resolved config."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)


def redact(obj: Any) -> Any:
    """Replace the values of secret-looking keys so a saved or printed config never carries a key."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj
