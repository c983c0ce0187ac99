"""What both command lines share (``vitlens`` in :mod:`vitlens.cli`, ``python -m vitlens.bench`` in
:mod:`vitlens.bench.cli`): the one-line argument parser and the ``main`` wrapper that turns every error
into one line on stderr with an exit code.

Exit codes: 0 success; 2 a usage or input error (:class:`~vitlens.errors.VitlensError`, an inaccessible
file); 1 an unexpected failure (a bug: ``--debug``, or ``VITLENS_DEBUG=1``, shows the traceback);
130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from .errors import InputError, VitlensError


class UsageError(VitlensError):
    """A command-line usage error (argparse's message, made one line)."""


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line (no usage block) and raise instead of exiting."""

    def error(self, message: str):  # noqa: D401 (argparse API)
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help).")


def one_line(msg) -> str:
    """``msg`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(msg).split())


def run_main(build_parser: Callable[[], argparse.ArgumentParser], argv: Optional[Sequence[str]] = None,
             prog: str = "vitlens") -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) with ``build_parser()`` and run the chosen command's
    ``func(args)``; every error becomes one line on stderr prefixed ``{prog}: error:`` (see the module
    docstring). ``--debug`` anywhere in ``argv`` re-raises instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("VITLENS_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as e:  # --help / --version (and sub-tools that exit)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except VitlensError as e:
        if debug:
            raise
        msg = one_line(e)
        print(msg if isinstance(e, UsageError) else f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the output folder is not writable
        if debug:
            raise
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"{prog}: error: cannot access{where}: {one_line(e.strerror or e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, with the way to the traceback
        if debug:
            raise
        print(f"{prog}: error: unexpected {type(e).__name__}: {one_line(e)} "
              "(run again with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


def check_device(device: Optional[str]) -> str:
    """The ``--device`` value checked (one line naming it), ``None``/``auto``: cuda when available, else cpu."""
    import torch

    from .models.loading import check_device as check_torch_device

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_torch_device(device)
    except InputError as e:
        raise InputError(f"--device {device}: {str(e).split(': ', 1)[-1]}") from None
    return device


def load_from_args(args):
    """The model of ``--model``/``--weights``/``--device`` (what ``explain``, ``demo`` and ``app`` load)."""
    from .models import load_model

    return load_model(args.model, weights=args.weights, device=check_device(args.device))
