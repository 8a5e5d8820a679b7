"""Ctrl-C during a compression: the first one asks to stop at the next safe point, a second one stops at once."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger("blockprune")


class InterruptGuard:
    """Turns the first Ctrl-C into a request to stop at the next safe point; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupt: stopping after the current stage (press Ctrl-C again to stop now)")

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
