"""Flags from the settings dataclasses: parsers, a child process's argv, the README's table.

Each field becomes a flag named after it (or its `Spec.flag`), and each of its
`Spec.switches` a flag without a value (a boolean has only switches). Unset flags leave the
dataclass's default, so a default is written in one place only. `python -m settings.flags --markdown` prints the
`loraserve serve` table of README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Any

from settings.config import PARTS, ServeConfig, Spec, Switch, settings_of, spec_of

@dataclass(frozen=True)
class Row:
    flag: str
    default: str
    help: str


def add_arguments(parser: argparse.ArgumentParser, config_type: type, *, serve: bool = False) -> None:
    """A flag (or switches) per field of `config_type`; `serve`: `loraserve serve`'s (launcher-set fields left
    out, none required: the CLI fills in what is missing)."""
    group = parser.add_argument_group(config_type.__name__)
    for field in dataclasses.fields(config_type):
        if not serve or spec_of(field).serve:
            _add_field(group, field, _value_type(config_type, field), required=not serve)


def config_from_args(parser: argparse.ArgumentParser, config_type: type, args: argparse.Namespace,
                     **given: Any) -> Any:
    """The dataclass from parsed flags (and `given` values); a failed check is an argparse error."""
    values = {field.name: _from_flag(getattr(args, field.name), _value_type(config_type, field))
              for field in dataclasses.fields(config_type) if hasattr(args, field.name)}
    try:
        return config_type(**(values | given))
    except (TypeError, ValueError) as error:
        parser.error(str(error))


def parse_parts(parser: argparse.ArgumentParser, argv: list[str] | None, parts: Mapping[str, type]
                ) -> argparse.Namespace:
    """Parses `argv`: each part (a settings dataclass) under its name, beside the parser's other flags."""
    args = parser.parse_args(argv)
    built = {name: config_from_args(parser, config_type, args) for name, config_type in parts.items()}
    for field in (field for config_type in parts.values() for field in dataclasses.fields(config_type)):
        vars(args).pop(field.name, None)
    return argparse.Namespace(**vars(args), **built)


def to_argv(config: Any) -> list[str]:
    """The flags that rebuild `config` in a parser of `add_arguments`: those of the fields off their defaults."""
    argv: list[str] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if _has_no_default(field) or value != _default(field):
            argv += _flag_words(field, value)
    return argv


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for config_type in PARTS.values():
        add_arguments(parser, config_type, serve=True)


def serve_config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           **given: Any) -> ServeConfig:
    """`given`: flat settings that replace the flags' (`model_path` of the demo, ...)."""
    parts = {name: config_from_args(parser, config_type, args, **settings_of(config_type, given))
             for name, config_type in PARTS.items()}
    return ServeConfig(**parts)


def serve_rows() -> Iterator[Row]:
    for config_type in PARTS.values():
        for field in dataclasses.fields(config_type):
            if spec_of(field).serve:
                yield from _rows(field)


def markdown_table() -> str:
    lines = ["| flag | default | what it does |", "| --- | --- | --- |"]
    lines += [f"| `{row.flag}` | {row.default} | {row.help} |" for row in serve_rows()]
    return "\n".join(lines) + "\n"


# Fields -----------------------------------------------------------------------------------------


def _value_type(config_type: type, field: dataclasses.Field) -> Any:
    """The field's type without `| None`."""
    hint = typing.get_type_hints(config_type)[field.name]
    if isinstance(hint, UnionType):
        hint = next(member for member in typing.get_args(hint) if member is not NoneType)
    return hint


def _has_no_default(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _flag(field: dataclasses.Field) -> str:
    return spec_of(field).flag or "--" + field.name.replace("_", "-")


def _add_field(group: argparse._ArgumentGroup, field: dataclasses.Field, value_type: Any, *, required: bool) -> None:
    spec = spec_of(field)
    switches = spec.switches
    options = len(switches) + (value_type is not bool) + (spec.scaled is not None)
    target = group.add_mutually_exclusive_group() if options > 1 else group
    common = {"dest": field.name, "default": argparse.SUPPRESS}
    for flag, switch in switches.items():
        target.add_argument(flag, action="store_const", const=switch.value,
                            help=f"{switch.help} (default: {_switch_default(field, switch)})", **common)
    if value_type is bool:
        return
    required = required and _has_no_default(field)
    target.add_argument(_flag(field), *spec.aliases, help=f"{spec.help} (default: {_default_text(field)})",
                        required=required, **common, **_value_options(spec, value_type))
    if spec.scaled is not None:
        flag, unit, unit_name = spec.scaled
        target.add_argument(flag, type=lambda text: int(float(text) * unit), metavar=unit_name,
                            help=f"{spec.help}, in {unit_name} (default: {_default(field) / unit:g})", **common)


def _value_options(spec: Spec, value_type: Any) -> dict[str, Any]:
    origin = typing.get_origin(value_type)
    if origin is dict:
        return {"nargs": "*", "metavar": "NAME=VALUE", "type": name_value}
    if origin is tuple:
        return {"nargs": "+", "choices": spec.choices or None}
    return {"type": spec.parse or value_type, "choices": spec.choices or None}


def name_value(text: str) -> tuple[str, str]:
    """An item of a NAME=VALUE list flag: "a=/x" -> ("a", "/x")."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (such as mine=/adapters/mine), got {text!r}")
    return name, value


def _from_flag(value: Any, value_type: Any) -> Any:
    origin = typing.get_origin(value_type)
    if origin is dict:
        return dict(value)
    if origin is tuple:
        return tuple(value)
    return value


def _flag_words(field: dataclasses.Field, value: Any) -> list[str]:
    for flag, switch in spec_of(field).switches.items():
        if switch.value == value:
            return [flag]
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{field.name}={value!r} has no flag")
    if isinstance(value, dict):
        return [_flag(field), *(f"{name}={item}" for name, item in value.items())]
    if isinstance(value, tuple):
        return [_flag(field), *map(str, value)]
    return [_flag(field), str(value)]


# The README's table -----------------------------------------------------------------------------


def _default_text(field: dataclasses.Field) -> str:
    spec, default = spec_of(field), _default(field)
    if spec.default_text is not None:
        return spec.default_text
    if default in (None, {}):
        return "none"
    if isinstance(default, tuple):
        return " ".join(default)
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def _switch_default(field: dataclasses.Field, switch: Switch) -> str:
    return "on" if switch.value == _default(field) else "off"


def _rows(field: dataclasses.Field) -> Iterator[Row]:
    spec, default = spec_of(field), _default(field)
    for flag, switch in spec.switches.items():
        yield Row(flag, _switch_default(field, switch), switch.help)
    if isinstance(default, bool):
        return
    yield Row(_flag(field), _default_text(field), spec.help)
    for alias in spec.aliases:
        yield Row(alias, "", f"the same as `{_flag(field)}`")
    if spec.scaled is not None:
        flag, unit, unit_name = spec.scaled
        yield Row(flag, f"{default / unit:g}", f"{spec.help}, in {unit_name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m settings.flags", description=__doc__)
    parser.add_argument("--markdown", action="store_true", required=True, help="print the README's flag table")
    parser.parse_args(argv)
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
