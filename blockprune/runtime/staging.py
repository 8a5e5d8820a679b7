"""Writing a folder whole or not at all: into a temporary sibling, moved into place only once complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _move_into(staged: Path, target: Path, stale: list[str]) -> None:
    """Move every entry of ``staged`` into the existing folder ``target``, replacing same-named entries; the
    ``stale`` names (files of an earlier save that this one does not write) are removed first."""
    for name in stale:
        path = target / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for entry in sorted(staged.iterdir()):
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    staged.rmdir()


@contextlib.contextmanager
def staged_folder(target: Path, stale: list[str] | None = None) -> Iterator[Path]:
    """A temporary folder beside ``target`` to write into; on success its contents replace ``target``'s (a new
    ``target`` is renamed into place), on any error it is deleted and ``target`` stays as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.parent / f".{target.name}.blockprune-{uuid.uuid4().hex[:8]}.tmp"
    staged.mkdir()
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if target.exists():
        _move_into(staged, target, stale or [])
    else:
        os.replace(staged, target)
