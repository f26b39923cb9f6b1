"""Typed configuration: one frozen dataclass per program, filled from a TOML file and overrides.

Nested dataclasses map to TOML tables. Unknown keys are errors, not silently ignored: a typo in
a config file must not quietly run the wrong experiment.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(fields))})")
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key}: expected a table")
            value = from_dict(hint, value, f"{where}.{key}")
        kwargs[name] = value
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path | None, overrides: dict[str, Any]) -> T:
    """Read `path` (TOML) if given, then apply `overrides` (dotted keys for nested tables)."""
    values: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return from_dict(cls, values, where=str(path or "config"))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
