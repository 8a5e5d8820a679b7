"""Atomic file writes: a temporary file, fsynced, renamed over the target; every file with the same permissions.

Files get what ``open()`` gives a new file: ``0o666`` less the process's umask (0644 under the usual umask
022). safetensors' own ``save_file`` writes 0600, so tensors go through :func:`save_safetensors`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _sync_directory(path: Path) -> None:
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    temporary = _temporary(path)
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _sync_directory(path)


def umask() -> int:
    """The process's umask (read from ``/proc`` where it can be, so that it is never changed, even briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits of a new file: ``0o666`` less the umask, as ``open()`` would give it."""
    return 0o666 & ~umask()


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` written atomically (a temporary file renamed over ``path``), with the
    permissions of :func:`file_mode` rather than safetensors' 0600."""
    from safetensors.torch import save_file

    path = Path(path)
    temporary = _temporary(path)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _sync_directory(path)
