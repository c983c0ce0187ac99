"""One runner per output folder (or per shard): a lock file holding the owner's pid and host.

``OUT/bench.lock`` guards an unsharded run; ``OUT/shards/results.shard-I-of-N.lock`` guards shard ``I``
(each torchrun rank is its own shard, so a launch of K ranks holds K shard locks and no folder lock).
An unsharded run and a sharded run on the same folder would compute the same work: each refuses to
start while the other kind holds a live lock.

The file is created atomically (``O_CREAT | O_EXCL``) and holds JSON: ``pid``, ``host``, ``started``
(Unix time), ``boot`` (the process's start time from ``/proc/PID/stat``, so a pid reused by another
process after a ``kill -9`` is not mistaken for the owner) and ``argv``. A lock is *stale* when its host
is this host and its pid is not alive (or is alive with another start time); a stale lock is removed
with a log line. A lock from another host cannot be checked: the runner refuses and says which file to
delete when no run is active there.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import InputError
from .shards import SHARD_DIR

FOLDER_LOCK = "bench.lock"


class LockedError(InputError):
    """Another live runner holds the lock of this output folder or shard."""


def _proc_start(pid: int) -> Optional[str]:
    """Field 22 (start time in clock ticks since boot) of ``/proc/PID/stat``; None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may contain spaces: split after the last ')'
    rest = stat.rsplit(")", 1)[-1].split()
    return rest[19] if len(rest) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def owner_alive(info: dict) -> Optional[bool]:
    """True/False for a lock of this host; None when the owner is on another host (cannot check)."""
    if info.get("host") != socket.gethostname():
        return None
    pid = int(info.get("pid", -1))
    if pid <= 0 or not _alive(pid):
        return False
    boot = info.get("boot")
    now = _proc_start(pid)
    if boot is not None and now is not None and str(boot) != now:
        return False  # the pid was reused by another process
    return True


def read_lock(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def describe(path: Path, info: Optional[dict]) -> str:
    if not info:
        return f"{path} (unreadable)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started", 0))))
    return f"pid {info.get('pid')} on host {info.get('host')} since {started} ({path})"


class RunLock:
    """``with RunLock(path, conflicts=[...], log=print):`` holds ``path`` for this process.

    ``conflicts``: lock files (or a callable returning them) of runs that must not run at the same time;
    a live one among them refuses the start as well. Release removes the file only if it is still ours.
    """

    def __init__(self, path: Path, conflicts: Sequence[Path] | Callable[[], Sequence[Path]] = (),
                 log: Optional[Callable[[str], None]] = None):
        self.path = Path(path)
        self.conflicts = conflicts
        self.log = log or (lambda s: print(s, file=sys.stderr))
        self.token: Optional[str] = None

    def _refuse(self, path: Path, info: Optional[dict], alive: Optional[bool]) -> LockedError:
        what = "another vitlens bench run is using" if path == self.path else "a conflicting run is using"
        where = self.path.parent.parent if self.path.parent.name == SHARD_DIR else self.path.parent
        tail = ("; wait for it to finish or stop it" if alive else
                f"; it cannot be checked from this host: if no run is active there, delete {path}")
        return LockedError(f"{what} {where}: {describe(path, info)}{tail}.")

    def _check_or_clear(self, path: Path) -> None:
        """Raise if ``path`` is held by a live (or uncheckable) owner; remove it if stale."""
        info = read_lock(path)
        if info is None:
            if not path.exists():
                return
            # a lock being written right now, or a corrupt file: give a writer a moment
            time.sleep(0.2)
            info = read_lock(path)
            if info is None:
                if path.exists():
                    self.log(f"vitlens bench: removing an unreadable lock file {path}")
                    path.unlink(missing_ok=True)
                return
        alive = owner_alive(info)
        if alive is False:
            self.log(f"vitlens bench: removing a stale lock ({describe(path, info)}: that process is gone)")
            path.unlink(missing_ok=True)
            return
        raise self._refuse(path, info, alive)

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conflicts = self.conflicts() if callable(self.conflicts) else self.conflicts
        for c in conflicts:
            if Path(c) != self.path and Path(c).exists():
                self._check_or_clear(Path(c))
        me = dict(pid=os.getpid(), host=socket.gethostname(), started=time.time(), boot=_proc_start(os.getpid()),
                  argv=sys.argv)
        self.token = f"{me['host']}:{me['pid']}:{me['started']}"
        me["token"] = self.token
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_or_clear(self.path)
                continue
            except OSError as e:  # pragma: no cover - e.g. a read-only folder
                if e.errno == errno.EROFS:
                    raise InputError(f"cannot write the lock file {self.path}: read-only file system.") from None
                raise
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            try:  # a conflicting run that started at the same moment: both refuse rather than both run
                for c in (self.conflicts() if callable(self.conflicts) else self.conflicts):
                    if Path(c) != self.path and Path(c).exists():
                        self._check_or_clear(Path(c))
            except LockedError:
                self.release()
                raise
            return self
        raise self._refuse(self.path, read_lock(self.path), True)

    def release(self) -> None:
        if self.token is None:
            return
        info = read_lock(self.path)
        if info is not None and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.token = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_paths(out: Path, shard_suffix: str) -> tuple[Path, Callable[[], list[Path]]]:
    """This run's lock file and a callable listing the lock files it conflicts with.

    Unsharded (``shard_suffix == ""``): ``OUT/bench.lock``, conflicting with every shard lock.
    Sharded: ``OUT/shards/results<suffix>.lock``, conflicting with the folder lock only (shards of one
    launch, or of several machines, run side by side by design).
    """
    out = Path(out)
    if not shard_suffix:
        return out / FOLDER_LOCK, lambda: sorted((out / SHARD_DIR).glob("results.shard-*.lock"))
    return out / SHARD_DIR / f"results{shard_suffix}.lock", lambda: [out / FOLDER_LOCK]
