"""Emulator settings from outside input, derived from the config dataclasses' own fields.

``FaultConfig`` and ``EmulatorConfig`` are the one source of what can be set: the command-line
flags of ``wujie-async emulator``, the ``name=value`` pairs of ``--emulator-fault`` and JSON
mappings are all built from ``dataclasses.fields`` and the fields' types, so a field added to
the dataclass can be set everywhere at once, and nothing drifts.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from .. import _contract
from .._errors import InvalidRequestError
from ._state import EmulatorConfig, FaultConfig

_Config = TypeVar("_Config", EmulatorConfig, FaultConfig)

# Old spellings of flags, kept so that existing scripts go on working.
_ALIASES: dict[str, tuple[str, ...]] = {
    "rate_limit_rps": ("--rate-limit",),
    "moderation_words": ("--moderation-word",),
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Setting:
    """One settable field: its name, how to read a text value, and how to read JSON."""

    name: str
    kind: str  # bool, int, float, str, str-list (tuple or frozenset of str), choice, float-pair
    optional: bool
    container: type | None  # tuple or frozenset for list kinds
    default: Any
    help: str
    choices: tuple[str, ...] = ()  # the values of a Literal (kind "choice")

    def from_text(self, raw: str) -> Any:
        """The value of a command-line or ``name=value`` text; ValueError says the rule."""
        text = raw.strip()
        if self.optional and text.lower() in {"none", "null", ""}:
            return None
        if self.kind == "bool":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(f"expected true or false, got {raw!r}")
        if self.kind == "str-list":
            if text.startswith("["):
                return self.from_json(json.loads(text))
            assert self.container is not None
            return self.container(part.strip() for part in text.split(",") if part.strip())
        if self.kind == "str":
            return raw
        if self.kind == "choice":
            return self.from_json(text)
        if self.kind == "float-pair":
            if text.startswith("["):
                return self.from_json(json.loads(text))
            return self.from_json([_number("float", part) for part in text.split(",")])
        return self.from_json(_number(self.kind, text))

    def from_json(self, value: Any) -> Any:
        """The value of a JSON value (as ``json.loads`` gives it); ValueError says the rule."""
        if value is None and self.optional:
            return None
        if self.kind == "bool" and isinstance(value, bool):
            return value
        if self.kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if (
            self.kind == "float"
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        ):
            return float(value)
        if self.kind == "str" and isinstance(value, str):
            return value
        if self.kind == "choice" and value in self.choices:
            return value
        if (
            self.kind == "float-pair"
            and isinstance(value, list | tuple)
            and len(value) == 2
            and all(
                isinstance(item, int | float) and not isinstance(item, bool) and math.isfinite(item)
                for item in value
            )
        ):
            return (float(value[0]), float(value[1]))
        if self.kind == "str-list":
            if isinstance(value, str):
                return self.from_text(value)
            if isinstance(value, list) and all(isinstance(item, str) for item in value):
                assert self.container is not None
                return self.container(value)
        rule = {
            "bool": "true or false",
            "int": "a whole number",
            "float": "a finite number",
            "str": "a string",
            "str-list": "a list of strings (comma-separated)",
            "choice": "one of " + "|".join(self.choices),
            "float-pair": "two numbers LOW,HIGH",
        }[self.kind]
        raise ValueError(f"expected {rule}{' or none' if self.optional else ''}, got {value!r}")


def _number(kind: str, text: str) -> int | float:
    try:
        value = int(text) if kind == "int" else float(text)
    except ValueError:
        rule = "a whole number" if kind == "int" else "a finite number"
        raise ValueError(f"expected {rule}, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def _attribute_docs(cls: type) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Attributes:`` section, joined to one line."""
    docs: dict[str, str] = {}
    doc = inspect.getdoc(cls) or ""
    section = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    current = None
    for line in section.splitlines():
        entry = re.fullmatch(r" {4}(\w+): (.*)", line)
        if entry:
            current = entry.group(1)
            docs[current] = entry.group(2).strip()
        elif current and line.startswith(" " * 8):
            docs[current] += " " + line.strip()
        elif line.strip():
            current = None
    return docs


