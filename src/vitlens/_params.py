"""Parameters given as text (``--param K=V``, ``--method-param M.K=V``, config files) converted to the
type the method's or metric's signature declares, with one-line errors naming the parameter.

The declared type is read from the function's type hints (``typing.get_type_hints``). Supported:
``int``, ``float``, ``bool``, ``str``, ``typing.Literal[...]`` (a choice: the value must be one of the
listed ones; this is how methods and metrics declare their choices, and the only check of them),
``Optional[...]``, ``Union[...]`` (tried from the most specific type: None, bool, choices, int, float,
sequences, str), ``tuple[int, int]`` and ``Sequence[int]`` / ``list[...]`` (``16,16`` or ``[16, 16]``).
Parameters typed as tensors, callables or dicts cannot be given as text.

The same conversion checks the keyword arguments of the Python API (:func:`vitlens.explain`,
``objects_ok=True``): values already of the declared type pass unchanged, a choice outside its
``Literal`` or a value of the wrong type is a one-line :class:`~vitlens.errors.InputError` naming the
parameter, and a parameter name (or value) of an earlier release gets an error naming its replacement.
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
#: an integer written as text (shared with the command line's ``--target``)
INT_TEXT = re.compile(r"[+-]?\d+")


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
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
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
    if origin is typing.Literal:
        for a in args:
            if value == a and type(value) is type(a):
                return a
            if isinstance(value, str) and not isinstance(a, str) and value.strip() == str(a):
                return a
        raise _Bad
    if origin is typing.Union:
        def rank(a) -> int:
            if typing.get_origin(a) is typing.Literal:
                return 2
            order = [type(None), bool, None, int, float, tuple, list, str]
            return order.index(a) if a in order else 6
        order = sorted(args, key=rank)
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
        if isinstance(value, str) and INT_TEXT.fullmatch(value.strip()):
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
        items = _split(value) if not (isinstance(value, str) and INT_TEXT.fullmatch(value.strip())) else [value]
        return [_convert(v, args[0] if args else Any) for v in items]
    raise TypeError(hint)  # tensors, callables, dicts: not expressible as text


def type_hints(fn: Callable) -> dict:
    """The function's resolved type hints (``{}`` when they cannot be resolved)."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an unresolvable forward reference: fall back to untyped (JSON) parsing
        return {}


def check_param_names(params, defaults: dict, *, owner: str, flag: Optional[str] = None, prefix: str = "",
                      renamed: Optional[dict] = None) -> None:
    """One-line :class:`InputError` for the first name of ``params`` that ``defaults`` lacks: a name of an
    earlier release (``renamed``: old -> new) is named with its replacement, any other gets close matches
    and the accepted names. ``flag``/``prefix`` say how the user wrote it (``--param``), ``None``: the API."""
    from .registry import EXPLAIN_RUNTIME

    for name in params:
        if name in defaults:
            continue
        where = f"{flag} {prefix}{name}: " if flag else ""
        if name in EXPLAIN_RUNTIME:
            raise InputError(f"{where}'{name}' is a run setting, not a parameter of {owner}: give it as "
                             f"{name}= of vitlens.explain, or --{name.replace('_', '-')} on the command line.")
        if renamed and name in renamed:
            raise InputError(f"{where}parameter '{name}' of {owner} is now '{renamed[name]}'"
                             f"{_RENAMED_HINTS.get(renamed[name], '')}.")
        accepted = ", ".join(sorted(defaults)) or "none"
        raise InputError(f"{where}unknown parameter '{name}' for {owner}.{did_you_mean(name, defaults)} "
                         f"It accepts: {accepted}.")


#: what a renamed parameter now takes, appended to the message naming it
_RENAMED_HINTS = {"layers": " (which blocks: None = all, an int n = the last n, a float f = the last ceil(f * L), "
                            "a list = those blocks; start_layer=s is layers=[s, ..., L-1])",
                  "site": " (the hook site: 'norm1', 'input', 'attn_branch', ...)"}


def convert_params(fn: Callable, params: dict, defaults: dict, *, owner: str, flag: Optional[str] = "--param",
                   prefix: str = "", objects_ok: bool = False, renamed: Optional[dict] = None,
                   old_values: Optional[dict] = None) -> dict:
    """``params`` converted to the declared types of ``fn``'s keyword parameters.

    ``defaults`` lists the accepted names (unknown names raise with close matches; ``renamed`` maps names
    of earlier releases to their new names, ``old_values`` values a parameter no longer takes to their
    replacement, both for the message); ``owner`` names the method/metric in messages (``"method 'tis'"``);
    ``flag``/``prefix`` how the user wrote the option (``flag=None``: keyword arguments of the Python API).
    ``objects_ok``: values already parsed (a config file, a preset, the Python API): a value whose declared
    type has no text form (dict, tensor, callable) is passed through instead of refused."""
    check_param_names(params, defaults, owner=owner, flag=flag, prefix=prefix, renamed=renamed)
    hints = type_hints(fn)
    out = {}
    for name, value in params.items():
        hint = hints.get(name, Any)
        shown = value if isinstance(value, str) else _show(value)
        where = f"{flag} {prefix}{name}={shown}: " if flag else ""
        olds = (old_values or {}).get(name, {})
        if isinstance(value, str) and value in olds:
            raise InputError(f"{where}{name}={value!r} of {owner} is now {name}={olds[value]!r}.")
        try:
            out[name] = _convert(value, hint)
        except _Bad:
            got = "" if flag else f"; got {value!r}"
            raise InputError(f"{where}parameter '{name}' of {owner} takes {_describe(hint)} "
                             f"(default {defaults[name]!r}){got}.") from None
        except TypeError:
            if objects_ok and not isinstance(value, str):
                out[name] = value
                continue
            where = f"{flag} {prefix}{name}: " if flag else ""
            raise InputError(f"{where}parameter '{name}' of {owner} takes "
                             f"{_describe(hint)}, which cannot be given as text; use the Python API.") from None
    return out


def _show(value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


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
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        s = " | ".join(_short(a) for a in non_none)
        return f"{s} | None" if len(non_none) < len(args) else s
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else _short(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))
