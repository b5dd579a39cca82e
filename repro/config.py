"""Presets and overrides: YAML in, a validated, typed config dataclass out."""

from __future__ import annotations

import copy
import dataclasses
import difflib
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml
from jsonargparse import ArgumentParser

CONFIG_ROOT = Path(__file__).parent / "configs"
T = TypeVar("T")


class ConfigError(ValueError):
    """A bad technique, preset, key or value; the message names the valid choices."""


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{hint} Valid: {', '.join(sorted(choices))}."


def presets(technique: str) -> list[str]:
    """Names of the preset YAML files of a technique."""
    return sorted(p.stem for p in (CONFIG_ROOT / technique).glob("*.yaml"))


def load_preset(technique: str, preset: str) -> dict[str, Any]:
    path = CONFIG_ROOT / technique / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {preset!r} for technique {technique!r}.{_suggest(preset, presets(technique))}")
    return yaml.safe_load(path.read_text()) or {}


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings; values are parsed as YAML (`4`, `3e-4`, `true`, `null`)."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set model.n_layer=4")
        *parents, leaf = key.strip().split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
        node[leaf] = yaml.safe_load(raw)
    return config


def _range_error(value: Any, rule: dict[str, Any]) -> str | None:
    """What is wrong with `value` under a field's metadata rule, or None. Rules are plain data, so any
    layer's config dataclass can state them: {"min": 1}, {"gt": 0}, {"min": 0, "lt": 1}, and
    {"check": f} with f(value) -> error text or None for what a range cannot say."""
    if value is None:  # a field that admits None means "the default"; its type check is jsonargparse's
        return None
    if "check" in rule:
        return rule["check"](value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # a wrong type: jsonargparse names it
    for name, fails, word in (("min", value.__lt__, ">="), ("gt", value.__le__, ">"), ("max", value.__gt__, "<="), ("lt", value.__ge__, "<")):
        if name in rule and fails(rule[name]):
            return f"must be {word} {rule[name]}"
    return None


def _check_keys(cls: type, values: dict[str, Any], prefix: str = "") -> None:
    """Reject unknown keys with the valid ones listed (jsonargparse does not list them) and values out of
    their field's range (`_range_error`), each naming the full key, before any __post_init__ divides by them."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            where = f"section {prefix.rstrip('.')!r}" if prefix else "the config"
            raise ConfigError(f"unknown key {prefix + key!r} in {where}.{_suggest(key, list(fields))}")
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix + key!r} is a section; set its keys, e.g. {prefix + key}.<key>=...")
            _check_keys(sub, value, prefix + key + ".")
        elif fields[key].metadata and (problem := _range_error(value, fields[key].metadata)):
            raise ConfigError(f"{prefix + key}={value}: {problem}")


def build_config(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Validate `values` against the dataclass `cls` (keys, ranges and types) and instantiate it; errors
    name keys under `prefix` (a prerequisite stage's, `pretrain.`, as `--set` spells them)."""
    _check_keys(cls, values, prefix)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "config")
    try:
        namespace = parser.parse_object({"config": values})
        return parser.instantiate(namespace).config
    except Exception as err:  # jsonargparse raises ArgumentError; __post_init__ raises ValueError
        message = " ".join(str(err).replace('"config.', f'"{prefix}').split())
        raise ConfigError(f"{prefix.rstrip('.')}: {message}" if prefix else message) from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
