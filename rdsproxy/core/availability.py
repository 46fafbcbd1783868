"""AvailabilityPercentage as RDS Proxy defines it: the share of time a target was available
in its role over a trailing window, from a record of its state changes.

The record starts at the target's first health verdict (AVAILABLE or UNAVAILABLE): the
moments before it are not known either way, and are left out of the window rather than
counted as down. Times are time.monotonic() seconds unless the caller passes its own.
"""
from __future__ import annotations

import time
from collections import deque

# History older than this is dropped on every change, whatever window is asked for.
KEEP = 3600.0


class AvailabilityRecord:
    """When one target was available: (time, available) at each change, oldest first;
    the first entry is the state the window's start falls in."""

    __slots__ = ("changes",)

    def __init__(self):
        self.changes: deque = deque()

    def record(self, available: bool, now: float | None = None) -> None:
        """The target's state is now `available` (a repeat of the current one is ignored)."""
        if now is None:
            now = time.monotonic()
        changes = self.changes
        if changes and changes[-1][1] == available:
            return
        changes.append((now, available))
        self._forget(now - KEEP)

    def _forget(self, before: float) -> None:
        # Drop an entry once the next one began before `before`: it can no longer matter.
        changes = self.changes
        while len(changes) > 1 and changes[1][0] <= before:
            changes.popleft()

    def percentage(self, window: float, now: float | None = None) -> float | None:
        """The share, in percent, of the last `window` seconds (or of the time since the
        first verdict, when shorter) in which the target was available; None before it."""
        if now is None:
            now = time.monotonic()
        changes = self.changes
        if not changes:
            return None
        start = max(now - window, changes[0][0])
        if now <= start:
            return 100.0 if changes[-1][1] else 0.0
        up = 0.0
        for i, (began, available) in enumerate(changes):
            if not available:
                continue
            ended = changes[i + 1][0] if i + 1 < len(changes) else now
            up += max(0.0, min(ended, now) - max(began, start))
        return 100.0 * up / (now - start)
