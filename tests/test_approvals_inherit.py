# A write to a parent (without ONLY) changes the rows of its children and partitions: a
# rule on public.orders covers a statement on a table orders inherits from or is a
# partition of, whether a DBA made the tree (the catalog) or the agent's own approved
# ALTER TABLE ... INHERIT did (red-team round 20: one approval of that ALTER let every
# later UPDATE / DELETE of the parent change orders unasked). Judged by the rows upstream.
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD
from each_client import said
from test_approvals_prepared import Approver as ApproverThread
from test_approvals_wire import RULES

DB = "appdb"


@pytest.fixture(autouse=True)
def orders(pg):
    pg.execute("DROP VIEW IF EXISTS y_view; "
               "DROP TABLE IF EXISTS orders, y_par, y_grand, y_part CASCADE; "
               "CREATE TABLE orders (id int, status text);"
               "INSERT INTO orders SELECT g, 'new' FROM generate_series(1, 10) g;"
               "GRANT ALL ON orders TO PUBLIC", dbname=DB)
    yield
    pg.execute("DROP VIEW IF EXISTS y_view; "
               "DROP TABLE IF EXISTS orders, y_par, y_grand, y_part CASCADE", dbname=DB)


def _tree_only(text: str) -> str:
    """Approve what makes the tree (ALTER TABLE, CREATE TABLE), deny every other one."""
    return "approve" if text.lstrip().upper().startswith(("ALTER", "CREATE")) else "deny"


def Approver(proxy):
    return ApproverThread(proxy, decide=_tree_only)


def untouched(pg) -> bool:
    rows = pg.execute("SELECT count(*), count(*) FILTER (WHERE status <> 'new') FROM orders",
                      dbname=DB)
    return tuple(rows[0]) == (10, 0)


WRITES = [
    "DELETE FROM {p} WHERE id = 2",
    "UPDATE {p} SET status = 'x' WHERE id = 3",
    "WITH d AS (DELETE FROM {p} WHERE id > 8 RETURNING 1) SELECT count(*) FROM d",
    "MERGE INTO {p} t USING (SELECT 4 AS id) s ON t.id = s.id "
    "WHEN MATCHED THEN UPDATE SET status = 'm'",
    "UPDATE {p} SET status = 'z' WHERE id IN (SELECT id FROM {p} WHERE id < 3)",
]

TREES = {
    # made by a DBA before pgguard read the catalog
    "dba-inherit": ("CREATE TABLE y_par (id int, status text); "
                    "ALTER TABLE orders INHERIT y_par; GRANT ALL ON y_par TO PUBLIC", "y_par"),
    "dba-grandparent": ("CREATE TABLE y_grand (id int, status text); "
                        "CREATE TABLE y_par () INHERITS (y_grand); "
                        "ALTER TABLE orders INHERIT y_par; "
                        "GRANT ALL ON y_par, y_grand TO PUBLIC", "y_grand"),
    "dba-partition": ("ALTER TABLE orders RENAME TO orders_tmp; "
                      "CREATE TABLE y_part (id int, status text) PARTITION BY RANGE (id); "
                      "ALTER TABLE orders_tmp RENAME TO orders; "
                      "ALTER TABLE y_part ATTACH PARTITION orders FOR VALUES FROM (0) TO (1000);"
                      "GRANT ALL ON y_part TO PUBLIC", "y_part"),
    # a view over the parent: what is below the view's base counts too
    "dba-view-over-parent": ("CREATE TABLE y_par (id int, status text); "
                             "ALTER TABLE orders INHERIT y_par; "
                             "CREATE VIEW y_view AS SELECT * FROM y_par; "
                             "GRANT ALL ON y_par, y_view TO PUBLIC", "y_view"),
}


@pytest.mark.parametrize("client", ["psql", "psycopg", "psycopg-prepared", "asyncpg", "raw"])
@pytest.mark.parametrize("tree", list(TREES))
def test_a_write_to_a_parent_of_orders_asks(pg, make_proxy, psql_bin, tree, client):
    setup, parent = TREES[tree]
    pg.execute(setup, dbname=DB)
    proxy = make_proxy(extra=RULES)
    ap = Approver(proxy)
    ap.start()
    try:
        out = said(client, proxy, [w.format(p=parent) for w in WRITES], db=DB,
                   psql_bin=psql_bin)
    finally:
        ap.stop = True
        ap.join(5)
    assert untouched(pg), (tree, client, out)
    assert [v for v, _ in ap.seen] == ["deny"] * len(WRITES), ap.seen


@pytest.mark.parametrize("client", ["psql", "psycopg", "raw"])
def test_the_agents_own_approved_inherit_makes_the_parent_ask(pg, make_proxy, psql_bin,
                                                              client):
    proxy = make_proxy(extra=RULES)
    ap = Approver(proxy)
    ap.start()
    try:
        out = said(client, proxy, [
            "CREATE TABLE y_par (id int, status text)",
            "ALTER TABLE orders INHERIT y_par",
            *[w.format(p="y_par") for w in WRITES]], db=DB, psql_bin=psql_bin)
    finally:
        ap.stop = True
        ap.join(5)
    inherits = pg.execute("SELECT count(*) FROM pg_inherits WHERE inhrelid = "
                          "'orders'::regclass", dbname=DB)[0][0]
    assert untouched(pg), (client, out, ap.seen)
    if inherits:                    # (the ALTER ran: approved, or needing no approval)
        assert [v for v, _ in ap.seen if v == "deny"] == ["deny"] * len(WRITES), ap.seen


def test_a_read_of_the_parent_is_not_refused(pg, make_proxy):
    pg.execute(TREES["dba-inherit"][0], dbname=DB)
    proxy = make_proxy(extra=RULES)
    with psycopg.connect(proxy.dsn(AGENT, AGENT_PASSWORD, dbname=DB), autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM y_par").fetchone()[0] == 10
