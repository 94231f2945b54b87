# Red team, round 22 (helper 118): code a DBA left in the schema ran for an agent with
# no rule applied: SELECT * FROM a view whose definition calls a writing function
# (wipe() emptied a table under no-destructive; ship(51) wrote orders past the approval
# rule; pg_terminate_backend(pid) ended another session), the trigger of a table the
# agent inserts into, a column DEFAULT calling such a function, REFRESH MATERIALIZED
# VIEW of one. What a view's definition calls is judged now as if the statement called
# it (user functions by their bodies), and so are a table's triggers, defaults and checks
# for a statement that writes its rows. Judged upstream (rows, sessions alive), through
# psql, psycopg (simple and prepared), asyncpg and a raw client.
from __future__ import annotations

import psycopg
import pytest
from conftest import UPSTREAM_PASSWORD, UPSTREAM_USER
from guarded import guarded_proxy
from each_client import MODES, said

DB = "appdb"
EXTRA = """
[[rules]]
name = "ec-orders-are-read-only"
when = { kind = "agent", statements = ["insert", "update", "delete"], relations = ["public.ec_orders"] }
action = "block"
"""

SETUP = """
DROP VIEW IF EXISTS ec_v_wipe, ec_v_ship, ec_v_nested, ec_v_term, ec_v_clean CASCADE;
DROP MATERIALIZED VIEW IF EXISTS ec_mv;
DROP TABLE IF EXISTS ec_orders, ec_rt, ec_log, ec_def, ec_serial CASCADE;
CREATE TABLE ec_orders (id int PRIMARY KEY, status text);
INSERT INTO ec_orders SELECT g, 'pending' FROM generate_series(1, 6) g;
CREATE TABLE ec_rt (id int);
INSERT INTO ec_rt SELECT generate_series(1, 20);
CREATE OR REPLACE FUNCTION ec_wipe() RETURNS int LANGUAGE plpgsql AS
  $$BEGIN DELETE FROM ec_rt; RETURN 1; END$$;
CREATE OR REPLACE FUNCTION ec_ship(i int) RETURNS int LANGUAGE sql AS
  $$UPDATE ec_orders SET status = 'shipped' WHERE id = i RETURNING id$$;
CREATE OR REPLACE FUNCTION ec_trg() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN UPDATE ec_orders SET status = 'shipped' WHERE id = 3; RETURN NEW; END$$;
CREATE VIEW ec_v_wipe AS SELECT ec_wipe() AS n;
CREATE VIEW ec_v_ship AS SELECT ec_ship(1) AS n;
CREATE VIEW ec_v_nested AS SELECT n FROM ec_v_ship;
CREATE VIEW ec_v_term AS SELECT pid, pg_terminate_backend(pid) AS t FROM pg_stat_activity
  WHERE application_name = 'ec-victim';
CREATE VIEW ec_v_clean AS SELECT id, upper(status) AS s FROM ec_orders;
CREATE TABLE ec_log (v text);
CREATE TRIGGER ec_log_t AFTER INSERT ON ec_log FOR EACH ROW EXECUTE FUNCTION ec_trg();
CREATE TABLE ec_def (id int, v int DEFAULT ec_ship(2));
CREATE MATERIALIZED VIEW ec_mv AS SELECT ec_ship(4) AS a WITH NO DATA;
CREATE TABLE ec_serial (id serial PRIMARY KEY, v text CHECK (length(v) < 10));
GRANT ALL ON ALL TABLES IN SCHEMA public TO {user};
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {user};
ALTER MATERIALIZED VIEW ec_mv OWNER TO {user};
"""

ATTEMPTS = [
    "SELECT * FROM ec_v_wipe",
    "SELECT 1 FROM ec_v_wipe WHERE false",
    "SELECT (SELECT n FROM ec_v_wipe)",
    "SELECT * FROM ec_v_ship",
    "SELECT * FROM ec_v_nested",
    "SELECT * FROM ec_v_clean, ec_v_ship",
    "INSERT INTO ec_log VALUES ('x')",
    "INSERT INTO ec_def (id) VALUES (1)",
    "REFRESH MATERIALIZED VIEW ec_mv",
    "SELECT * FROM ec_v_term",
]


@pytest.fixture(scope="module")
def eproxy(pg, tmp_path_factory):
    pg.execute(SETUP.format(user=UPSTREAM_USER), dbname=DB)
    with guarded_proxy(pg, tmp_path_factory.mktemp("existing-code"), extra=EXTRA) as p:
        yield p


def _truth(pg) -> tuple:
    return (pg.execute("SELECT count(*) FROM ec_rt", dbname=DB)[0][0],
            pg.execute("SELECT string_agg(status, ',' ORDER BY id) FROM ec_orders",
                       dbname=DB)[0][0])


@pytest.mark.parametrize("mode", MODES)
def test_code_left_in_the_schema_is_judged(eproxy, pg, psql_bin, mode):
    # a session of the upstream role (every pgguard session is one): the view's
    # pg_terminate_backend would end it
    victim = psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, DB,
                                    application_name="ec-victim"), autocommit=True)
    try:
        before = _truth(pg)
        assert before == (20, ",".join(["pending"] * 6))
        out = said(mode, eproxy, ATTEMPTS, db=DB, psql_bin=psql_bin)
        assert _truth(pg) == before, (mode, out)
        # every attempt refused, saying which rule
        assert out.count("pgguard: statement refused") >= len(ATTEMPTS), (mode, out)
        assert "ec_wipe() body: DELETE" in out and 'rule "ec-orders-are-read-only"' in out
        assert "pg_terminate_backend" in out
        assert victim.execute("SELECT 1").fetchone() == (1,)
        # what the schema's code does not make harmful still runs as before
        with psycopg.connect(eproxy.dsn(dbname=DB), autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM ec_v_clean").fetchone() == (6,)
            assert c.execute("INSERT INTO ec_serial (v) VALUES ('ok')").rowcount == 1
    finally:
        victim.close()


def test_the_statements_do_their_harm_upstream(eproxy, pg):
    # the truth for the attempts above: as the DBA, in a transaction rolled back
    pg.execute("TRUNCATE ec_rt; INSERT INTO ec_rt SELECT generate_series(1, 20); "
               "UPDATE ec_orders SET status = 'pending'", dbname=DB)
    with psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, DB)) as c:
        c.execute("SELECT * FROM ec_v_wipe")
        c.execute("SELECT * FROM ec_v_ship")
        c.execute("INSERT INTO ec_log VALUES ('x')")
        c.execute("INSERT INTO ec_def (id) VALUES (1)")
        n = c.execute("SELECT count(*) FROM ec_rt").fetchone()[0]
        st = c.execute("SELECT string_agg(status, ',' ORDER BY id) FROM ec_orders").fetchone()[0]
        c.rollback()
    assert n == 0 and st == "shipped,shipped,shipped,pending,pending,pending"
