# Red team, round 17 (helper 79): two places read SQL text with a lexer of their own, and
# where it disagreed with Postgres' a statement was judged as another.
# - The decision cache's shape (sqlshape): E'a' <newline> '\' z ' is one string to
#   Postgres (a continued E-string keeps its escapes, \' is a quote inside it) and was a
#   literal, code and the start of another literal to the shape scanner, which then
#   swallowed what followed: a DELETE in a CTE ran under the cached decision of
#   "WITH a AS (SELECT ...) SELECT 1", unjudged (orders emptied).
# - The approval window's fingerprint (the audit normalizer): Postgres reads every
#   non-ASCII character as part of an identifier, so WITH €$b$ AS (...) is a CTE named
#   €$b$; the normalizer read $b$ ... $b$ as a dollar-quoted literal, and a window approved
#   for an INSERT covered a DELETE written around the same dollar tags.
# Judged by the rows upstream.
import psycopg
import pytest
from each_client import MODES, said
from test_approvals_prepared import (DB, approved_with_window, denied_when_asked,  # noqa: F401
                                     orders, statuses)
from test_approvals_wire import RULES
from test_policy_guard_cache import guarded, schema  # noqa: F401  (fixtures)

PRIMER = "WITH a AS (SELECT E'a'{sep}'\\' z ') SELECT 1 --'"
ATTACKS = {
    "cte-delete": "WITH a AS (SELECT E'a'{sep}'\\' z '), d AS (DELETE FROM gc_items "
                  "RETURNING 1) SELECT count(*) FROM d --'",
    "cte-update": "WITH a AS (SELECT E'a'{sep}'\\' z '), d AS (UPDATE gc_items SET name = "
                  "'x' RETURNING 1) SELECT count(*) FROM d --'",
    "cte-delete-like": "WITH a AS (SELECT E'a'{sep}'\\' z '), d AS (DELETE FROM gc_items "
                       "WHERE name LIKE 'n%' RETURNING 1) SELECT count(*) FROM d --'",
    "select-truncate-fn": "WITH a AS (SELECT E'a'{sep}'\\' z '), d AS (DELETE FROM gc_items "
                          "WHERE id > 0 RETURNING 1) SELECT 1 --'",
}
SEPARATORS = {"newline": "\n", "crlf": "\r\n", "comment-line": "\n-- note\n",
              "tab-newline": "\t\n\t"}


@pytest.mark.parametrize("sep", sorted(SEPARATORS))
@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("mode", MODES)
def test_a_continued_e_string_gets_no_cached_decision(guarded, pg, psql_bin, mode,  # noqa: F811
                                                      attack, sep):
    s = SEPARATORS[sep]
    primer, sql = PRIMER.format(sep=s), ATTACKS[attack].format(sep=s)
    before = pg.execute("SELECT id, name FROM gc_items ORDER BY id", dbname="appdb")
    said(mode, guarded, [primer, primer, sql], db="appdb", psql_bin=psql_bin)
    after = pg.execute("SELECT id, name FROM gc_items ORDER BY id", dbname="appdb")
    assert after == before, (mode, attack, sep)


WINDOW = "WITH {id}$b$ AS (SELECT 1) UPDATE orders SET status = 'ok' WHERE id = 10 --$b$\n;"
WINDOW_ATTACKS = [
    "WITH {id}$b$ AS (DELETE FROM orders WHERE id > 5 RETURNING 1) SELECT 1 --$b$\n;",
    "WITH {id}$b$ AS (UPDATE orders SET status = 'gone' RETURNING 1) SELECT 1 --$b$\n;",
    "WITH {id}$b$ AS (DELETE FROM orders WHERE id > 5 RETURNING 1) INSERT INTO orders "
    "VALUES (98, 'x') --$b$\n;",
    "WITH {id}$b$ AS (SELECT 1) DELETE FROM orders WHERE id = 10 --$b$\n;",
    "WITH {id}$b$ AS (UPDATE orders SET status = 'ok' WHERE id < 10 RETURNING 1) SELECT 1 "
    "--$b$\n;",
]


@pytest.mark.parametrize("ident", ["€", "★", "😀", "中"])
def test_a_window_covers_no_statement_the_lexer_reads_otherwise(pg, make_proxy, ident):
    aproxy = make_proxy(extra=RULES)
    primer = WINDOW.format(id=ident)
    with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
        approved_with_window(aproxy, lambda: psycopg.ClientCursor(c).execute(primer))
    want = statuses(pg)
    assert "ok" in want
    for tmpl in WINDOW_ATTACKS:
        sql = tmpl.format(id=ident)
        assert denied_when_asked(aproxy, sql) == ["42501"], sql
        assert statuses(pg) == want, sql


# (helper 84) the normalizer's \d matched non-ASCII digits: $１$ ... $１$ (a dollar quote
# to Postgres) read as a parameter, and a quote inside the body as a literal running on
# over code: an UPDATE approved with a window let a different UPDATE through unasked
DIGIT_WINDOW = ("UPDATE orders SET status = 'ok' WHERE id = (SELECT 10 WHERE {t}Henry "
                "O'Brien{t} IS NOT NULL) AND status = 'new' -- per Dana's ticket")
DIGIT_ATTACK = ("UPDATE orders SET status = 'gone' WHERE id = (SELECT 10 WHERE {t}Henry "
                "O'Brien{t} IS NOT NULL) OR id <= 5 AND status <> 'new' -- per Dana's ticket")


@pytest.mark.parametrize("digit", ["１", "٣", "५", "𝟙", "߂"])
def test_a_window_covers_no_statement_behind_a_unicode_digit_tag(pg, make_proxy, digit):
    aproxy = make_proxy(extra=RULES)
    pg.execute("UPDATE orders SET status = 'old' WHERE id <= 5", dbname=DB)
    tag = f"${digit}$"
    with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
        approved_with_window(aproxy, lambda: psycopg.ClientCursor(c).execute(
            DIGIT_WINDOW.format(t=tag)))
    want = statuses(pg)
    assert want.count("ok") == 1
    assert denied_when_asked(aproxy, DIGIT_ATTACK.format(t=tag)) == ["42501"]
    assert statuses(pg) == want
