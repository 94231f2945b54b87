# Red team, round 18 (helper 92): the statement size limit was checked by the classifier,
# after the decision caches: a 60 MB `SELECT '<a's>'` ran because `SELECT 'x'` had been
# judged before and both have one shape (literals blanked). A text past the limit is
# judged as itself now, in the compiled pipe's cache and in Python's. Judged by what ran
# upstream (a row inserted by a function the long statement calls).
import asyncio

import asyncpg
import psycopg
import pytest
from conftest import AGENT, AGENT_PASSWORD, run_psql
from rawpg import SYNC, RawClient, bind, errors, execute, parse

LIMIT = 20_000


@pytest.fixture(scope="module")
def sproxy(pg, tmp_path_factory):
    from conftest import Proxy
    pg.execute("DROP TABLE IF EXISTS size_marks; CREATE TABLE size_marks (n int);"
               "GRANT ALL ON size_marks TO PUBLIC;"
               "CREATE OR REPLACE FUNCTION size_mark(t text) RETURNS int LANGUAGE sql AS "
               "$$ INSERT INTO size_marks VALUES (length(t)) RETURNING 1 $$",
               dbname="appdb")
    p = Proxy(pg, tmp_path_factory.mktemp("size-shapes"))
    p.config.write_text(p.config.read_text().replace(
        '[policy]\n', f'[policy]\nmax_statement_size = {LIMIT}\n').replace(
        'agents = "allow"', 'agents = "guarded"'))
    yield p.start()
    p.stop()


def _marks(pg) -> int:
    return pg.execute("SELECT count(*) FROM size_marks WHERE n > 1000", dbname="appdb")[0][0]


def _short_then_long(client: str, proxy, psql_bin) -> str:
    short = "SELECT size_mark('x')"
    long = f"SELECT size_mark('{'a' * (LIMIT * 3)}')"
    dsn = proxy.dsn(dbname="appdb")
    if client == "psycopg":
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(short, prepare=False)
            c.execute(short, prepare=False)
            try:
                c.execute(long, prepare=False)
            except psycopg.Error as e:
                return str(e)
        return ""
    if client == "asyncpg":
        async def go():
            c = await asyncpg.connect(dsn)
            try:
                await c.execute(short)
                await c.execute(long)
            except asyncpg.PostgresError as e:
                return str(e)
            finally:
                await c.close()
            return ""
        return asyncio.run(go())
    if client == "psql":
        r = run_psql(psql_bin, dsn, "-c", short, "-c", long)
        return r.stderr
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database="appdb")
    try:
        if client == "raw-query":
            c.run(short)
            msgs = c.run(long)
        else:
            for text in (short, short, long):
                c.send(parse(text), bind(), execute(), SYNC)
                msgs = c.until_ready()
        errs = errors(msgs)
        return errs[0]["M"] if errs else ""
    finally:
        c.close()


@pytest.mark.parametrize("client", ["psycopg", "asyncpg", "psql", "raw-query",
                                    "raw-unnamed-parse"])
def test_a_long_statement_is_not_let_through_by_a_short_ones_shape(sproxy, pg, psql_bin,
                                                                    client):
    before = _marks(pg)
    err = _short_then_long(client, sproxy, psql_bin)
    assert _marks(pg) == before, (client, err)
    assert "statement-too-long" in err, err
