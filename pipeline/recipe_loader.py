"""Reading a recipe: the YAML file (and the files it `extends:`), `key.path=value` overrides, and the
checks that turn the values into the typed dataclasses of pipeline/recipe.py (types, ranges, unknown
keys with the closest valid one). Also the way back (`to_dict`, for the artifact's recipe.yaml) and
trl's trainer configs from a recipe section (`trl_args`).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError
from pipeline.recipe import DatasetSpec, Recipe, RewardSource, check_range


def _closest(key: str, options) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (dicts into dataclasses).

    Unknown annotations are accepted as they are: the library that owns them checks further.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # X | None: X's own message (e.g. a nested key out of range)
            return coerce(value, candidates[0], key)
        for arg in candidates:
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"'{key}': {value!r} is not a valid {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"'{key}': {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is DatasetSpec:
            value = {"path": value}
        if isinstance(value, str) and tp is RewardSource:  # a judge or reward given as 'pkg.module:name'
            value = {"function": value}
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a mapping, got {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}': expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"'{key}': {value!r} is not one of {[e.value for e in tp]}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}': expected a string, got {value!r}")
        return value
    return value


def build(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping, refusing unknown keys and ill-typed values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(f"unknown key '{full}'{_closest(key, fields)}")
        kwargs[key] = coerce(value, hints[key], full)
        metadata = next(f.metadata for f in dataclasses.fields(cls) if f.name == key)
        if "range" in metadata:
            check_range(kwargs[key], metadata["range"], full)
        for entry, rule in metadata.get("entry_ranges", {}).items():
            check_range(kwargs[key].get(entry), rule, f"{full}.{entry}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a required field is missing, or settings that do not fit together
        raise ConfigError(f"'{prefix or cls.__name__}': {e}") from None


def parse_override(arg: str) -> tuple[list[str], Any]:
    """'sft.trainer.learning_rate=1e-4' -> (['sft', 'trainer', 'learning_rate'], 0.0001)."""
    if "=" not in arg:
        raise ConfigError(f"override '{arg}' is not of the form key.path=value")
    key, raw = arg.split("=", 1)
    return key.split("."), _fix_yaml_floats(yaml.safe_load(raw) if raw.strip() else None)


def _fix_yaml_floats(node):
    """YAML 1.1 reads '1e-4' as a string; recipes mean a number."""
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str):
        try:
            return float(node) if node[:1] in "0123456789.-+" and any(c in node for c in "eE") else node
        except ValueError:
            return node
    return node


def read_recipe_file(p: Path, seen: tuple = ()) -> dict:
    """A recipe file's settings; `extends: other.yaml` (relative to the file) starts from another
    recipe's, which this one's override key by key."""
    if not p.is_file():
        raise ConfigError(f"recipe file '{p}' does not exist (set RECIPE=path/to/recipe.yaml)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe '{p}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{p}' must be a mapping of settings, got {type(data).__name__}")
    data = _fix_yaml_floats(data)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if p.resolve() in seen:
        raise ConfigError(f"recipe '{p}' extends itself (through {[str(s) for s in seen]})")
    return _merged(read_recipe_file(p.parent / parent, seen + (p.resolve(),)), data)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe YAML (or the defaults if None) and apply `key.path=value` overrides."""
    data = read_recipe_file(Path(path)) if path is not None else {}
    for arg in overrides:
        keys, value = parse_override(arg)
        node = data
        for k in keys[:-1]:
            if isinstance(node.get(k), str):  # dataset shorthand "file.jsonl" -> {"path": "file.jsonl"}
                node[k] = {"path": node[k]}
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{arg}': '{k}' is not a section")
        node[keys[-1]] = value
    recipe = build(Recipe, data)
    for section in recipe.ppo.rewards + recipe.ppo.judges + recipe.eval.judges + [recipe.ppo]:
        section.base_dir = str(Path(path).resolve().parent) if path is not None else None
    return recipe


def to_dict(obj) -> Any:
    """Plain-data view of a config (for YAML/JSON and fingerprints)."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get("internal")
        }
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def trl_args(config_cls, settings: dict, section: str, **defaults):
    """Build a trl/transformers config (SFTConfig, RewardConfig...) from a recipe section.

    Keys are checked against the class's fields with the same rules as the recipe, so a typo such
    as `learning_rat` names the section and the closest valid key. `defaults` apply only where the
    user set nothing.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    hints = typing.get_type_hints(config_cls)
    for key, value in settings.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{section}.{key}' for {config_cls.__name__}{_closest(key, fields)}")
        settings = {**settings, key: coerce(value, hints[key], f"{section}.{key}")}
    try:
        return config_cls(**{**defaults, **settings})
    except ValueError as e:  # the library's own validation (incompatible settings)
        raise ConfigError(f"{section}: {e}") from None
