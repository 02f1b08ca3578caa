"""Typed pass options: a dataclass per pass, filled from pipeline text or Python values and validated.

Values from pipeline text arrive as strings or (nested) lists of strings; each is converted by the
dataclass field's type annotation. Unknown keys and values of the wrong type raise PipelineError naming
the pass, the option, what was expected, and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Literal, Union

from slimfx.errors import PipelineError, did_you_mean

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


def option_fields(options_cls: type) -> dict[str, dataclasses.Field]:
    """The dataclass fields of an options class, by name."""
    return {f.name: f for f in dataclasses.fields(options_cls)}


def option_types(options_cls: type) -> dict[str, Any]:
    """Resolved type annotations of an options class."""
    return typing.get_type_hints(options_cls)


def type_name(tp: Any) -> str:
    """A readable name for an option type: 'float', 'one of l1|l2', 'list[int]'."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + "|".join(str(m.value) for m in tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list[{', '.join(type_name(a) for a in args)}]"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any) -> Any:
    """Convert ``value`` (text token, list of tokens, or a Python value) to type ``tp``; ValueError if not."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return convert(value, arg)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{value!r} is not {type_name(tp)}")
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in _NONE):
            return None
        raise ValueError(f"{value!r} is not none")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ValueError(f"{value!r} is not one of {'|'.join(map(str, choices))}"
                         f"{did_you_mean(str(value), [str(c) for c in choices])}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member or value == member.value or value == member.name:
                return member
        raise ValueError(f"{value!r} is not one of {'|'.join(str(m.value) for m in tp)}")
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"{value!r} needs exactly {len(args)} items")
            return tuple(convert(v, a) for v, a in zip(items, args))
        item_tp = args[0] if args else Any
        converted = [convert(v, item_tp) for v in items]
        return tuple(converted) if origin is tuple else converted
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{value!r} is not a bool (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not an int")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
        raise ValueError(f"{value!r} is not an int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{value!r} is not a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{value!r} is not a string")
    raise ValueError(f"options of type {tp!r} are not supported")


def build_options(pass_name: str, options_cls: type, raw: dict[str, Any]) -> Any:
    """Instantiate ``options_cls`` from raw values, raising PipelineError on unknown/mistyped options."""
    fields = option_fields(options_cls)
    hints = option_types(options_cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            valid = ", ".join(fields) or "(this pass takes no options)"
            raise PipelineError(
                f"pass {pass_name!r} has no option {key!r}{did_you_mean(key, fields)}; valid options: {valid}"
            )
        try:
            kwargs[key] = convert(value, hints[key])
        except ValueError as exc:
            raise PipelineError(
                f"option {key!r} of pass {pass_name!r} expects {type_name(hints[key])}: {exc}"
            ) from None
    try:
        return options_cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"invalid options for pass {pass_name!r}: {exc}") from None


def raw_value(value: Any) -> Any:
    """A typed option value as a raw pipeline value: text, or a tuple for lists (inverse of :func:`convert`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return tuple(raw_value(v) for v in value)
    return str(value)
