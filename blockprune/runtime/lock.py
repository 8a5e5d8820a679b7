"""A work directory's lock: one writing process at a time, its file naming the holder (pid and host).

A lock whose holder ran on this host and is no longer running (killed, crashed) is stale and taken over. One
held by a process on another host cannot be checked from here: the error says who holds it and how to clear it.
Within one process a folder may be opened more than once; the lock goes when the last of them closes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import BlockpruneError

logger = logging.getLogger("blockprune")

LOCK = "lock.json"
_held: dict[tuple[int, Path], tuple[str, int]] = {}  # (pid, lock path) → (our token, how many opens hold it)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (assumed so where it cannot be told)."""
    if os.name == "nt":  # os.kill(pid, 0) would signal the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The holder recorded in ``path``; ``None`` if the file is gone, still being written, or damaged."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str):
        return holder
    return None


def _claim(path: Path, token: str) -> bool:
    """Create ``path`` naming this process, if no lock file exists; whether it was created."""
    try:
        handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "token": token,
              "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    with os.fdopen(handle, "w") as stream:
        stream.write(json.dumps(holder))
        stream.flush()
        os.fsync(stream.fileno())
    return True


def _take_over(path: Path, stale: dict[str, Any]) -> None:
    """Remove the stale lock ``stale``, unless another process replaced it in the meantime."""
    moved = path.with_name(f".{LOCK}.{os.getpid()}.tmp")  # removed with the stale temporaries if we die here
    try:
        os.replace(path, moved)
    except FileNotFoundError:
        return  # another process took it over first
    if _read(moved) != stale:  # a live lock claimed since we read the stale one: put it back
        os.replace(moved, path)
        return
    moved.unlink()
    logger.warning("workdir: took over the lock of process %s, which is no longer running", stale["pid"])


def _held_by_other(path: Path, holder: dict[str, Any] | None) -> BlockpruneError:
    folder = path.parent
    if holder is None:
        return BlockpruneError(
            f"workdir {folder} has an unreadable lock file {path.name}; if no other process uses this workdir, "
            f"delete {path} and run again"
        )
    since = f" since {holder['since']}" if isinstance(holder.get("since"), str) else ""
    return BlockpruneError(
        f"workdir {folder} is in use by process {holder['pid']} on host {holder['host']}{since}; wait for it to "
        f"finish or use another workdir (two runs in one workdir would delete each other's files). If that "
        f"process is no longer running, delete {path}"
    )


def acquire(folder: Path) -> Path:
    """Take the lock of ``folder`` for this process (again, if it holds it already); returns the lock file."""
    path = folder / LOCK
    key = (os.getpid(), path.resolve())
    if key in _held:
        token, count = _held[key]
        _held[key] = (token, count + 1)
        return path
    token = uuid.uuid4().hex
    for attempt in range(20):
        if _claim(path, token):
            _held[key] = (token, 1)
            return path
        holder = _read(path)
        if holder is None:  # just created and not yet written, or just removed: look again shortly
            time.sleep(0.05)
            continue
        here = holder["host"] == socket.gethostname()
        if here and (holder["pid"] == os.getpid() or not _alive(holder["pid"])):  # our pid: a lock of an earlier life
            _take_over(path, holder)
            continue
        raise _held_by_other(path, holder)
    raise _held_by_other(path, _read(path))


def release(path: Path) -> None:
    """Give back one hold of the lock ``path``; the file goes with the last one (and only if it is still ours)."""
    key = (os.getpid(), path.resolve())
    if key not in _held:
        return
    token, count = _held.pop(key)
    if count > 1:
        _held[key] = (token, count - 1)
        return
    holder = _read(path)
    if holder is not None and holder.get("token") == token:
        path.unlink(missing_ok=True)
