"""TOML -> frozen dataclasses, shared by the agent's and the collector's configs.

Every key has a default; unknown keys are rejected with the closest valid key;
durations ("10s", "5m", "1h30m") and sizes ("512MiB", "10MB") are parsed here.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem, phrased as one line naming file, key and what is wrong."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")
        self.file = file
        self.key = key
        self.problem = problem


class Duration(float):
    """Seconds, written in TOML as "10s", "5m", "250ms" or "1h30m" (a bare number is refused)."""


class Size(int):
    """Bytes, written in TOML as "512MiB", "10MB", "64k" or a bare integer."""


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?")


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration like \"10s\"")
    if isinstance(value, int | float):
        # `window = 10` reads as seconds to one operator and minutes to the next: say which.
        raise ValueError(f"a bare number is not a duration: write \"{value:g}s\" (or \"{value:g}m\", \"{value:g}ms\")")
    if isinstance(value, str):
        text = value.strip()
        pos = 0
        seconds = 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise ValueError(f"{value!r} is not a duration (use e.g. \"10s\", \"5m\", \"250ms\")")
    else:
        raise ValueError(f"expected a duration like \"10s\", got {type(value).__name__}")
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size like \"512MiB\"")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if not m:
            raise ValueError(f"{value!r} is not a size (use e.g. \"512MiB\", \"10MB\")")
        number, prefix, binary = m.groups()
        base = 1024 if binary else 1000
        power = " kmgt".index(prefix.lower() or " ")
        size = int(float(number) * base**power)
    else:
        raise ValueError(f"expected a size like \"512MiB\", got {type(value).__name__}")
    if size < 0:
        raise ValueError("must not be negative")
    return size


def _convert(file: str, key: str, tp: Any, value: object) -> Any:
    origin = typing.get_origin(tp)
    try:
        if tp is Duration:
            return Duration(parse_duration(value))
        if tp is Size:
            return Size(parse_size(value))
        if origin in (types.UnionType, typing.Union):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            return _convert(file, key, args[0], value)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if not isinstance(value, dict):
                raise ValueError(f"expected a table, got {type(value).__name__}")
            return build(tp, value, file, key + ".")
        if origin is dict:
            key_tp, value_tp = typing.get_args(tp)
            if not isinstance(value, dict):
                raise ValueError(f"expected a table, got {type(value).__name__}")
            return {
                _convert(file, key, key_tp, k): _convert(file, f"{key}.{k}", value_tp, v) for k, v in value.items()
            }
        if origin is tuple:
            inner = typing.get_args(tp)[0]
            if not isinstance(value, list):
                raise ValueError(f"expected an array, got {type(value).__name__}")
            return tuple(_convert(file, f"{key}[{i}]", inner, v) for i, v in enumerate(value))
        if tp is bool:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected an integer, got {value!r}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
            return value
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(file, key, str(exc)) from None
    raise ConfigError(file, key, f"unsupported type {tp!r}")


def build(cls: type[T], table: dict[str, Any], file: str = "<config>", prefix: str = "") -> T:
    """Build dataclass `cls` from a TOML table, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            import difflib  # only for the error message

            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(file, prefix + key, f"unknown key{hint}; valid keys here: {valid}")
        kwargs[key] = _convert(file, prefix + key, hints[key], value)
    try:
        obj = cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(file, prefix.rstrip("."), str(exc)) from None
    return obj


def load(cls: type[T], path: Path | None) -> T:
    """Load `cls` from a TOML file, or all defaults when path is None."""
    if path is None:
        return build(cls, {}, "<defaults>")
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from None
    return build(cls, table, str(path))