@functools.cache
def settings(cls: type) -> dict[str, _Setting]:
    """Every field of ``cls`` that text can set, by name (nested configs are left out)."""
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    found: dict[str, _Setting] = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        optional = False
        args = typing.get_args(hint)
        if isinstance(hint, types.UnionType) and type(None) in args:
            optional = True
            rest = [arg for arg in args if arg is not type(None)]
            hint = rest[0] if len(rest) == 1 else hint
        origin = typing.get_origin(hint)
        container: type | None = None
        choices: tuple[str, ...] = ()
        if hint in (bool, int, float, str):
            kind = hint.__name__
        elif origin in (tuple, frozenset) and typing.get_args(hint)[0] is str:
            kind, container = "str-list", origin
        elif origin is typing.Literal and all(isinstance(a, str) for a in typing.get_args(hint)):
            kind, choices = "choice", typing.get_args(hint)
        elif origin is tuple and typing.get_args(hint) == (float, float):
            kind = "float-pair"
        else:
            continue  # e.g. EmulatorConfig.faults: set through its own fields
        if field.default is not dataclasses.MISSING:
            default: Any = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        found[field.name] = _Setting(
            name=field.name,
            kind=kind,
            optional=optional,
            container=container,
            default=default,
            help=docs.get(field.name) or f"sets {cls.__name__}.{field.name}",
            choices=choices,
        )
    return found


def _build(cls: type[_Config], values: dict[str, Any], base: _Config | None) -> _Config:
    if base is None:
        return cls(**values)
    return dataclasses.replace(base, **values)


def fault_config_from_mapping(
    values: Mapping[str, Any], *, base: FaultConfig | None = None
) -> FaultConfig:
    """A FaultConfig from JSON-like values (``{"http_5xx": 0.1, "endpoints": ["info"]}``).

    Args:
        values: field names of FaultConfig and their values; lists stand for tuples and sets.
        base: the settings to change (default: every fault off).

    Raises:
        InvalidRequestError: an unknown name, a value of the wrong type or out of range, named.
    """
    known = settings(FaultConfig)
    violations: list[tuple[str, str]] = []
    parsed: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            violations.append((name, f"unknown fault setting; known: {', '.join(sorted(known))}"))
            continue
        try:
            parsed[name] = known[name].from_json(value)
        except ValueError as exc:
            violations.append((name, str(exc)))
    if violations:
        raise InvalidRequestError(violations)
    faults = _build(FaultConfig, parsed, base)
    check_faults(faults)
    return faults


def fault_config_from_pairs(
    pairs: Iterable[str], *, base: FaultConfig | None = None
) -> FaultConfig:
    """A FaultConfig from ``name=value`` texts, as ``--emulator-fault fail_jobs=0.1`` gives.

    Values are read by the field's type: numbers, ``true``/``false``, text, and lists as
    ``a,b`` or a JSON array (``endpoints=generations,info``, ``moderation_words=["x"]``).

    Args:
        pairs: ``name=value`` texts, names being FaultConfig fields.
        base: the settings to change (default: every fault off).

    Raises:
        InvalidRequestError: a malformed pair, unknown name or bad value, named with the rule.
    """
    known = settings(FaultConfig)
    violations: list[tuple[str, str]] = []
    parsed: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or name not in known:
            violations.append(
                (name or pair, f"{pair!r}: expected NAME=VALUE, NAME among {', '.join(known)}")
            )
            continue
        try:
            parsed[name] = known[name].from_text(raw)
        except ValueError as exc:
            violations.append((name, str(exc)))
    if violations:
        raise InvalidRequestError(violations)
    faults = _build(FaultConfig, parsed, base)
    check_faults(faults)
    return faults


