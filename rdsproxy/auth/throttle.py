"""Per-address login throttling: growing answer delays after repeated failures, bounded memory, sans-IO."""
from __future__ import annotations

from collections import OrderedDict

__all__ = ["LoginThrottle"]


class _Entry:
    __slots__ = ("failures", "last")

    def __init__(self, now: float):
        self.failures = 0
        self.last = now


class LoginThrottle:
    """Tracks failed logins per client address; the caller passes `now` (any monotonic clock).

    An address with fewer than `max_failures` failures inside the sliding `window` gets no
    delay; from then on each further attempt is delayed base_delay * 2**(failures - max_failures),
    capped at max_delay. Once it has `max_guesses` failures, `may_check` says no: its further
    attempts are refused without looking at the password, and each one restarts the window,
    so however many connections it opens at once it learns nothing from more than
    `max_guesses` guesses until it stops for a whole window. A success forgives nothing
    (one good account must not launder guesses at others). Failures older than `window`
    (counted from the latest attempt) are forgotten. The table holds at most `max_entries`
    addresses; when full, the address that failed least recently is dropped.
    """

    def __init__(self, max_failures: int = 5, window: float = 60.0, base_delay: float = 0.5,
                 max_delay: float = 10.0, max_entries: int = 100_000, max_guesses: int = 20):
        if (max_failures < 1 or window <= 0 or base_delay < 0 or max_delay < base_delay
                or max_entries < 1 or max_guesses < max_failures):
            raise ValueError("invalid LoginThrottle parameters")
        self.max_guesses = max_guesses
        self.max_failures = max_failures
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_entries = max_entries
        # Ordered by last failure time (oldest first), so expiry and eviction pop from the front.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self):
        """The table itself (read-only use): the relay's login lane leaves the addresses
        in it to the engine's path, which asks may_check."""
        return self._entries

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            entry = next(iter(entries.values()))
            if now - entry.last < self.window:
                break
            entries.popitem(last=False)

    def delay_for(self, address: str, now: float) -> float:
        """Seconds to wait before answering this address's next login attempt."""
        self._expire(now)
        entry = self._entries.get(address)
        if entry is None or entry.failures < self.max_failures:
            return 0.0
        excess = entry.failures - self.max_failures
        if excess >= 64:  # avoid building huge floats; long since at the cap
            return self.max_delay
        return min(self.max_delay, self.base_delay * (2 ** excess))

    def record_failure(self, address: str, now: float) -> None:
        self._expire(now)
        entry = self._entries.pop(address, None)
        if entry is None:
            while len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)   # evict the least recently failing address
            entry = _Entry(now)
        entry.failures += 1
        # Clocks only move forward for callers, but never let an entry travel back in time.
        entry.last = max(entry.last, now)
        self._entries[address] = entry

    def may_check(self, address: str, now: float) -> bool:
        """Whether this address's next password may be checked at all."""
        self._expire(now)
        entry = self._entries.get(address)
        if entry is None or entry.failures < self.max_guesses:
            return True
        entry.last = max(entry.last, now)     # still at it: the window starts again
        self._entries.move_to_end(address)
        return False
