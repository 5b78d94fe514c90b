"""Typed dataclass configs loaded from JSON or YAML, with strict keys, type checks and `--set` overrides.

Precedence: dataclass defaults < JSON or YAML file < `--set section.key=value`. Every error names the file
(or `--set`) and the dotted key, and says what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from astrai_ds.errors import ConfigError

YAML_SUFFIXES = (".yaml", ".yml")


def read_json(path: str | Path, what: str = "config") -> dict:
    """Read a JSON object from `path`, with errors that name the file and the line."""
    path = _existing(path, what)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    return _top_level_mapping(data, path, "a JSON object")


def read_config(path: str | Path, what: str = "config") -> dict:
    """Read a train or model config: YAML for `.yaml`/`.yml`, JSON otherwise. Both give the same plain dict,
    so the schema, the validation and `--set` are the same."""
    if Path(path).suffix.lower() not in YAML_SUFFIXES:
        return read_json(path, what)
    path = _existing(path, what)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_JsonLikeYamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    return _top_level_mapping(data, path, "a mapping (key: value lines)")


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    return path


def _top_level_mapping(data: Any, path: Path, expected: str) -> dict:
    if not isinstance(data, dict):
        got = "an empty document" if data is None else type(data).__name__
        raise ConfigError(f"{path}: expected {expected} at the top level, got {got}")
    return data


class _JsonLikeYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader narrowed to what JSON can say, so that a YAML config means what its JSON twin means:
    `3e-4` is a number (YAML 1.1 wants `3.0e-4` and reads `3e-4` as a string), a date such as 2024-01-01
    stays a string, and every key is a string."""

    def construct_mapping(self, node, deep=False):
        mapping = super().construct_mapping(node, deep)
        for key_node, _ in node.value:
            key = self.construct_object(key_node)
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} is read as {type(key).__name__}, not a string; quote it",
                    key_node.start_mark)
        return mapping


_JsonLikeYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_JsonLikeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is parsed as JSON where it parses, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, for example --set max_steps=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be a dotted name such as data.seq_len")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set` overrides to a raw config dict (a copy is returned). Unknown keys are caught later
    by `from_dict`, which names them."""
    data = json.loads(json.dumps(data))
    for text in overrides or []:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is a {type(child).__name__}, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])[2:] if args else 'values'}s" if args else "a list"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + (
            " or null" if type(None) in get_args(tp) else ""
        )
    if dataclasses.is_dataclass(tp):
        return "a JSON object (section)"
    return str(tp)


def convert_value(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (int -> float, list -> tuple, dict -> dataclass)."""
    origin = get_origin(tp)
    bad = ConfigError(
        f"{source}: key '{key}' must be {_type_name(tp)}, got {json.dumps(value, ensure_ascii=False)}"
    )
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        section_error = None
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return convert_value(value, arg, key, source)
            except ConfigError as e:
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    section_error = e  # a section with a bad key inside: that key's message says more
        raise section_error or bad
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in get_args(tp)):
            return value
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [convert_value(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, source, prefix=key + ".")
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def from_dict(cls, data: dict, source: str = "<dict>", prefix: str = ""):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types with a message that names
    `source` (a file, or `--set`) and the dotted key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    moved = getattr(cls, "MOVED", {})
    for key in data:
        if key not in fields and key in moved:
            raise ConfigError(f"{source}: key '{prefix}{key}' has moved to '{moved[key]}'")
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{did_you_mean(key, fields, prefix)}; "
                              f"allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = convert_value(data[name], hints[name], prefix + name, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{prefix}{name}' ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{source}: key '{prefix}{e.key}' {e.problem}") from None


def did_you_mean(key: str, candidates, prefix: str = "") -> str:
    """` (did you mean 'prefix.close'?)` for the candidate closest to a misspelled `key`, or ""."""
    close = difflib.get_close_matches(key, list(candidates), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def to_dict(obj) -> dict:
    """A dataclass config as a plain JSON-ready dict."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


class FieldError(ConfigError):
    """Raised by `check` inside `__post_init__`; `from_dict` adds the file and the section prefix."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"key '{key}' {problem}")
        self.key, self.problem = key, problem


def check(condition: bool, key: str, problem: str) -> None:
    """Validation helper for `__post_init__`: raise unless `condition` holds, naming `key` and the problem."""
    if not condition:
        raise FieldError(key, problem)


def find_file(path: str | Path, what: str, key: str | None = None) -> Path:
    """A config file named relative to the working directory, or else to the project root (so that
    `configs/model/tiny.json` works from any directory)."""
    from astrai_ds import PROJECT_ROOT

    for candidate in (Path(path), PROJECT_ROOT / path):
        if candidate.is_file():
            return candidate
    where = f"{key} names " if key else ""
    raise ConfigError(f"{where}{what} file not found: {path} (looked in the working directory and in {PROJECT_ROOT})")
