"""One registry shape for methods and metrics: named entries with metadata declared at registration,
discovered one way (every public module of the entry package is imported once, see :meth:`Registry.discover`).

``vitlens.methods.base.register`` and ``vitlens.metrics.base.register_metric`` build their entries and add
them to a :class:`Registry`; registering a name a second time from a different function is an error
(a module re-imported by ``importlib.reload`` replaces its own entries). Lookups of an unknown name raise
:class:`~vitlens.errors.UnknownMethodError` with close matches.

The keyword arguments every entry takes besides its parameters (the *runtime* arguments, never part of
a parameter set, a run key or a protocol) are declared here once: :data:`METHOD_RUNTIME` and
:data:`METRIC_RUNTIME`.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Callable, Generic, Iterator, Protocol, TypeVar

from .errors import UnknownMethodError, did_you_mean

#: keyword arguments of every method function that are run settings, not method parameters
METHOD_RUNTIME: tuple[str, ...] = ("seed", "batch_size", "progress")
#: what :func:`vitlens.explain` takes on top of :data:`METHOD_RUNTIME` (applied around the method call)
EXPLAIN_RUNTIME: tuple[str, ...] = METHOD_RUNTIME + ("precision", "compile")
#: keyword arguments of metric functions that are run settings, not part of the protocol
METRIC_RUNTIME: tuple[str, ...] = ("batch_size", "progress", "precision", "compile")


class RegistryError(RuntimeError):
    """A programming error in a registration (a duplicate name, invalid metadata): raised at import."""


class Entry(Protocol):
    name: str
    fn: Callable


E = TypeVar("E", bound=Entry)


def keyword_defaults(fn: Callable, skip: tuple[str, ...] = ()) -> dict:
    """``{name: default}`` of ``fn``'s keyword-only parameters that have a default, minus ``skip``."""
    sig = inspect.signature(fn)
    return {k: p.default for k, p in sig.parameters.items()
            if p.kind == p.KEYWORD_ONLY and p.default is not inspect.Parameter.empty and k not in skip}


class Registry(Generic[E]):
    """Named entries of one kind (``"method"`` or ``"metric"``) living in the modules of ``package``.

    Args:
        what: the entry kind, for messages (``"method"``).
        package: dotted name of the package whose public modules register the entries.
    """

    def __init__(self, what: str, package: str):
        self.what = what
        self.package = package
        self._entries: dict[str, E] = {}
        self._discovered = False

    # ------------------------------------------------------------------ registration
    def add(self, entry: E) -> E:
        """Add ``entry``; a second entry under the same name from another function is an error."""
        old = self._entries.get(entry.name)
        if old is not None and _origin(old.fn) != _origin(entry.fn):
            raise RegistryError(f"{self.what} '{entry.name}' is registered twice: by {_origin(old.fn)} and by "
                                f"{_origin(entry.fn)}; give one of them another name.")
        self._entries[entry.name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Remove entry ``name`` if present (entries added at run time, e.g. by a test)."""
        self._entries.pop(name, None)

    def discover(self) -> None:
        """Import every public module of the package once (each registers its entries on import)."""
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_") and info.name != "base":
                importlib.import_module(f"{self.package}.{info.name}")

    # ------------------------------------------------------------------ lookups
    def get(self, name: str) -> E:
        """The entry ``name``; :class:`UnknownMethodError` naming close matches and the choices."""
        self.discover()
        if name not in self._entries:
            raise UnknownMethodError(f"unknown {self.what} '{name}'.{did_you_mean(name, self._entries)} "
                                     f"The available {self.what}s: {', '.join(sorted(self._entries))}.")
        return self._entries[name]

    def names(self) -> list[str]:
        """Sorted names of every entry."""
        self.discover()
        return sorted(self._entries)

    def entries(self) -> list[E]:
        """Every entry, sorted by name."""
        return [self._entries[k] for k in self.names()]

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[E]:
        return iter(self.entries())

    def __len__(self) -> int:
        self.discover()
        return len(self._entries)


def _origin(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
