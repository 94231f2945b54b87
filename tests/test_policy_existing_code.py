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
-- (helper 119) one hop further: a function whose INSERT fires the trigger, a trigger on
-- the partition the row goes to, a trigger on a table a cascading foreign key reaches
CREATE OR REPLACE FUNCTION ec_ins_log() RETURNS int LANGUAGE sql AS
  $$INSERT INTO ec_log VALUES ('y') RETURNING 1$$;
DROP TABLE IF EXISTS ec_part, ec_fkc, ec_fkp CASCADE;
CREATE TABLE ec_part (id int, v text) PARTITION BY LIST (id);
CREATE TABLE ec_part_1 PARTITION OF ec_part FOR VALUES IN (1);
CREATE TRIGGER ec_part_t AFTER INSERT ON ec_part_1 FOR EACH ROW EXECUTE FUNCTION ec_trg();
CREATE TABLE ec_fkp (id int PRIMARY KEY);
INSERT INTO ec_fkp VALUES (1), (2);
CREATE TABLE ec_fkc (p int REFERENCES ec_fkp ON DELETE CASCADE);
INSERT INTO ec_fkc VALUES (1);
CREATE TRIGGER ec_fkc_t AFTER DELETE ON ec_fkc FOR EACH ROW EXECUTE FUNCTION ec_trg();
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
    "SELECT ec_ins_log()",
    "INSERT INTO ec_part VALUES (1, 'x')",
    "DELETE FROM ec_fkp WHERE id = 1",
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


