"""Parameter controls generated from a method's declared parameters (no hand-written form per method).

A method's parameters are the keyword-only arguments with defaults that the registry records
(:attr:`vitlens.methods.base.MethodInfo.defaults`); their type hints are what :mod:`vitlens._params`
converts and checks. Each becomes one :class:`Control`:

* ``typing.Literal[...]`` -> ``"choice"`` (a dropdown of the listed values); ``Optional[Literal]`` and
  ``Optional[bool]`` add ``None`` to the choices (a checkbox cannot say "unset");
* ``bool`` -> ``"bool"`` (a checkbox);
* ``int`` / ``float`` -> ``"int"`` / ``"float"`` (a number box);
* anything else with a text form (``Optional[int]``, unions, ``LayersLike``, sequences, ``str``) ->
  ``"text"``, parsed by :func:`vitlens._params.convert_params` exactly as ``--param KEY=VALUE``; an empty
  box means ``None`` where the type allows it;
* types with no text form (tensors, callables, dicts) are skipped: they keep their defaults.

:func:`parse_values` turns the values the page sends back into the keyword arguments of
:func:`vitlens.explain` (only those that differ from the defaults), with the registry's one-line errors.
"""
from __future__ import annotations

import collections.abc
import typing
from dataclasses import dataclass
from typing import Any, Optional

from .._params import _describe, convert_params, type_hints
from ..errors import InputError

KINDS = ("choice", "bool", "int", "float", "text")
NONE_CHOICE = "None"


@dataclass(frozen=True)
class Control:
    """One parameter's control: ``kind`` (one of :data:`KINDS`), its initial ``value`` as the page holds it,
    ``choices`` (as shown, for ``"choice"``), whether ``None`` is allowed, and a ``help`` text (the type)."""

    method: str
    name: str
    kind: str
    default: Any
    value: Any
    choices: tuple = ()
    optional: bool = False
    help: str = ""

    @property
    def key(self) -> str:
        return f"{self.method}.{self.name}"


def _members(hint) -> tuple:
    if typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def has_text_form(hint) -> bool:
    """Whether every member of ``hint`` can be written as text (what ``--param`` accepts)."""
    if hint is Any or hint is type(None) or hint in (bool, int, float, str):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return True
    if origin is typing.Union:
        return all(has_text_form(a) for a in args)
    if origin is tuple or hint is tuple:
        return all(has_text_form(a) for a in args if a is not Ellipsis)
    if origin in (list, collections.abc.Sequence) or hint in (list, collections.abc.Sequence):
        return all(has_text_form(a) for a in args)
    return False


def _text(value) -> str:
    """A default as the text box shows it (``None`` -> empty; sequences comma-separated)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return str(value)


def _choice_text(value) -> str:
    return NONE_CHOICE if value is None else str(value)


def control_for(method: str, name: str, default, hint) -> Optional[Control]:
    """The control of one parameter (``None`` when its type has no text form)."""
    if hint is None:
        hint = Any
    if not has_text_form(hint):
        return None
    members = _members(hint)
    optional = type(None) in members
    rest = [m for m in members if m is not type(None)]
    help_ = _describe(hint)
    if len(rest) == 1 and typing.get_origin(rest[0]) is typing.Literal:
        choices = tuple(_choice_text(a) for a in typing.get_args(rest[0]))
        if optional:
            choices = (NONE_CHOICE,) + choices
        return Control(method, name, "choice", default, _choice_text(default), choices, optional, help_)
    if rest == [bool]:
        if optional:
            return Control(method, name, "choice", default, _choice_text(default), (NONE_CHOICE, "True", "False"),
                           True, help_)
        return Control(method, name, "bool", default, bool(default), (), False, help_)
    if rest == [int] and not optional and isinstance(default, int):
        return Control(method, name, "int", default, default, (), False, help_)
    if rest == [float] and not optional and isinstance(default, (int, float)):
        return Control(method, name, "float", default, float(default), (), False, help_)
    return Control(method, name, "text", default, _text(default), (), optional, help_)


def controls_for(info) -> list[Control]:
    """The controls of a registered method (:class:`~vitlens.methods.base.MethodInfo`), in signature order."""
    hints = type_hints(info.fn)
    out = []
    for name, default in info.defaults.items():
        c = control_for(info.name, name, default, hints.get(name))
        if c is not None:
            out.append(c)
    return out


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return type(a) is type(b) and a == b


def parse_values(info, controls: list[Control], values: list) -> dict:
    """The page's values of ``controls`` (same order) as keyword arguments of :func:`vitlens.explain`:
    converted and checked by the registry (one-line :class:`~vitlens.errors.InputError` naming the parameter
    and its type), and only those that differ from the defaults."""
    raw: dict = {}
    for c, v in zip(controls, values):
        if c.kind == "bool":
            raw[c.name] = bool(v)
        elif c.kind == "choice":
            raw[c.name] = None if v in (None, NONE_CHOICE) else str(v)
        elif c.kind in ("int", "float"):
            if v is None or (isinstance(v, str) and not v.strip()):
                raise InputError(f"parameter '{c.name}' of method '{c.method}' is empty: it takes {c.help} "
                                 f"(default {c.default!r}).")
            if c.kind == "int" and isinstance(v, float):
                if not v.is_integer():
                    raise InputError(f"parameter '{c.name}' of method '{c.method}' takes an integer "
                                     f"(default {c.default!r}); got {v!r}.")
                v = int(v)
            raw[c.name] = v if not isinstance(v, str) else v.strip()
        else:
            text = "" if v is None else str(v)
            if not text.strip():
                if c.optional:
                    raw[c.name] = None
                    continue
                if isinstance(c.default, str):
                    raw[c.name] = text
                    continue
            raw[c.name] = text.strip() if not isinstance(c.default, str) else text
    conv = convert_params(info.fn, {k: v for k, v in raw.items() if v is not None}, info.defaults,
                          owner=f"method '{info.name}'", flag=None, renamed=info.renamed,
                          old_values=info.old_values)
    conv.update({k: None for k, v in raw.items() if v is None})
    return {k: v for k, v in conv.items() if not _same(v, info.defaults[k])}
