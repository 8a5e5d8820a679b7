"""What ``importance="auto"`` has worked out so far, kept in the workdir (``selection.json``) so that a selection
interrupted part-way resumes where it stopped: each signal's ranking and each checked plan's errors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..runtime import distributed

if TYPE_CHECKING:
    from ..runtime.workdir import Workdir

RECORD = "selection.json"


class SelectionRecord:
    """The signals' rankings and the checks' errors of one ``auto`` selection, written to the workdir after each new
    one (without a workdir it only lives in memory). The workdir's key holds every setting they depend on."""

    def __init__(self, workdir: Workdir | None) -> None:
        self.workdir = workdir
        saved = workdir.read_json(RECORD) if workdir is not None else None
        fresh = not (isinstance(saved, dict) and isinstance(saved.get("signals"), dict)
                     and isinstance(saved.get("checks"), dict))
        self.data: dict[str, dict[str, Any]] = {"signals": {}, "checks": {}} if fresh else saved
        if workdir is not None:
            distributed.barrier()  # every rank has read the record before rank 0 writes it again

    def signal(self, label: str) -> dict[str, Any] | None:
        """A signal's saved ``{"ranking": [...], "values": {...}}``, or ``None``."""
        return self.data["signals"].get(label)

    def add_signal(self, label: str, ranking: list[str], values: dict[str, float]) -> None:
        """Keep a signal's ranking and values."""
        self.data["signals"][label] = {"ranking": ranking, "values": values}
        self.save()

    def checks(self, check: str) -> dict[str, list[float]]:
        """The saved errors of one check (``"check"`` or ``"re-check"``) by plan, to be filled in by the caller."""
        return self.data["checks"].setdefault(check, {})

    def save(self) -> None:
        """Write the record to the workdir (only its writer writes)."""
        if self.workdir is not None:
            self.workdir.write_json(RECORD, self.data)
