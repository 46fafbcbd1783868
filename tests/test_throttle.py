"""LoginThrottle: delays, resets, expiry and bounded memory, with an explicit clock."""
from __future__ import annotations

import pytest

from rdsproxy.auth.throttle import LoginThrottle


def fail(t: LoginThrottle, address: str, times: int, now: float = 0.0) -> None:
    for _ in range(times):
        t.record_failure(address, now)


def test_no_delay_below_threshold():
    t = LoginThrottle(max_failures=5)
    assert t.delay_for("10.0.0.1", 0.0) == 0.0
    fail(t, "10.0.0.1", 4)
    assert t.delay_for("10.0.0.1", 1.0) == 0.0


def test_exponential_then_capped():
    t = LoginThrottle(max_failures=5, base_delay=0.5, max_delay=10.0)
    fail(t, "a", 5)
    delays = []
    for _ in range(8):
        delays.append(t.delay_for("a", 1.0))
        t.record_failure("a", 1.0)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_huge_failure_counts_stay_at_cap():
    t = LoginThrottle(max_failures=1, base_delay=0.5, max_delay=3.0)
    fail(t, "a", 5000)
    assert t.delay_for("a", 0.0) == 3.0


def test_guesses_are_bounded_whatever_the_parallelism():
    """40 connections from one address answering at once: only max_guesses passwords are
    checked, and a refused attempt keeps the address refused for a whole window."""
    t = LoginThrottle(max_failures=5, max_guesses=20, window=60.0)
    checked = 0
    for i in range(40):
        now = i * 0.01
        if t.may_check("a", now):
            checked += 1
            t.record_failure("a", now)
    assert checked == 20
    assert not t.may_check("a", 59.0)          # still trying: still refused
    assert not t.may_check("a", 118.0)         # each refusal restarted the window
    assert t.may_check("a", 118.0 + 60.0)      # quiet for a whole window: forgotten
    assert t.may_check("b", 1.0)               # other addresses never notice


def test_a_success_does_not_forgive_failures():
    t = LoginThrottle(max_failures=2, max_guesses=3)
    for now in (0.0, 0.1, 0.2):
        t.record_failure("a", now)
    assert not t.may_check("a", 0.3)


def test_addresses_are_independent():
    t = LoginThrottle(max_failures=2)
    fail(t, "a", 5)
    assert t.delay_for("a", 0.0) > 0
    assert t.delay_for("b", 0.0) == 0.0


def test_window_forgets_old_failures():
    t = LoginThrottle(max_failures=3, window=60.0)
    fail(t, "a", 3, now=100.0)
    assert t.delay_for("a", 159.9) > 0
    assert t.delay_for("a", 160.0) == 0.0
    assert len(t) == 0


def test_window_slides_with_each_failure():
    t = LoginThrottle(max_failures=3, window=60.0)
    for now in (0.0, 50.0, 100.0):  # never 60 s apart: the count keeps growing
        t.record_failure("a", now)
    assert t.delay_for("a", 150.0) > 0
    assert t.delay_for("a", 161.0) == 0.0


def test_expiry_drops_stale_entries_of_other_addresses():
    t = LoginThrottle(window=10.0)
    for i in range(100):
        t.record_failure(f"10.0.0.{i}", float(i) / 10)
    assert len(t) == 100
    t.delay_for("x", 1000.0)
    assert len(t) == 0


def test_table_is_capped_with_oldest_evicted():
    t = LoginThrottle(max_failures=1, window=1e9, max_entries=1000)
    for i in range(5000):
        t.record_failure(f"addr{i}", float(i))
    assert len(t) == 1000
    assert t.delay_for("addr0", 5000.0) == 0.0       # evicted
    assert t.delay_for("addr4999", 5000.0) > 0       # kept


def test_refailing_address_is_not_the_oldest():
    t = LoginThrottle(max_failures=1, window=1e9, max_entries=3)
    t.record_failure("a", 0.0)
    t.record_failure("b", 1.0)
    t.record_failure("c", 2.0)
    t.record_failure("a", 3.0)   # a is now the most recent
    t.record_failure("d", 4.0)   # evicts b
    assert t.delay_for("a", 5.0) > 0
    assert t.delay_for("b", 5.0) == 0.0
    assert len(t) == 3


def test_default_cap_is_100k():
    assert LoginThrottle().max_entries == 100_000


@pytest.mark.parametrize("kwargs", [dict(max_failures=0), dict(window=0), dict(base_delay=-1),
                                    dict(base_delay=5, max_delay=1), dict(max_entries=0)])
def test_invalid_parameters(kwargs):
    with pytest.raises(ValueError):
        LoginThrottle(**kwargs)
