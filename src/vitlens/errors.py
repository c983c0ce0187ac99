"""Error types raised by vitlens.

Every user-facing problem (bad input, unsupported model, unknown method, missing file...) is
raised as a subclass of :class:`VitlensError` with a message that names the problem, so callers
can catch one type and users never see a stack trace from deep inside torch.
"""
from __future__ import annotations


class VitlensError(Exception):
    """Base class of every error vitlens raises on purpose."""


class InputError(VitlensError, ValueError):
    """The images, maps or targets given to vitlens are malformed."""


class UnsupportedModelError(VitlensError, TypeError):
    """The model cannot be wrapped by any adapter (or lacks what a method needs)."""


class UnknownMethodError(VitlensError, KeyError):
    """The requested explanation method or metric does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class TargetError(VitlensError, ValueError):
    """The requested target class / prompt cannot be resolved for this model."""


class WeightsError(VitlensError, FileNotFoundError):
    """Model weights could not be found or loaded."""


def did_you_mean(word: str, choices, n: int = 3, cutoff: float = 0.6) -> str:
    """`` Did you mean 'a' or 'b'?`` for the closest of ``choices`` to ``word`` (``""`` when none is close)."""
    import difflib

    choices = [str(c) for c in choices]
    hits = difflib.get_close_matches(str(word), choices, n=n, cutoff=cutoff)
    if not hits:  # a prefix / substring match catches truncated names difflib rates low
        low = str(word).lower()
        hits = [c for c in choices if low and (c.lower().startswith(low) or low in c.lower())][:n]
    if not hits:
        return ""
    quoted = [f"'{h}'" for h in hits]
    return " Did you mean " + (quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?"
