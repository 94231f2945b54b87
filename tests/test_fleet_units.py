# The fleet's pieces on their own: [control] config errors, the shared cancel key, the
# throttle's per-instance share, the revocation list's grace, the metrics' instance label.
from __future__ import annotations

import time

import pytest

from pgguard import config
from pgguard.approvals.metrics import Registry
from pgguard.auth.throttle import Throttle
from pgguard.proxy.cancel import CancelKeyCipher
from pgguard.control.revocations import PgRevocationWatcher, RevocationsUnavailable
from pgguard.errors import ConfigError
from pgguard.proxy.server import shared_cancel_key


# ---------------------------------------------------------------- [control] config

@pytest.mark.parametrize("body, key, words", [
    ('schema = "Bad-Name"', "control", "lower-case SQL identifier"),
    ('schema = "x; DROP TABLE t"', "control", "lower-case SQL identifier"),
    ('instance_ttl = "1s"\nheartbeat_interval = "2s"', "control", "longer than"),
    ('revocation_grace = "soon"', "control", "invalid duration"),
    ('dsn_env = ""', "control", "environment variable"),
    ('grace = "1m"', "control.grace", "unknown key"),
    ('connect_timeout = 2', "control.connect_timeout", "Expected `str`"),
])
def test_control_config_errors_name_the_key(body, key, words):
    with pytest.raises(ConfigError) as e:
        config.loads(f"[control]\n{body}\n")
    assert key in e.value.message and words in e.value.message, e.value.message


def test_control_config_defaults():
    cfg = config.loads("[control]\n")
    c = cfg.control
    assert (c.dsn_env, c.schema, c.revocation_grace) == ("PGGUARD_CONTROL_DSN",
                                                         "pgguard_control", "60s")
    assert config.loads("").control is None


# ---------------------------------------------------------------- the shared cancel key

def test_cancel_key_is_the_same_on_every_instance(monkeypatch):
    monkeypatch.setenv("K", "a-secret-of-some-length")
    a = config.loads('[listen]\nport = 7001\ncancel_key_env = "K"\n')
    b = config.loads('[listen]\nport = 7002\ncancel_key_env = "K"\n')
    ka, kb = shared_cancel_key(a), shared_cancel_key(b)
    assert ka == kb and len(ka) == 32
    pid, secret = CancelKeyCipher(ka).encode(4242, 0xDEADBEEF)
    assert CancelKeyCipher(kb).decode(pid, secret) == (4242, 0xDEADBEEF)


