# Failed-auth throttling: free until the threshold, then doubling delays, capped; bounded memory.
from __future__ import annotations

import pytest

from pgguard import config
from pgguard.auth.throttle import Throttle, address_key


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


def make(clock, **kw):
    args = dict(after=3, window=60.0, delay=1.0, max_delay=8.0)
    args.update(kw)
    return Throttle(clock=clock, **args)


def test_no_delay_below_the_threshold(clock):
    t = make(clock)
    assert t.delay_for("10.0.0.1") == 0.0
    t.record_failure("10.0.0.1")
    t.record_failure("10.0.0.1")
    assert t.delay_for("10.0.0.1") == 0.0
    assert t.failures("10.0.0.1") == 2


def test_doubling_then_capped(clock):
    t = make(clock)
    delays = []
    for _ in range(8):
        t.record_failure("10.0.0.1")
        d = t.delay_for("10.0.0.1")
        delays.append(d)
        clock.t += d                    # the attacker waits as told, then fails again
    assert delays == [0, 0, 1, 2, 4, 8, 8, 8]


def test_concurrent_attempts_are_spaced(clock):
    t = make(clock, after=1, delay=2.0, max_delay=30.0)
    t.record_failure("10.0.0.1")
    # five connections arrive at once: each waits a slot later than the one before
    assert [t.delay_for("10.0.0.1") for _ in range(5)] == [2, 4, 6, 8, 10]


def test_concurrent_delays_never_exceed_the_cap(clock):
    # (issue 13) beyond the cap an attempt is refused, never admitted early: 50
    # parallel connections get no more guesses than one every delay
    t = make(clock, after=1, delay=4.0, max_delay=8.0)
    t.record_failure("10.0.0.1")
    got = [t.delay_for("10.0.0.1") for _ in range(50)]
    admitted = [d for d in got if d is not None]
    assert admitted == [4.0, 8.0] and max(admitted) <= 8.0
    assert got.count(None) == 48


def test_addresses_are_independent(clock):
    t = make(clock, after=1)
    t.record_failure("10.0.0.1")
    assert t.delay_for("10.0.0.1") > 0
    assert t.delay_for("10.0.0.2") == 0.0


def test_success_clears(clock):
    t = make(clock, after=1)
    t.record_failure("10.0.0.1")
    t.record_success("10.0.0.1")
    assert t.delay_for("10.0.0.1") == 0.0 and t.failures("10.0.0.1") == 0


def test_window_forgets(clock):
    t = make(clock)
    t.record_failure("10.0.0.1")
    t.record_failure("10.0.0.1")
    clock.t += 61
    t.record_failure("10.0.0.1")       # the earlier two are outside the window
    assert t.failures("10.0.0.1") == 1 and t.delay_for("10.0.0.1") == 0.0
    for _ in range(3):
        t.record_failure("10.0.0.1")
    assert t.delay_for("10.0.0.1") > 0
    clock.t += 200                     # quiet for longer than the window
    assert t.delay_for("10.0.0.1") == 0.0 and len(t) == 0


def test_memory_is_bounded(clock):
    t = make(clock, max_entries=100)
    for i in range(10_000):
        t.record_failure(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert len(t) == 100
    # delay_for on unknown addresses never creates entries
    for i in range(1000):
        t.delay_for(f"192.168.{i >> 8}.{i & 255}")
    assert len(t) == 100


def test_address_keys():
    assert address_key(("10.0.0.7", 51515)) == "10.0.0.7"
    assert address_key("10.0.0.7") == "10.0.0.7"
    assert address_key(("2001:db8::1", 5, 0, 0)) == "2001:db8::/64"
    assert address_key("2001:db8::ffff:1") == address_key("2001:db8::2")
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("::ffff:10.0.0.7") == "10.0.0.7"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key(None) == "unix" and address_key("") == "unix"
    assert address_key("/tmp/.s.PGSQL.6432") == "/tmp/.s.PGSQL.6432"


def test_ipv6_neighbours_share_a_budget(clock):
    t = make(clock, after=2)
    t.record_failure(("2001:db8::1", 1, 0, 0))
    t.record_failure(("2001:db8::2", 1, 0, 0))
    assert t.delay_for(("2001:db8::3", 1, 0, 0)) > 0


def test_from_config(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('[auth]\nthrottle_after = 2\nthrottle_window = "1m"\n'
                 'throttle_delay = "500ms"\nthrottle_max_delay = "5s"\n')
    t = Throttle.from_config(config.load(f))
    assert (t.after, t.window, t.delay, t.max_delay) == (2, 60.0, 0.5, 5.0)
    defaults = Throttle.from_config(config.loads(""))
    assert (defaults.after, defaults.window, defaults.max_delay) == (5, 600.0, 30.0)


def test_disabled_with_zero_max_delay(clock):
    t = make(clock, after=0, max_delay=0.0)
    for _ in range(10):
        t.record_failure("10.0.0.1")
    assert t.delay_for("10.0.0.1") == 0.0


# -- issue 13: across parallel attempts and across worker processes
def test_shared_table_is_seen_by_forked_processes(clock):
    import os
    t = make(clock, after=1, delay=2.0, max_delay=30.0, shared=True)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            t.record_failure("10.0.0.9")
            code = 0 if t.failures("10.0.0.9") == 1 else 1
        finally:
            os._exit(code)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0
    # the child's failure counts here; the attempts are spaced across both processes
    assert t.failures("10.0.0.9") == 1
    assert [t.delay_for("10.0.0.9") for _ in range(3)] == [2.0, 4.0, 6.0]
    pid = os.fork()
    if pid == 0:
        os._exit(0 if t.delay_for("10.0.0.9") == 8.0 else 1)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0
    assert t.delay_for("10.0.0.9") == 10.0


@pytest.mark.parametrize("shared", [False, True])
def test_shared_and_local_behave_alike(clock, shared):
    t = make(clock, shared=shared)
    delays = []
    for _ in range(8):
        t.record_failure("10.0.0.1")
        d = t.delay_for("10.0.0.1")
        delays.append(d)
        clock.t += d
    assert delays == [0, 0, 1, 2, 4, 8, 8, 8]
    t.record_success("10.0.0.1")
    assert t.delay_for("10.0.0.1") == 0.0 and t.failures("10.0.0.1") == 0


def test_shared_table_memory_is_fixed(clock):
    t = make(clock, shared=True, max_entries=128)
    for i in range(5000):
        t.record_failure(f"10.1.{i >> 8 & 255}.{i & 255}")
    assert len(t) <= 128
    t.record_failure("10.9.9.9")
    assert t.failures("10.9.9.9") == 1


def test_a_success_forgives_only_its_own_names_failures(clock):
    # red team 20 (helper 110): a success cleared the address, so logging in with one's
    # own token after every few guesses at alice's password kept the throttle off
    t = make(clock)
    for _ in range(2):
        t.record_failure("10.0.0.9", name="alice")
    t.record_success("10.0.0.9", "bot")
    t.record_failure("10.0.0.9", name="alice")
    assert t.failures("10.0.0.9") == 3 and t.delay_for("10.0.0.9") > 0
    for _ in range(5):
        t.record_success("10.0.0.9", "bot")
        t.record_failure("10.0.0.9", name="alice")
    assert t.failures("10.0.0.9") == 8
    # a mistyped password of the name that then logs in is forgiven
    t2 = make(clock)
    for _ in range(2):
        t2.record_failure("10.0.0.8", name="bob")
    t2.record_failure("10.0.0.8", name="alice")
    t2.record_success("10.0.0.8", "bob")
    assert t2.failures("10.0.0.8") == 1
