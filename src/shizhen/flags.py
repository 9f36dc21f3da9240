"""Command-line flags made from the settings models, and the checks on what a person typed.

Each flag says what it does, the environment variable it stands for and its default in plain words, grouped as
`config.py` groups the settings; a mistyped flag is one line with a "did you mean"; a `SHIZHEN_*` variable that is
no setting (in the environment or `.env`) is a warning naming the close match, instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings


class Parser(argparse.ArgumentParser):
    """argparse, with errors in one line (not the whole usage) and a close match for an unknown flag."""

    def error(self, message: str) -> typing.NoReturn:
        if unknown := re.match(r"unrecognized arguments: (\S+)", message):
            flag = unknown[1].split("=", 1)[0]
            known = [option for action in self._actions for option in action.option_strings]
            close = difflib.get_close_matches(flag, known, n=1)
            message = f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else "")
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help\n")


def add_settings_flags(parser: argparse.ArgumentParser, settings: type[BaseSettings], sections: Mapping[str, str],
                       only: Iterable[str] | None = None) -> None:
    """A flag for each setting (or each one named in `only`), under its section's title. Flags left out are absent
    from the parsed namespace, so the environment and the defaults still apply."""
    wanted = set(only) if only is not None else None
    title, group = None, None
    for name, field in settings.model_fields.items():
        if name in sections:
            title, group = sections[name], None
        if wanted is not None and name not in wanted:
            continue
        group = group or parser.add_argument_group(title)
        flag = "--" + name.replace("_", "-")
        described = f"{field.description or ''} [{environment_names(settings, name, field)}; " \
                    f"default: {plain_default(field)}]".strip()
        if _is_bool(field):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=described)
        else:
            group.add_argument(flag, metavar=_metavar(field), default=argparse.SUPPRESS, help=described)


def given_settings(namespace: argparse.Namespace, settings: type[BaseSettings]) -> dict:
    """The settings the flags set (by field name), for `Settings(**given)`: they win over the environment."""
    return {name: value for name, value in vars(namespace).items() if name in settings.model_fields}


def environment_names(settings: type[BaseSettings], name: str, field: FieldInfo) -> str:
    return " or ".join(_variables(settings, name, field))


def plain_default(field: FieldInfo) -> str:
    value = field.default_factory() if field.default is PydanticUndefined and field.default_factory else field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(item) for item in value) or "none"
    return str(value)


def unknown_variables(settings_classes: Iterable[type[BaseSettings]], also_known: Iterable[str],
                      environ: Mapping[str, str] = os.environ, dotenv: Path = Path(".env")) -> list[str]:
    """A warning for each SHIZHEN_* variable that no setting reads, naming the closest one that does."""
    known = set(also_known)
    for settings in settings_classes:
        known.update(v for name, field in settings.model_fields.items() for v in _variables(settings, name, field))
    names = [name for name in environ if name.startswith("SHIZHEN_")]
    if dotenv.is_file():
        from dotenv import dotenv_values

        names += [f"{name} (in {dotenv})" for name in dotenv_values(dotenv) if name.startswith("SHIZHEN_")]
    warnings = []
    for name in names:
        variable = name.split(" ", 1)[0]
        if variable not in known:
            close = difflib.get_close_matches(variable, known, n=1)
            warnings.append(f"{name} is not a setting and is ignored" + (f"; did you mean {close[0]}?" if close
                                                                          else ""))
    return warnings


def warn(lines: Iterable[str]) -> None:
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


def _variables(settings: type[BaseSettings], name: str, field: FieldInfo) -> list[str]:
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str) and choice.isupper()]
    return [settings.model_config["env_prefix"] + name.upper()]


def _is_bool(field: FieldInfo) -> bool:
    return field.annotation is bool or field.annotation == bool | None


def _metavar(field: FieldInfo) -> str:
    annotation = field.annotation
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if optional else []
    inner = args[0] if len(args) == 1 else annotation
    if typing.get_origin(inner) is typing.Literal:
        return "{" + ",".join(typing.get_args(inner)) + "}"
    if inner is int:
        return "N"
    if inner is float:
        return "NUMBER"
    if inner is Path:
        return "PATH"
    if typing.get_origin(inner) is list:
        return "A,B"
    if typing.get_origin(inner) is dict:
        return "DEVICE=SIZE"
    return "TEXT"