def config_to_json(config: EmulatorConfig) -> dict[str, Any]:
    """EmulatorConfig as JSON-ready values (the inverse of ``emulator_config_from_json``)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | frozenset):
            return sorted(value) if isinstance(value, frozenset) else list(value)
        return value

    data = {name: plain(getattr(config, name)) for name in settings(EmulatorConfig)}
    data["faults"] = {name: plain(getattr(config.faults, name)) for name in settings(FaultConfig)}
    return data


def emulator_config_from_json(data: Mapping[str, Any]) -> EmulatorConfig:
    """EmulatorConfig from what ``config_to_json`` wrote.

    Raises:
        InvalidRequestError: an unknown name or a value of the wrong type.
    """
    known = settings(EmulatorConfig)
    values: dict[str, Any] = {}
    violations: list[tuple[str, str]] = []
    for name, value in data.items():
        if name == "faults":
            try:
                values["faults"] = fault_config_from_mapping(value)
            except InvalidRequestError as exc:  # named as EmulatorConfig(faults=...) names them
                violations += [(f"faults.{field}", rule) for field, rule in exc.violations]
        elif name not in known:
            violations.append((name, "unknown emulator setting"))
        else:
            try:
                values[name] = known[name].from_json(value)
            except ValueError as exc:
                violations.append((name, str(exc)))
    if violations:
        raise InvalidRequestError(violations)
    return EmulatorConfig(**values)


# --- command line -------------------------------------------------------------------------------
_CONFIG_DEST = "emulator_config__"
_FAULT_DEST = "emulator_fault__"


def _argument_type(setting: _Setting) -> Callable[[str], Any]:
    def read(raw: str) -> Any:
        try:
            return setting.from_text(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    read.__name__ = setting.kind  # argparse names the type in its messages
    return read


_LITERAL = re.compile(r"``([^`]+)``")


def _plain(text: str) -> str:
    """A docstring's text as command-line help: ``literals`` lose their backticks, and a
    setting's name reads as its flag."""

    def flag(found: re.Match[str]) -> str:
        name = found.group(1)
        if name in settings(EmulatorConfig) or name in settings(FaultConfig):
            return "--" + name.replace("_", "-")
        return name

    return _LITERAL.sub(flag, text)


def _add_setting(group: Any, setting: _Setting, dest_prefix: str) -> None:
    flag = "--" + setting.name.replace("_", "-")
    flags = [flag, *_ALIASES.get(setting.name, ())]
    default = setting.default
    shown = (
        (sorted(default) if isinstance(default, frozenset) else list(default))
        if (setting.kind == "str-list")
        else default
    )
    described = _plain(setting.help) if setting.help else ""
    text = f"{described} (default: {shown})" if described else f"(default: {shown})"
    text = text.replace("%", "%%")  # argparse formats help with %
    dest = dest_prefix + setting.name
    if setting.kind == "bool":
        group.add_argument(
            *flags, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
            help=text,
        )  # fmt: skip
    elif setting.kind == "str-list":
        group.add_argument(
            *flags, dest=dest, action="append", type=_argument_type(setting),
            default=argparse.SUPPRESS, metavar="A[,B...]",
            help=text + "; repeatable",
        )  # fmt: skip
    else:
        group.add_argument(
            *flags, dest=dest, type=_argument_type(setting), default=argparse.SUPPRESS,
            metavar=setting.name.upper(), help=text,
        )  # fmt: skip


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag for every EmulatorConfig and FaultConfig field, named after the field."""
    for setting in settings(EmulatorConfig).values():
        _add_setting(parser, setting, _CONFIG_DEST)
    faults = parser.add_argument_group(
        "faults (all off by default; probabilities are 0..1 per request or per job)"
    )
    for setting in settings(FaultConfig).values():
        _add_setting(faults, setting, _FAULT_DEST)


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The EmulatorConfig that the flags of ``add_config_arguments`` ask for."""
    given = vars(args)
    fault_values: dict[str, Any] = {}
    for name, setting in settings(FaultConfig).items():
        if _FAULT_DEST + name in given:
            value = given[_FAULT_DEST + name]
            if setting.kind == "str-list":  # repeated flags add up
                assert setting.container is not None
                value = setting.container(item for part in value for item in part)
            fault_values[name] = value
    values = {
        name: given[_CONFIG_DEST + name]
        for name in settings(EmulatorConfig)
        if _CONFIG_DEST + name in given
    }
    for name, setting in settings(EmulatorConfig).items():
        if setting.kind == "str-list" and name in values:
            assert setting.container is not None
            values[name] = setting.container(item for part in values[name] for item in part)
    return EmulatorConfig(**values, faults=FaultConfig(**fault_values))


# Settings that are probabilities (0-1), and numbers that may be below 0; every other number
# is a count, a duration or a factor, at least 0.
_PROBABILITIES = frozenset(
    {
        "http_5xx",
        "http_429",
        "drop_connection",
        "drop_after_accept",
        "slow_reply",
        "html_reply",
        "business_error",
        "absent_jobs",
        "duplicate_entries",
        "unknown_status",
        "fail_jobs",
        "end_without_result",
        "estimate_noise",
        "estimate_absent",
        "estimate_outliers",
        "images_gone",
        "cost_unreported",
        "cost_zero",
        "stale_duplicates",
        "numbers_as_text",
        "entries_missing",
        "cut_reply",
    }
)
_SIGNED = frozenset({"seed", "stamp_skew"})
_POSITIVE = frozenset({"time_scale", "batch_cap", "rate_limit_rps"})  # above 0


