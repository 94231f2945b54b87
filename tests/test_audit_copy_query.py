# Red team, round 17 (helper 81): a masked identity's COPY (query) TO STDOUT sent as a
# Query was held while pgguard learnt its columns, then sent upstream without its audit
# record (strict mode included): COPY (SELECT writes_something()) TO STDOUT inserted rows
# and the log had nothing; the next statement got its masked-cell count. Judged by the
# audit records against what ran upstream (the rows the function inserted).
import asyncio

import asyncpg
import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, run_psql
from exactlib import audit_rows
from mask_corpus import DB, MASKS, seed

MODES = ["psql", "psycopg", "asyncpg", "raw", "raw-two-in-one-query"]


@pytest.fixture(scope="module", params=["batched", "strict"])
def cproxy(request, pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    pg.execute("DROP TABLE IF EXISTS copy_marks; CREATE TABLE copy_marks (tag text); "
               "GRANT ALL ON copy_marks TO PUBLIC; "
               "CREATE OR REPLACE FUNCTION copy_mark(t text) RETURNS int LANGUAGE sql "
               "AS $$ INSERT INTO copy_marks VALUES (t) RETURNING 1 $$", dbname=DB)
    audit = 'durability = "strict"\n' if request.param == "strict" else ""
    p = Proxy(pg, tmp_path_factory.mktemp(f"copy-audit-{request.param}"), extra=MASKS,
              audit_extra=audit).start()
    p.strict = request.param == "strict"
    yield p
    p.stop()


def _copy(mode: str, proxy, psql_bin: str, tag: str) -> None:
    marked = f"COPY (SELECT copy_mark('{tag}')) TO STDOUT"
    masked = f"COPY (SELECT id, ssn, '{tag}' FROM customers ORDER BY id) TO STDOUT"
    dsn = proxy.dsn(dbname=DB)
    if mode == "psql":
        for sql in (marked, masked):
            r = run_psql(psql_bin, dsn, "-c", sql)
            assert r.returncode == 0, r.stderr
    elif mode == "psycopg":
        with psycopg.connect(dsn, autocommit=True) as c:
            for sql in (marked, masked):
                with c.cursor().copy(sql) as cp:
                    for _ in cp:
                        pass
    elif mode == "asyncpg":
        async def sink(_data: bytes) -> None:
            pass

        async def go():
            c = await asyncpg.connect(dsn)
            try:
                for sql in (marked, masked):
                    q = sql[len("COPY ("):-len(") TO STDOUT")]
                    await c.copy_from_query(q, output=sink)
            finally:
                await c.close()
        asyncio.run(go())
    else:
        c = rawpg.RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database=DB)
        try:
            if mode == "raw":
                for sql in (marked, masked):
                    assert rawpg.errors(c.run(sql)) == []
            else:
                assert rawpg.errors(c.run(f"{marked}; {masked}")) == []
        finally:
            c.close()


@pytest.mark.parametrize("mode", MODES)
def test_copy_query_of_a_masked_identity_is_recorded(cproxy, pg, psql_bin, mode):
    tag = f"mark-{mode}"
    _copy(mode, cproxy, psql_bin, tag)
    ran = pg.execute(f"SELECT count(*) FROM copy_marks WHERE tag = '{tag}'", dbname=DB)
    assert "1" in str(ran), ran
    # a later statement, to see that its record carries its own counts
    with psycopg.connect(cproxy.dsn(dbname=DB), autocommit=True) as c:
        c.execute(f"SELECT 'after-{mode}'").fetchall()
    cproxy.stop()
    try:
        got = audit_rows(cproxy, "SELECT statement, rows, masked_cells FROM audit WHERE "
                         "event = 'statement' AND application_name IS DISTINCT FROM 'x' "
                         "ORDER BY event_id")
    finally:
        cproxy.start()
    texts = [r[0] for r in got]
    marks = [r for r in got if "copy_mark" in r[0]]
    reads = [r for r in got if r[0].startswith("COPY (SELECT id, ssn")]
    assert marks and reads, texts
    if cproxy.strict:
        return      # (strict records are written before the statement runs: no counts)
    assert reads[-1][1] == 3 and reads[-1][2] == 3, reads
    after = [r for r in got if r[0].startswith("SELECT") and r[1] == 1 and "$1" in r[0]]
    assert after and after[-1][2] in (0, None), after
