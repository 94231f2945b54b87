# Round 20 (helper 107, a DBA's mistakes): a rule value that can never match (a misspelled
# statement kind, a group no identity is in, a database the upstream does not serve)
# switched the rule off without a word, and the agent's DELETE ran unasked; an empty
# password file let anyone log in as that identity with an empty password; a mask on a
# misspelled column masked nothing, silently. The first two are refused by `pgguard
# check` and `pgguard serve`, naming the key; the last is logged when serve starts.
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, Proxy, free_port

from pgguard import config
from pgguard.errors import ConfigError

IDENTS = ('[identities.bot]\nkind = "agent"\ngroups = ["agents"]\n'
          '[identities.ann]\nkind = "human"\ngroups = ["dba"]\n')


def check(tmp_path, text):
    f = tmp_path / "pgguard.toml"
    f.write_text(text)
    return subprocess.run([sys.executable, "-m", "pgguard", "check", "-c", str(f)],
                          capture_output=True, text=True)


def _rule(when: str) -> str:
    return f'[[rules]]\nname = "r"\naction = "approve"\nwhen = {{ {when} }}\n'


@pytest.mark.parametrize("text, message", [
    (IDENTS + _rule('statements = ["insert", "update", "delet"]'),
     "rules[0].when.statements[2]: unknown statement kind 'delet' (did you mean delete"),
    (IDENTS + _rule('statements = ["DROPP"]'),
     "rules[0].when.statements[0]: unknown statement kind 'DROPP' (did you mean drop"),
    (IDENTS + _rule('statements = ["ddl"]'), "rules[0].when.statements[0]: unknown statement"),
    (IDENTS + _rule('groups = ["agent"]'),
     "rules[0].when.groups[0]: no identity is in group 'agent' (groups: agents, dba)"),
    (IDENTS + '[upstream]\ndatabases = ["shop"]\n' + _rule('databases = ["Shop"]'),
     "rules[0].when.databases[0]: 'Shop' matches none of upstream.databases (shop)"),
    (IDENTS + '[upstream]\ndatabases = ["shop", "crm"]\n' + _rule('databases = ["sh?pp*"]'),
     "rules[0].when.databases[0]: 'sh?pp*' matches none of upstream.databases"),
])
def test_a_rule_value_that_never_matches_is_refused(tmp_path, text, message):
    r = check(tmp_path, text)
    assert r.returncode == 1, r.stdout
    assert message in r.stderr, r.stderr
    with pytest.raises(ConfigError, match="rules\\[0\\]"):
        config.loads(text)


@pytest.mark.parametrize("when", [
    'statements = ["INSERT", "update", "delete", "merge", "copy", "create", "drop"]',
    'groups = ["agents"]', 'databases = ["sh*"]', 'databases = ["shop"]',
])
def test_values_that_match_pass(tmp_path, when):
    r = check(tmp_path, IDENTS + '[upstream]\ndatabases = ["shop"]\n' + _rule(when))
    assert r.returncode == 0, r.stderr


def test_groups_are_not_checked_when_an_oidc_provider_gives_them(tmp_path):
    text = IDENTS + ('[auth.oidc]\nissuer = "https://id.example.com"\naudience = "pgguard"\n'
                     'jwks_file = "jwks.json"\n') + _rule('groups = ["from-the-idp"]')
    try:
        cfg = config.loads(text)
    except ConfigError as e:            # (some other key of the OIDC table is required)
        assert "groups" not in str(e), e
    else:
        assert cfg.rules[0].when.groups == ["from-the-idp"]


def test_every_kind_the_classifier_reports_is_known():
    from pgguard.policy.classify import classify
    texts = ["SELECT 1", "INSERT INTO t VALUES (1)", "UPDATE t SET a = 1", "DELETE FROM t",
             "MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE", "COPY t TO STDOUT",
             "CREATE TABLE x (a int)", "ALTER TABLE t ADD b int", "DROP TABLE t",
             "TRUNCATE t", "GRANT SELECT ON t TO r", "REVOKE SELECT ON t FROM r",
             "GRANT r TO s", "BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT s", "RELEASE s",
             "SET x.y = 1", "RESET ALL", "SHOW work_mem", "VACUUM t", "ANALYZE t",
             "LOCK TABLE t", "CLUSTER t", "REINDEX TABLE t", "REFRESH MATERIALIZED VIEW v",
             "COMMENT ON TABLE t IS 'x'", "DO $$BEGIN END$$", "CALL p()", "EXPLAIN SELECT 1",
             "PREPARE p AS SELECT 1", "EXECUTE p", "DEALLOCATE p", "DECLARE c CURSOR FOR "
             "SELECT 1", "FETCH c", "MOVE c", "CLOSE c", "LISTEN x", "UNLISTEN x",
             "NOTIFY x", "DISCARD ALL", "CHECKPOINT", "LOAD 'x'", "PREPARE TRANSACTION 'x'",
             "COMMIT PREPARED 'x'", "ROLLBACK PREPARED 'x'", "REASSIGN OWNED BY a TO b",
             "SECURITY LABEL ON TABLE t IS 'x'", "START TRANSACTION",
             "SET CONSTRAINTS ALL DEFERRED", "CREATE INDEX ON t (a)", "ALTER TABLE t RENAME TO u"]
    seen = set()
    for text in texts:
        for st in classify(text):
            seen.add(st.kind)
            seen.update(st.kinds or ())
    assert seen <= config.STATEMENT_KINDS, seen - config.STATEMENT_KINDS
    assert len(seen) >= 45, seen