def _violations(config: EmulatorConfig | FaultConfig) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    cls: type = type(config)
    for name, setting in settings(cls).items():
        value = getattr(config, name)
        plain = sorted(value) if isinstance(value, set | frozenset) else value
        try:
            setting.from_json(list(plain) if isinstance(plain, tuple) else plain)
        except ValueError as exc:
            found.append((name, str(exc)))
            continue
        numbers = value if setting.kind == "float-pair" and value is not None else (value,)
        for number in numbers:
            if isinstance(number, bool) or not isinstance(number, int | float):
                continue
            if name in _PROBABILITIES and not 0 <= number <= 1:
                found.append((name, f"a probability, from 0 to 1; got {number!r}"))
            elif name in _POSITIVE and number <= 0:
                found.append((name, f"above 0; got {number!r}"))
            elif name not in _SIGNED and number < 0:
                found.append((name, f"at least 0; got {number!r}"))
    if isinstance(config, FaultConfig) and not found:
        found += _fault_violations(config)
    return found


def check_config(config: EmulatorConfig) -> None:
    """Refuse settings the emulator cannot run with, each named with its rule, before it
    starts (a wrong type used to fail deep inside a request handler, as an HTTP 500).

    Raises:
        InvalidRequestError: every setting that breaks a rule.
    """
    found: list[tuple[str, str]] = []
    if not isinstance(config, EmulatorConfig):
        raise InvalidRequestError([("config", f"an EmulatorConfig, got {type(config).__name__}")])
    found += _violations(config)
    pair = config.job_seconds
    if pair is not None and not any(name == "job_seconds" for name, _ in found):
        if pair[0] > pair[1]:
            found.append(("job_seconds", f"LOW at most HIGH; got {pair!r}"))
    share = config.queued_share
    if not any(name == "queued_share" for name, _ in found):
        if not 0.0 <= share[0] <= share[1] < 1.0:
            found.append(("queued_share", f"0 <= LOW <= HIGH < 1; got {share!r}"))
    if isinstance(config.faults, FaultConfig):
        found += [(f"faults.{name}", rule) for name, rule in _violations(config.faults)]
    else:
        found.append(
            (
                "faults",
                f"a FaultConfig, got {type(config.faults).__name__} "
                "(fault_config_from_mapping() reads a dict)",
            )
        )
    if found:
        raise InvalidRequestError(found)


def check_faults(faults: FaultConfig) -> None:
    """``check_config`` for fault settings changed while the emulator runs."""
    if not isinstance(faults, FaultConfig):
        raise InvalidRequestError([("faults", f"a FaultConfig, got {type(faults).__name__}")])
    found = _violations(faults)
    if found:
        raise InvalidRequestError(found)


# The endpoints a fault may apply to: every one, by default.
_ENDPOINTS = FaultConfig().endpoints


def _fault_violations(faults: FaultConfig) -> list[tuple[str, str]]:
    """What a fault setting of the right type still gets wrong: each would switch the fault
    off, or make it another one, without a word (a misspelled endpoint left every HTTP fault
    off; a 5xx fault with status 200 answered success)."""
    found: list[tuple[str, str]] = []
    unknown = sorted(str(name) for name in faults.endpoints if name not in _ENDPOINTS)
    if unknown:
        known = ", ".join(sorted(_ENDPOINTS))
        found.append(("endpoints", f"one or more of {known}; got {', '.join(unknown)}"))
    if not 500 <= faults.http_5xx_status <= 599:
        found.append(("http_5xx_status", f"from 500 to 599; got {faults.http_5xx_status!r}"))
    if not 200 <= faults.html_status <= 599:
        found.append(("html_status", f"from 200 to 599; got {faults.html_status!r}"))
    code = faults.business_error_code
    if not (code.isascii() and code.isdigit()) or code == _contract.SUCCESS_CODE:
        found.append(
            (
                "business_error_code",
                f"a numeric error code, not {_contract.SUCCESS_CODE}; got {code!r}",
            )
        )
    return found