@pytest.mark.parametrize("value", [None, "", "short", "fifteen-bytes!!"])
def test_cancel_key_refuses_unset_or_short_secrets(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("K", raising=False)
    else:
        monkeypatch.setenv("K", value)
    cfg = config.loads('[listen]\ncancel_key_env = "K"\n')
    with pytest.raises(ConfigError) as e:
        shared_cancel_key(cfg)
    assert "listen.cancel_key_env" in e.value.message


def test_cancel_key_differs_with_the_secret(monkeypatch):
    cfg = config.loads('[listen]\ncancel_key_env = "K"\n')
    monkeypatch.setenv("K", "secret-number-one-000")
    k1 = shared_cancel_key(cfg)
    monkeypatch.setenv("K", "secret-number-two-000")
    assert shared_cancel_key(cfg) != k1
    assert shared_cancel_key(config.loads("")) is None     # not configured: random per start


# ---------------------------------------------------------------- throttle share

class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def _delays(t: Throttle, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(t.delay_for("10.0.0.9"))
        t.record_failure("10.0.0.9")
    return out


@pytest.mark.parametrize("fleet, first_delay_at, first_delay", [
    (1, 5, 1.0),        # one instance: as before
    (2, 3, 2.0),        # ceil(5/2) failures, delays twice as wide
    (3, 2, 3.0),
    (5, 1, 5.0),
    (10, 1, 10.0),
])
def test_throttle_divides_the_limit_by_the_fleet(fleet, first_delay_at, first_delay):
    t = Throttle(after=5, window=600, delay=1.0, max_delay=30.0, clock=Clock(), shared=False)
    t.set_fleet(fleet)
    d = _delays(t, first_delay_at + 1)
    assert d[:first_delay_at] == [0.0] * first_delay_at
    assert d[first_delay_at] == pytest.approx(first_delay)


def test_throttle_fleet_never_below_one_and_capped():
    t = Throttle(after=5, window=600, delay=1.0, max_delay=4.0, clock=Clock(), shared=False)
    t.set_fleet(0)
    assert t.fleet == 1
    t.set_fleet(100)
    assert t._penalty(1) == 4.0 and t._penalty(0) == 0.0


# ---------------------------------------------------------------- revocation grace

class FakeLink:
    schema = "s"

    def __init__(self) -> None:
        self.up = False
        self.down_since: float | None = time.monotonic()
        self.last_error = "connection refused"

    def subscribe(self, name, cb) -> None:
        pass

    def on_state(self, cb) -> None:
        pass


def test_revocations_refused_before_any_list_was_read():
    w = PgRevocationWatcher(FakeLink(), grace_s=60)
    with pytest.raises(RevocationsUnavailable) as e:
        w.is_revoked("t1")
    assert "never reached" in e.value.reason and e.value.sqlstate == "28P01"


def test_revocations_current_list_while_up():
    link = FakeLink()
    w = PgRevocationWatcher(link, grace_s=60)
    link.up, link.down_since = True, None
    w._apply(frozenset({"gone"}), time.monotonic())
    assert w.is_revoked("gone") and not w.is_revoked("fine")


def test_revocations_last_list_kept_within_the_grace():
    link = FakeLink()
    w = PgRevocationWatcher(link, grace_s=60)
    w._apply(frozenset({"gone"}), time.monotonic())
    link.down_since = time.monotonic() - 59
    assert w.is_revoked("gone") and not w.is_revoked("fine")


def test_revocations_refused_past_the_grace():
    link = FakeLink()
    w = PgRevocationWatcher(link, grace_s=60)
    w._apply(frozenset(), time.monotonic())
    link.down_since = time.monotonic() - 61
    with pytest.raises(RevocationsUnavailable) as e:
        w.is_revoked("fine")
    assert "revocation_grace" in e.value.reason


def test_revocations_pushed_ids_notify_watchers():
    link = FakeLink()
    w = PgRevocationWatcher(link, grace_s=60)
    w._apply(frozenset(), time.monotonic())
    seen = []
    w.watch("t9", seen.append)
    w._apply(frozenset({"t9"}), None)       # a NOTIFY: added, not replacing
    w._apply(frozenset({"t8"}), None)
    assert seen == ["t9"] and w.is_revoked("t9") and w.is_revoked("t8")
    w._apply(frozenset({"t8"}), time.monotonic())   # a full resync replaces
    assert not w.is_revoked("t9", fresh=False)


# ---------------------------------------------------------------- metrics label

def test_every_series_carries_the_instance_label():
    r = Registry("eu-1")
    r.counter("pgguard_x_total", "x", labels=("decision",)).inc(decision="allowed")
    r.gauge("pgguard_y", "y").set(2)
    r.histogram("pgguard_z_seconds", "z", buckets=(1.0,)).observe(0.5)
    r.gauge("pgguard_cb", "cb", fn=lambda: 7)

    def broken():
        raise RuntimeError("control database unreachable")
    r.gauge("pgguard_broken", "b", fn=broken)
    series = [line for line in r.render().splitlines() if not line.startswith("#")]
    assert series and all('instance="eu-1"' in line for line in series), series
    assert 'pgguard_x_total{instance="eu-1",decision="allowed"} 1' in series
    assert not any(line.startswith("pgguard_broken") for line in series)
    plain = Registry()
    plain.gauge("pgguard_y", "y").set(2)
    assert "pgguard_y 2" in plain.render()
