# Upstream roles chosen by pgguard: per-identity upstream users, a pinned SET ROLE, and
# ephemeral provisioned roles that are dropped at disconnect and after a crash.
import json
import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from conftest import HUMAN, HUMAN_PASSWORD

SECRET = "test-token-secret-0123456789abcdef-XYZ"


@pytest.fixture(scope="module", autouse=True)
def roles(pg):
    pg.execute("""
        DO $$BEGIN
          IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'readers') THEN
            CREATE ROLE readers NOLOGIN; GRANT readers TO app; END IF;
          IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agent_tpl') THEN
            CREATE ROLE agent_tpl NOLOGIN; END IF;
          IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rep_user') THEN
            CREATE ROLE rep_user LOGIN PASSWORD 'rep-pw'; END IF;
        END$$""")
    pg.execute("ALTER ROLE app CREATEROLE")


def test_identity_upstream_user_and_pinned_role(make_proxy):
    proxy = make_proxy(extra="""
[identities.reporter]
kind = "human"
password_env = "TEST_HUMAN_PASSWORD"
upstream_user = "rep_user"
upstream_password_env = "REP_PW"

[identities.pinned]
kind = "human"
password_env = "TEST_HUMAN_PASSWORD"
role = "readers"
""", env={"REP_PW": "rep-pw"})
    with psycopg.connect(proxy.dsn(user="reporter", password=HUMAN_PASSWORD),
                         autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("rep_user",)
    with psycopg.connect(proxy.dsn(user="pinned", password=HUMAN_PASSWORD),
                         autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("readers",)
        for sql in ("RESET ROLE", "SET ROLE app", "SET SESSION AUTHORIZATION app",
                    "SELECT set_config('role', 'app', false)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute(sql)
            assert "pinned-role" in str(e.value)
        assert conn.execute("SELECT current_user").fetchone() == ("readers",)
    # the plain human keeps the proxy's own role
    with psycopg.connect(proxy.dsn(user=HUMAN, password=HUMAN_PASSWORD)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)


def _issue(proxy, ttl):
    r = subprocess.run([sys.executable, "-m", "pgguard", "token", "issue", "-c",
                        str(proxy.config), "--identity", "bot", "--ttl", ttl, "--json"],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PGGUARD_TOKEN_SECRET=SECRET))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _ephemeral(pg):
    return {r[0] for r in pg.execute("SELECT rolname FROM pg_roles "
                                     "WHERE rolname LIKE 'pgguard\\_%'")}


def test_ephemeral_roles_created_dropped_and_cleaned_after_crash(pg, make_proxy, tmp_path):
    proxy = make_proxy(
        extra=f'[identities.bot]\nkind = "agent"\n\n[auth]\nstate_dir = "{tmp_path}/st"\n',
        upstream_extra='provision = true\ntemplate_role = "agent_tpl"',
        env={"PGGUARD_TOKEN_SECRET": SECRET})
    before = _ephemeral(pg)
    t = _issue(proxy, "15m")
    with psycopg.connect(t["dsn"], autocommit=True) as conn:
        (who,) = conn.execute("SELECT current_user").fetchone()
        assert who.startswith("pgguard_bot_")
        until = pg.execute("SELECT rolvaliduntil IS NOT NULL, pg_has_role(rolname, "
                           "'agent_tpl', 'member') FROM pg_roles WHERE rolname = %s", [who])
        assert until == [(True, True)]
    deadline = time.monotonic() + 5
    while who in _ephemeral(pg) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert who not in _ephemeral(pg), "the ephemeral role outlived its session"
    # a crash mid-session leaves the role; the janitor drops it at the next start
    t = _issue(proxy, "2s")
    conn = psycopg.connect(t["dsn"], autocommit=True)
    (who,) = conn.execute("SELECT current_user").fetchone()
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait()
    conn.close()
    time.sleep(2.5)
    assert who in _ephemeral(pg)
    proxy.start()
    deadline = time.monotonic() + 10
    while who in _ephemeral(pg) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ephemeral(pg) == before
