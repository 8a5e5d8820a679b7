"""A work directory for long runs: finished work written atomically under a checksummed manifest."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import weakref
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from ..errors import BlockpruneError
from . import lock
from .atomic import write_atomically

logger = logging.getLogger("blockprune")

MANIFEST = "manifest.json"
VERSION = 1


def _index(name: str) -> int:
    return int(name.split("-")[1].split(".")[0])


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.\d+\.tmp")  # write_atomically's ".<name>.<pid>.tmp"


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of writes that were killed before their rename (the writer opens the workdir
    before it writes, so none of them is still being written)."""
    for stale in path.iterdir():
        if _TEMPORARY.fullmatch(stale.name) and stale.is_file():
            logger.info("workdir: removing %s, left by an interrupted write", stale)
            stale.unlink(missing_ok=True)


def _read_manifest(path: Path) -> dict[str, Any]:
    """The workdir manifest, checked: a damaged one raises :class:`BlockpruneError` saying what to do."""
    try:
        manifest = json.loads(path.read_text())
        problem = None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        manifest, problem = None, f"{type(error).__name__}: {error}"
    if problem is None:
        if not isinstance(manifest, dict):
            problem = f"it holds a {type(manifest).__name__}, not an object"
        elif manifest.get("version") != VERSION:
            problem = f"its version is {manifest.get('version')!r}, this blockprune reads version {VERSION}"
        elif not isinstance(manifest.get("key"), dict):
            problem = "it has no 'key' object"
        elif not isinstance(manifest.get("files"), dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in manifest["files"].items()
        ):
            problem = "it has no 'files' object mapping file names to checksums"
    if problem is not None:
        raise BlockpruneError(
            f"workdir {path.parent} has a damaged {MANIFEST} ({problem}); delete the folder to start over, or use a "
            f"new workdir"
        )
    return manifest


class Workdir:
    """Importance scores and finished stages of one ``compress`` call, resumable after an interruption.

    ``key`` holds everything the result depends on; a workdir made by a call with another key is refused.
    A file counts only once the manifest lists it with its checksum; the manifest is written last. Only a
    ``writer`` (rank 0 of a distributed launch) writes; the other ranks read what it wrote. The writer holds the
    folder's lock (:mod:`blockprune.runtime.lock`) until :meth:`close`, so a second process is refused.
    """

    def __init__(self, path: str | os.PathLike, key: dict[str, Any], writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        if self.path.exists() and not self.path.is_dir():
            raise BlockpruneError(f"workdir {self.path} is a file; pass a folder (a new one, or one written by a run)")
        self.path.mkdir(parents=True, exist_ok=True)
        self._release = None
        self._verified: set[str] = set()  # files whose checksum matched since this object opened the workdir
        if writer:  # the lock first: a second process must not delete the first one's files
            self._release = weakref.finalize(self, lock.release, lock.acquire(self.path))
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        if self.writer:
            _remove_stale_temporaries(self.path)
        manifest = self.path / MANIFEST
        if manifest.is_file():
            self.manifest = _read_manifest(manifest)
            if self.manifest["key"] != self.key:
                old = self.manifest.get("key", {})
                differing = sorted(k for k in set(old) | set(self.key) if old.get(k) != self.key.get(k))
                raise BlockpruneError(
                    f"workdir {self.path} belongs to another compress call (differs in: {', '.join(differing)}); "
                    f"use a new workdir, or delete this one to start over"
                )
        else:
            if any(p.name != lock.LOCK for p in self.path.iterdir()):
                raise BlockpruneError(f"workdir {self.path} is not empty and has no {MANIFEST}; choose an empty folder")
            self.manifest = {"version": VERSION, "key": self.key, "files": {}}
            self._commit()

    def close(self) -> None:
        """Give back the workdir's lock (also done when the object is collected or the process exits)."""
        if self._release is not None:
            self._release()

    def _commit(self) -> None:
        if self.writer:
            write_atomically(self.path / MANIFEST, json.dumps(self.manifest, indent=2).encode())

    def _write(self, name: str, data: bytes) -> None:
        if not self.writer:
            return
        write_atomically(self.path / name, data)
        self.manifest["files"][name] = _digest(self.path / name)
        self._verified.discard(name)
        self._commit()

    def _valid(self, name: str) -> bool:
        expected = self.manifest["files"].get(name)
        if expected is None:
            return False
        if name in self._verified:  # checked once while open: the lock keeps other runs from changing it
            return True
        path = self.path / name
        if path.is_file() and _digest(path) == expected:
            self._verified.add(name)
            return True
        logger.warning("workdir: %s is missing or damaged (checksum mismatch); it will be recomputed", path)
        self._forget_from(name)
        return False

    def _forget_from(self, name: str) -> None:
        """Unregister ``name`` and, as later stages depend on it, every stage and score file from its index on."""
        files = self.manifest["files"]
        files.pop(name, None)
        self._verified.discard(name)
        if name.startswith(("stage-", "scores-")):
            first = _index(name)
            for other in [f for f in files if f.startswith(("stage-", "scores-")) and _index(f) >= first]:
                del files[other]
                self._verified.discard(other)
        self._commit()

    def read_json(self, name: str) -> Any | None:
        """A JSON file of the workdir, or ``None`` if it was not finished or is damaged."""
        return json.loads((self.path / name).read_text()) if self._valid(name) else None

    def write_json(self, name: str, value: Any) -> None:
        """Write and register a JSON file."""
        self._write(name, json.dumps(value, indent=2, default=str).encode())

    def save_stage(self, index: int, record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Register stage ``index``: its tensors first, its record (which names them) last."""
        weights = f"stage-{index:03d}.safetensors"
        self._write(weights, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
        self.write_json(f"stage-{index:03d}.json", record)

    def load_stage(self, index: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """Stage ``index`` as saved, or ``None`` if it is not finished or any of its files is damaged."""
        weights = f"stage-{index:03d}.safetensors"
        if not self._valid(weights):
            return None
        record = self.read_json(f"stage-{index:03d}.json")
        if record is None:
            return None
        return record, load_file(self.path / weights)

    def has_stages(self, count: int) -> bool:
        """Whether stages ``0 … count − 1`` are all saved and intact (checksums verified)."""
        return all(self._valid(f"stage-{i:03d}.safetensors") and self._valid(f"stage-{i:03d}.json")
                   for i in range(count))

    def activations(self, index: int) -> Path:
        """The folder for stage ``index``'s spilled activation shards."""
        folder = self.path / "activations" / f"stage-{index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def drop_activations(self, index: int) -> None:
        """Delete stage ``index``'s activation shards."""
        if self.writer:
            shutil.rmtree(self.path / "activations" / f"stage-{index:03d}", ignore_errors=True)

    def disk_usage(self) -> int:
        """Bytes used by the workdir."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
