# A read-only token's write that a rule sends to a human is refused at once as read-only
# (an approval could not make it run: the session cannot leave read-only mode), through
# every client; judged by the rows upstream and by the approval queue staying empty.
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from each_client import MODES, said

SECRET = "test-token-secret-0123456789abcdef-RO-APPROVE"
EXTRA = """
[identities.robot]
kind = "agent"
groups = ["agents"]

[auth]
state_dir = "{state}"

[[rules]]
name = "ro-items-need-approval"
when = {{ kind = "agent", statements = ["insert", "update", "delete"], relations = ["public.ro_items"] }}
action = "approve"
"""
WRITES = [
    "UPDATE ro_items SET name = 'x' WHERE id = 1",
    "DELETE FROM ro_items WHERE id = 2",
    "INSERT INTO ro_items VALUES (3, 'three')",
    "WITH w AS (UPDATE ro_items SET name = 'y' WHERE id = 1 RETURNING id) SELECT * FROM w",
    "UPDATE ro_items SET name = name || '!'",
]


@pytest.fixture(scope="module")
def rproxy(pg, tmp_path_factory):
    from conftest import Proxy
    tmp = tmp_path_factory.mktemp("roapprove")
    p = Proxy(pg, tmp, extra=EXTRA.format(state=tmp / "state"),
              env={"PGGUARD_TOKEN_SECRET": SECRET}).start()
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def items(pg):
    pg.execute("DROP TABLE IF EXISTS ro_items; "
               "CREATE TABLE ro_items (id int PRIMARY KEY, name text); "
               "INSERT INTO ro_items VALUES (1, 'one'), (2, 'two'); "
               "GRANT ALL ON ro_items TO PUBLIC", dbname="appdb")


def readonly_token(proxy) -> tuple[str, str]:
    r = subprocess.run([sys.executable, "-m", "pgguard", "token", "issue", "-c",
                        str(proxy.config), "--json", "--identity", "robot", "--scope",
                        "readonly", "--database", "appdb"],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PGGUARD_TOKEN_SECRET=SECRET))
    assert r.returncode == 0, r.stderr
    dsn = json.loads(r.stdout)["dsn"]
    user, token = dsn.split("://", 1)[1].split("@", 1)[0].split(":", 1)
    return user, token


def pending_approvals(proxy) -> list:
    return proxy.api("GET", "/api/approvals?state=pending")


@pytest.mark.parametrize("mode", MODES)
def test_readonly_write_needing_approval_is_refused_at_once(pg, rproxy, psql_bin, mode):
    user, token = readonly_token(rproxy)
    t0 = time.monotonic()
    out = said(mode, rproxy, WRITES, db="appdb", psql_bin=psql_bin, user=user,
               password=token, extended_at=None)
    assert time.monotonic() - t0 < 30            # nobody was asked: no wait for a human
    assert out.count('rule "readonly-scope"') == len(WRITES), out
    assert pg.execute("SELECT id, name FROM ro_items ORDER BY id", dbname="appdb") == [
        (1, "one"), (2, "two")]
    assert pending_approvals(rproxy) == []
