"""Parameters given as text (``--param K=V``, ``--method-param M.K=V``, config files) converted to the
type the method's or metric's signature declares, with one-line errors naming the parameter.

The declared type is read from the function's type hints (``typing.get_type_hints``). Supported:
``int``, ``float``, ``bool``, ``str``, ``Optional[...]``, ``Union[...]`` (tried from the most specific
type: bool, int, float, sequences, str), ``tuple[int, int]`` and ``Sequence[int]`` / ``list[...]``
(``16,16`` or ``[16, 16]``). Parameters typed as tensors, callables or dicts cannot be given as text.
"""
from __future__ import annotations

import collections.abc
import json
import re
import typing
from typing import Any, Callable, Optional

from .errors import InputError, did_you_mean

_NONE = ("none", "null")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_INT = re.compile(r"[+-]?\d+")


class _Bad(Exception):
    """The value does not fit this type (internal)."""


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "none"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in args)
    if origin is tuple or hint is tuple:
        inner = [a for a in args if a is not Ellipsis]
        if inner and Ellipsis not in args:
            return f"{len(inner)} comma-separated values like " + ",".join("16" for _ in inner)
        return "comma-separated values like 16,16"
    if origin in (list, collections.abc.Sequence) or hint in (list, collections.abc.Sequence):
        return "comma-separated values like 0,1"
    return getattr(hint, "__name__", str(hint))


def _split(value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                v = json.loads(s)
            except json.JSONDecodeError:
                raise _Bad from None
            if isinstance(v, list):
                return v
        if "," in s:
            return [p.strip() for p in s.strip("()").split(",") if p.strip()]
    raise _Bad


def _convert(value, hint):
    """``value`` (text or an already-parsed JSON/TOML value) as ``hint``; raises :class:`_Bad`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is None:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    if hint is type(None):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        raise _Bad
    if origin is typing.Union:
        order = sorted(args, key=lambda a: [type(None), bool, int, float, tuple, list, str].index(a)
                       if a in (type(None), bool, int, float, tuple, list, str) else 5)
        for a in order:
            try:
                return _convert(value, a)
            except _Bad:
                continue
        raise _Bad
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _Bad
    if hint is int:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, int):
            return value
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value)
        raise _Bad
    if hint is float:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Bad from None
        raise _Bad
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Bad
    if origin is tuple or hint is tuple:
        items = _split(value)
        inner = [a for a in args if a is not Ellipsis]
        if inner and Ellipsis not in args:
            if len(items) != len(inner):
                raise _Bad
            return tuple(_convert(v, a) for v, a in zip(items, inner))
        return tuple(_convert(v, inner[0] if inner else Any) for v in items)
    if origin in (list, collections.abc.Sequence) or hint in (list, collections.abc.Sequence):
        items = _split(value) if not (isinstance(value, str) and _INT.fullmatch(value.strip())) else [value]
        return [_convert(v, args[0] if args else Any) for v in items]
    raise TypeError(hint)  # tensors, callables, dicts: not expressible as text


def type_hints(fn: Callable) -> dict:
    """The function's resolved type hints (``{}`` when they cannot be resolved)."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an unresolvable forward reference: fall back to untyped (JSON) parsing
        return {}


def convert_params(fn: Callable, params: dict, defaults: dict, *, owner: str, flag: str = "--param",
                   prefix: str = "", objects_ok: bool = False) -> dict:
    """``params`` converted to the declared types of ``fn``'s keyword parameters.

    ``defaults`` lists the accepted names (unknown names raise with close matches); ``owner`` names the
    method/metric in messages (``"method 'tis'"``); ``flag``/``prefix`` how the user wrote the option.
    ``objects_ok``: values from a config file or preset (already parsed): a value whose declared type has
    no text form (dict, tensor, callable) is passed through instead of refused."""
    hints = type_hints(fn)
    out = {}
    for name, value in params.items():
        if name not in defaults:
            accepted = ", ".join(sorted(defaults)) or "none"
            raise InputError(f"{flag} {prefix}{name}: unknown parameter '{name}' for {owner}."
                             f"{did_you_mean(name, defaults)} It accepts: {accepted}.")
        hint = hints.get(name, Any)
        try:
            out[name] = _convert(value, hint)
        except _Bad:
            shown = value if isinstance(value, str) else json.dumps(value)
            raise InputError(f"{flag} {prefix}{name}={shown}: parameter '{name}' of {owner} takes "
                             f"{_describe(hint)} (default {defaults[name]!r}).") from None
        except TypeError:
            if objects_ok and not isinstance(value, str):
                out[name] = value
                continue
            raise InputError(f"{flag} {prefix}{name}: parameter '{name}' of {owner} takes "
                             f"{_describe(hint)}, which cannot be given as text; use the Python API.") from None
    return out


def parse_kv(items, flag: str = "--param") -> dict:
    """``["k=v", ...]`` -> ``{"k": "v"}`` (values stay text; see :func:`convert_params`)."""
    out: dict[str, str] = {}
    for kv in items or []:
        if "=" not in kv or not kv.split("=", 1)[0].strip():
            raise InputError(f"{flag} expects KEY=VALUE, got '{kv}' (e.g. {flag} n_masks=32).")
        k, v = kv.split("=", 1)
        out[k.strip()] = v
    return out


def describe_default(v) -> str:
    return "None" if v is None else repr(v)


def signature_line(fn: Callable, defaults: dict, skip: Optional[set] = None) -> str:
    """``name: type = default`` for each parameter (for ``vitlens methods``)."""
    hints = type_hints(fn)
    parts = []
    for k, v in defaults.items():
        if skip and k in skip:
            continue
        h = hints.get(k)
        t = "" if h is None else ": " + _short(h)
        parts.append(f"{k}{t} = {describe_default(v)}")
    return ", ".join(parts)


def _short(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        s = " | ".join(_short(a) for a in non_none)
        return f"{s} | None" if len(non_none) < len(args) else s
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else _short(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))