# (helper 121) more code a DBA leaves in the schema: an operator over a writing function
# (SELECT 1 = 'x'::varchar deleted every order), a domain's CHECK, an index expression,
# a row-level security policy (run by a plain SELECT), an event trigger (run by the
# agent's own CREATE TEMP TABLE). Each writes ec_orders, which the rule keeps read-only.
MORE_SETUP = """
CREATE OR REPLACE FUNCTION ec_w(i int) RETURNS bool LANGUAGE plpgsql AS
  $$BEGIN UPDATE ec_orders SET status = 'shipped' WHERE id = i; RETURN true; END$$;
CREATE DOMAIN ec_okint AS int CHECK (ec_w(VALUE));
CREATE TABLE ec_dom (v ec_okint);
CREATE OR REPLACE FUNCTION ec_ix(v int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS
  $$BEGIN PERFORM ec_w(v); RETURN v; END$$;
CREATE TABLE ec_idx (v int);
CREATE INDEX ec_idx_f ON ec_idx ((ec_ix(v)));
CREATE TABLE ec_rls (v int);
INSERT INTO ec_rls VALUES (1);
ALTER TABLE ec_rls ENABLE ROW LEVEL SECURITY;
ALTER TABLE ec_rls FORCE ROW LEVEL SECURITY;
CREATE POLICY ec_p ON ec_rls USING (ec_w(3));
CREATE OR REPLACE FUNCTION ec_noop() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN RETURN NULL; END$$;
CREATE TABLE ec_when (v int);
CREATE TRIGGER ec_when_t AFTER INSERT ON ec_when FOR EACH ROW WHEN (ec_w(4))
  EXECUTE FUNCTION ec_noop();
GRANT ALL ON ec_dom, ec_idx, ec_rls, ec_when TO {user};
ALTER TABLE ec_rls OWNER TO {user};
"""
GLOBAL_SETUP = """
CREATE OR REPLACE FUNCTION ec_w(i int) RETURNS bool LANGUAGE plpgsql AS
  $$BEGIN UPDATE ec_orders SET status = 'shipped' WHERE id = i; RETURN true; END$$;
CREATE OR REPLACE FUNCTION ec_castf(b bool) RETURNS bytea LANGUAGE plpgsql AS
  $$BEGIN PERFORM ec_w(2); RETURN '\\x00'::bytea; END$$;
CREATE CAST (bool AS bytea) WITH FUNCTION ec_castf(bool);
CREATE OR REPLACE FUNCTION ec_opf(a int, b text) RETURNS bool LANGUAGE sql AS
  $$SELECT ec_w(5)$$;
CREATE OPERATOR === (LEFTARG = int, RIGHTARG = text, FUNCTION = ec_opf);
CREATE OR REPLACE FUNCTION ec_evt() RETURNS event_trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM ec_w(6); END$$;
CREATE EVENT TRIGGER ec_evt ON ddl_command_start EXECUTE FUNCTION ec_evt();
"""
MORE_DROP = """
DROP EVENT TRIGGER IF EXISTS ec_evt;
DROP CAST IF EXISTS (bool AS bytea);
DROP FUNCTION IF EXISTS ec_castf(bool);
DROP TABLE IF EXISTS ec_dom, ec_idx, ec_rls, ec_when;
DROP OPERATOR IF EXISTS === (int, text);
DROP DOMAIN IF EXISTS ec_okint;
DROP FUNCTION IF EXISTS ec_opf(int, text), ec_ix(int), ec_evt(), ec_noop(), ec_w(int);
"""
MORE = [
    "INSERT INTO ec_dom VALUES (1)",
    "INSERT INTO ec_idx VALUES (2)",
    "SELECT * FROM ec_rls",
    "INSERT INTO ec_when VALUES (1)",
]
GLOBAL = [
    "SELECT 1 === 'x'",
    "SELECT true::bytea",
    "SELECT CAST(id > 2 AS bytea) FROM ec_orders",
    "SELECT count(*) FROM ec_orders WHERE id === 'x'",
    "CREATE TEMP TABLE ec_tmp (x int)",
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("what", ["tables", "global"])
def test_operators_domains_indexes_policies_event_triggers(eproxy, pg, psql_bin, mode,
                                                           what):
    pg.execute(MORE_DROP, dbname=DB)
    pg.execute((MORE_SETUP if what == "tables" else GLOBAL_SETUP).format(
        user=UPSTREAM_USER), dbname=DB)
    attempts = MORE if what == "tables" else GLOBAL
    try:
        # the catalog is read again after DDL through the proxy (a human's)
        with psycopg.connect(eproxy.dsn("alice", "alice-pw-1c8", dbname=DB),
                             autocommit=True) as h:
            h.execute("CREATE TABLE IF NOT EXISTS ec_poke (x int)")
        before = _truth(pg)
        out = said(mode, eproxy, attempts, db=DB, psql_bin=psql_bin)
        assert _truth(pg) == before, (mode, out)
        assert out.count("pgguard: statement refused") >= len(attempts), (mode, out)
    finally:
        pg.execute(MORE_DROP, dbname=DB)


# Red team, round 22 (helper 121), left open then: a DBA's function in C / `internal`
# that is the code of a built-in under another name (CREATE FUNCTION ... LANGUAGE internal
# AS 'pg_terminate_backend'): pgguard judges built-ins by name and did not read such a
# body, so the alias ended sessions, unlinked large objects and read server files for an
# agent (the alias carries none of the built-in's REVOKEs). Judged now as calls of every
# function with the same code (same symbol of the same library).
ALIAS_SETUP = """
CREATE OR REPLACE FUNCTION ec_kill(int, bigint) RETURNS bool
  LANGUAGE internal STRICT VOLATILE AS 'pg_terminate_backend';
CREATE OR REPLACE FUNCTION ec_rm(oid) RETURNS int LANGUAGE internal STRICT AS 'be_lo_unlink';
CREATE OR REPLACE FUNCTION ec_rd(text) RETURNS text LANGUAGE internal STRICT AS
  'pg_read_file_all';
CREATE OR REPLACE FUNCTION ec_up(text) RETURNS text LANGUAGE internal IMMUTABLE STRICT AS
  'upper';
SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid = 424242;
SELECT lo_create(424242);
ALTER LARGE OBJECT 424242 OWNER TO {user};
GRANT EXECUTE ON FUNCTION ec_kill(int, bigint), ec_rm(oid), ec_rd(text), ec_up(text)
  TO {user};
"""

ALIASES = [
    "SELECT ec_kill(pid, 0) FROM pg_stat_activity WHERE application_name = 'ec-victim'",
    "SELECT ec_rm(424242)",
    "SELECT ec_rm(oid) FROM pg_largeobject_metadata",
    "SELECT ec_rd('PG_VERSION')",
    "SELECT length(ec_rd('postgresql.conf')) > 0",
]


def _lo_left(pg) -> int:
    return pg.execute("SELECT count(*) FROM pg_largeobject_metadata WHERE oid = 424242",
                      dbname=DB)[0][0]


def test_the_aliases_do_their_harm_upstream(eproxy, pg):
    # the premise: through Postgres alone, as the agent's upstream role, the aliases work
    pg.execute(ALIAS_SETUP.format(user=UPSTREAM_USER), dbname=DB)
    with psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, DB),
                         autocommit=True) as c:
        assert c.execute("SELECT ec_rd('PG_VERSION')").fetchone()[0].strip().isdigit()
        assert c.execute("SELECT ec_up('ab')").fetchone() == ("AB",)
        c.execute("BEGIN")
        assert c.execute("SELECT ec_rm(424242)").fetchone() == (1,)
        c.execute("ROLLBACK")
    assert _lo_left(pg) == 1


