"""One mechanism for every run description: a flat dataclass of options becomes command-line
flags, reads TOML/YAML files, and merges a checkpoint's saved options with what a resumed
invocation asked for.

Pretraining (`TrainConfig`), classification and instruction tuning (`fastgpt.finetune.config`)
all use it, so "which options did the user set" is computed one way: flags are added with
`argparse.SUPPRESS` as default, so an option appears in the parsed namespace only when typed.
No torch import here: the CLI builds its parsers without paying for it.

A field's `metadata` may name its flag (`flag`), give `nargs`/`metavar`/`choices`, a `parse`
function for the flag's text (e.g. a comma list), and `required` (checked by `require`).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, get_type_hints

from ..errors import FastGPTError


def option_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def flag_of(field: dataclasses.Field) -> str:
    return "--" + field.metadata.get("flag", field.name).replace("_", "-")


def _kinds(hint) -> tuple:
    """The alternatives of a hint: `int | None` -> (int, NoneType)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _item_type(hint):
    """`list[float]` -> float; None for scalar hints."""
    for kind in _kinds(hint):
        if typing.get_origin(kind) in (list, tuple):
            return typing.get_args(kind)[0]
    return None


def _scalar(kind, value):
    if kind is bool and isinstance(value, bool):
        return True, value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return True, value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return True, float(value)
    if kind is str and isinstance(value, str):
        return True, value
    return False, None


def coerce(cls, key: str, value: Any, source: str) -> Any:
    """Check a file/override value against the field's type (ints accepted for floats, lists for lists)."""
    hint = get_type_hints(cls)[key]
    allowed = _kinds(hint)
    if value is None and type(None) in allowed:
        return None
    item = _item_type(hint)
    if item is not None and isinstance(value, (list, tuple)):
        converted = [_scalar(item, v) for v in value]
        if all(ok for ok, _ in converted):
            return [v for _, v in converted]
    for kind in allowed:
        ok, converted = _scalar(kind, value)
        if ok:
            return converted
    names = "/".join(getattr(k, "__name__", str(k)) for k in allowed if k is not type(None))
    raise FastGPTError(f"{source}: key {key!r} must be {names}, got {value!r}")


def load_config_file(path: str | Path, cls) -> dict:
    """Read a TOML or YAML run description into {option: value}; unknown keys are errors.

    Sections are allowed for readability ([data], [model], [optim], ...): their keys
    are flattened, so `[optim] lr = 3e-4` is the same as top-level `lr = 3e-4`.
    """
    path = Path(path)
    if not path.is_file():
        raise FastGPTError(f"--config: no such file {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text) or {}
        else:
            raise FastGPTError(f"{path}: config files must end in .toml, .yaml or .yml")
    except FastGPTError:
        raise
    except Exception as err:  # the parsers' own messages name the line
        raise FastGPTError(f"{path}: cannot parse: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise FastGPTError(f"{path}: expected a table of options at the top level")
    flat: dict[str, Any] = {}
    known = set(option_names(cls))
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]  # no option is a table
        for sub_key, sub_value in items:
            if sub_key not in known:
                raise FastGPTError(f"{path}: unknown key {sub_key!r}")
            flat[sub_key] = coerce(cls, sub_key, sub_value, str(path))
    return flat


def resolve(cls, file_values: dict | None = None, overrides: dict | None = None):
    """Defaults <- config file <- explicit overrides, validated."""
    values = {**(file_values or {}), **(overrides or {})}
    unknown = sorted(set(values) - set(option_names(cls)))
    if unknown:
        raise FastGPTError(f"unknown option {unknown[0]!r}")
    return cls(**values).validate()


def explicit_fields(cfg) -> set[str]:
    """Fields that differ from the defaults (what a caller of the Python API asked for)."""
    default = type(cfg)()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


def merge_for_resume(saved: dict, cfg, explicit: set[str]):
    """(the checkpoint's own options, those options with the `explicit` ones of `cfg` on top), validated."""
    cls = type(cfg)
    known = set(option_names(cls))
    original = cls(**{k: v for k, v in saved.items() if k in known}).validate()
    merged = dataclasses.replace(original, **{key: getattr(cfg, key) for key in explicit if key in known})
    return original, merged.validate()


def require(cfg, names, unless: str = "") -> None:
    """One-line error for the first of `names` that is unset."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for name in names:
        if getattr(cfg, name) is None:
            raise FastGPTError(f"{flag_of(fields[name])} is required{unless}")


def add_flags(group, cls, help_texts: dict[str, str]) -> None:
    """A flag per field of `cls` (bools get --x / --no-x), each with SUPPRESS as its default,
    so the parsed namespace holds exactly the options typed; the help shows the real default."""
    hints, defaults = get_type_hints(cls), cls()
    for f in dataclasses.fields(cls):
        kinds = [k for k in _kinds(hints[f.name]) if k is not type(None)]
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, list) and "parse" in f.metadata else \
            " ".join(map(str, default)) if isinstance(default, list) else default
        text = help_texts[f.name] if default is None or default is False else \
            f"{help_texts[f.name]} (default: {shown})"
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
        if kinds == [bool]:
            group.add_argument(flag_of(f), action=argparse.BooleanOptionalAction, **common)
            continue
        item = _item_type(hints[f.name])
        kind = f.metadata.get("parse") or item or kinds[0]
        extra = {k: f.metadata[k] for k in ("nargs", "choices") if k in f.metadata}
        metavar = f.metadata.get("metavar", None if "choices" in f.metadata else f.name.upper())
        group.add_argument(flag_of(f), type=kind, metavar=metavar, **extra, **common)


def given_flags(args, cls) -> dict:
    """{option: value} of the flags typed on the command line (lists as lists)."""
    values = {}
    for name in option_names(cls):
        if hasattr(args, name):
            value = getattr(args, name)
            values[name] = list(value) if isinstance(value, tuple) else value
    return values