@pytest.mark.parametrize("secret", ["", "\n", "   \n", "\r\n"])
def test_an_empty_password_file_is_refused(tmp_path, secret):
    (tmp_path / "ann.pw").write_text(secret)
    r = check(tmp_path, IDENTS.replace('groups = ["dba"]\n',
                                       'groups = ["dba"]\npassword_file = "ann.pw"\n'))
    assert r.returncode == 1
    assert "identities.ann.password_file: the secret is empty" in r.stderr, r.stderr


def test_serve_refuses_an_empty_password(tmp_path):
    # the variable is set, to nothing: serve does not start, saying which key
    port = free_port()
    f = tmp_path / "p.toml"
    f.write_text(f'[listen]\nport = {port}\n[upstream]\nsslmode = "disable"\n'
                 + IDENTS.replace('groups = ["dba"]\n',
                                  'groups = ["dba"]\npassword_env = "PGG_T_EMPTY"\n'))
    r = subprocess.run([sys.executable, "-m", "pgguard", "serve", "-c", str(f)],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PGG_T_EMPTY=""))
    assert r.returncode != 0
    assert "identities.ann.password_env: the secret is empty" in r.stderr + r.stdout
    with pytest.raises(OSError):         # nothing listens there
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_an_empty_password_never_logs_in(pg, tmp_path):
    # an identity with a password: the empty one is refused, like any wrong one
    p = Proxy(pg, tmp_path).start()
    try:
        with pytest.raises(Exception):
            rawpg.RawClient.connect(p.port, AGENT, "")
        with psycopg.connect(p.dsn(AGENT, AGENT_PASSWORD)) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
    finally:
        p.stop()


def test_a_mask_on_no_column_is_logged_at_start(pg, tmp_path):
    pg.execute("DROP TABLE IF EXISTS mtypo; CREATE TABLE mtypo (id int, email text)")
    extra = ('[[masks]]\ncolumn = "public.mtypo.emial"\n'
             '[[masks]]\ncolumn = "public.mtypoo.email"\n'
             '[[masks]]\ncolumn = "public.mtypo.email"\n')
    p = Proxy(pg, tmp_path, extra=extra, upstream_extra='databases = ["postgres"]').start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "masks[1].column" not in p.output():
            time.sleep(0.2)
        out = p.output()
        assert "masks[0].column: 'public.mtypo.emial' matches no column in database " \
               "postgres: table public.mtypo has no column 'emial' (its columns: id, email)" \
               in out, out[-3000:]
        assert "masks[1].column: 'public.mtypoo.email' matches no column in database " \
               "postgres: database postgres has no table public.mtypoo" in out, out[-3000:]
        assert "masks[2]" not in out
    finally:
        p.stop()


def test_output_piped_to_head_ends_quietly(tmp_path):
    # (round 20, helper 107: `pgguard explain ... | head -3` printed a BrokenPipeError
    # traceback)
    f = tmp_path / "pgguard.toml"
    f.write_text(IDENTS)
    sql = "; ".join(f"SELECT {i}" for i in range(3000))     # more than a pipe holds
    r = subprocess.run(f"{sys.executable} -m pgguard explain -c {f} --identity bot "
                       f"'{sql}' | head -1", shell=True, capture_output=True, text=True)
    assert r.stdout.strip() and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, \
        r.stderr


def test_check_says_what_serve_would_refuse(tmp_path):
    base = "[listen]\nport = 7001\n"
    r = check(tmp_path, base + '[admin]\nport = 7001\ntoken_env = "X"\n')
    assert r.returncode == 1 and "admin.port: 7001 is listen.port too" in r.stderr, r.stderr
    r = check(tmp_path, base + 'tls_cert = "nope.crt"\ntls_key = "nope.key"\n')
    assert r.returncode == 1 and "listen.tls_cert: no such file" in r.stderr, r.stderr
    text = IDENTS + '[auth]\ntoken_secret_env = "PGG_T_SECRET"\n'
    f = tmp_path / "t.toml"
    f.write_text(text)
    run = [sys.executable, "-m", "pgguard", "check", "-c", str(f)]
    r = subprocess.run(run, capture_output=True, text=True,
                       env=dict(os.environ, PGG_T_SECRET="short"))
    assert r.returncode == 1 and "too short" in r.stderr, r.stderr
    env = {k: v for k, v in os.environ.items() if k != "PGG_T_SECRET"}
    r = subprocess.run(run, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "bot, ann can log in only with tokens" in r.stderr, r.stderr


def test_a_cte_sees_only_the_ctes_before_it():
    # (regression hunt 108) the classifier took a later sibling CTE's name for the CTE
    from pgguard.policy.classify import classify

    def reads(sql):
        return classify(sql)[0].relations_read
    assert "public.customers" in reads(
        "WITH a AS (SELECT ssn FROM customers), customers AS (SELECT 1) SELECT * FROM a")
    assert "public.customers" not in reads(
        "WITH customers AS (SELECT 1 x), a AS (SELECT x FROM customers) SELECT * FROM a")
    assert "public.customers" not in reads(
        "WITH RECURSIVE a AS (SELECT 1 FROM customers), customers AS (SELECT 1) "
        "SELECT * FROM a")
    assert "public.customers" in reads(
        "WITH a AS (WITH b AS (SELECT ssn FROM customers), customers AS (SELECT 2) "
        "SELECT * FROM b) SELECT * FROM a")
    assert "public.customers" in reads(
        "INSERT INTO t WITH a AS (SELECT ssn FROM customers), customers AS (SELECT 1) "
        "SELECT * FROM a")