@pytest.mark.parametrize("mode", MODES)
def test_an_alias_of_a_built_in_is_judged_as_the_built_in(eproxy, pg, psql_bin, mode):
    pg.execute(ALIAS_SETUP.format(user=UPSTREAM_USER), dbname=DB)
    victim = psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, DB,
                                    application_name="ec-victim"), autocommit=True)
    try:
        out = said(mode, eproxy, ALIASES, db=DB, psql_bin=psql_bin)
        assert victim.execute("SELECT 1").fetchone() == (1,), (mode, out)
        assert _lo_left(pg) == 1, (mode, out)
        assert out.count("pgguard: statement refused") >= len(ALIASES), (mode, out)
        assert "same code as pg_terminate_backend()" in out, (mode, out)
        assert "same code as lo_unlink()" in out and "pg_read_file()" in out, (mode, out)
        # an alias of harmless code still runs
        with psycopg.connect(eproxy.dsn(dbname=DB), autocommit=True) as c:
            assert c.execute("SELECT ec_up('ab')").fetchone() == ("AB",)
    finally:
        victim.close()


def test_an_alias_of_an_extensions_c_function_is_judged_whatever_the_library_path(
        eproxy, pg):
    # (red team 23, helper 127) the library was compared as a string: an alias of
    # adminpack's pg_file_write naming 'adminpack', an absolute path or '.so' wrote files
    # into the data directory for an agent. Compared by the library's file name now.
    pg.execute("CREATE EXTENSION IF NOT EXISTS adminpack", dbname=DB)
    prosrc, probin = pg.execute(
        "SELECT prosrc, probin FROM pg_proc WHERE proname = 'pg_file_write'", dbname=DB)[0]
    libdir = pg.execute("SELECT setting FROM pg_config WHERE name = 'PKGLIBDIR'",
                        dbname=DB)[0][0]
    spellings = [probin, "adminpack", f"{libdir}/adminpack.so", "$libdir/adminpack.so",
                 f"{libdir}/../lib/adminpack"]
    for i, lib in enumerate(spellings):
        pg.execute(f"CREATE OR REPLACE FUNCTION ec_fw{i}(text, text, bool) RETURNS bigint "
                   f"LANGUAGE c STRICT AS '{lib}', '{prosrc}'; "
                   f"GRANT EXECUTE ON FUNCTION ec_fw{i}(text, text, bool) TO {UPSTREAM_USER}",
                   dbname=DB)
    try:
        with psycopg.connect(eproxy.dsn(dbname=DB), autocommit=True) as c:
            for i in range(len(spellings)):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                    c.execute(f"SELECT ec_fw{i}('ec_written_{i}', 'x', false)")
                assert "same code as pg_file_write()" in str(e.value), (spellings[i], e.value)
        for i in range(len(spellings)):
            assert pg.execute(f"SELECT count(*) FROM pg_ls_dir('.') f WHERE f = 'ec_written_{i}'",
                              dbname=DB)[0][0] == 0
    finally:
        pg.execute("; ".join(f"DROP FUNCTION IF EXISTS ec_fw{i}(text, text, bool)"
                             for i in range(len(spellings))), dbname=DB)
