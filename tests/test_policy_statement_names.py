# What the policy keeps of a session's prepared statements (round 17): the catalog
# generation each was judged under, so that a Bind after DDL judges it again. A Close
# Postgres skipped (an error earlier in the pipeline) made pgguard forget the name, and
# its Bind after DDL ran unjudged (test_enforce_rt12's raw-skipped-close routes); names
# are kept now, at most STMT_NAMES_KEPT, and past that a Bind of a forgotten name is
# refused (its text is not known), never forwarded unjudged.
import pytest
from conftest import AGENT, AGENT_PASSWORD
from rawpg import SYNC, RawClient, bind, close, errors, execute, parse, query, tags
from test_policy_guard_settings import guarded_proxy


@pytest.fixture
def gproxy(pg, tmp_path):
    p = guarded_proxy(pg, tmp_path)
    yield p
    p.stop()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def test_a_forgotten_statement_name_is_refused_not_forwarded(gproxy):
    proxy = gproxy
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD)
    n = 10_050
    for i in range(0, n, 1000):
        c.send(b"".join(parse(f"SELECT {j} AS k{j % 5}", f"n{j}")
                        for j in range(i, min(n, i + 1000))), SYNC)
        assert not errors(c.until_ready())
    # the newest names run as they are
    c.send(bind(f"n{n - 1}"), execute(), SYNC)
    assert tags(c.until_ready()) == ["SELECT 1"]
    # the oldest was forgotten: refused by pgguard, with a reason
    c.send(bind("n0"), execute(), SYNC)
    errs = errors(c.until_ready())
    assert errs and "pgguard" in errs[0]["M"], errs
    # the session goes on
    assert tags(c.run("SELECT 1")) == ["SELECT 1"]
    c.close()


def test_statement_names_cost_bounded_memory(gproxy):
    proxy = gproxy
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD)
    c.send(parse("SELECT 1", "warm"), SYNC)
    c.until_ready()
    before = _rss_mb(proxy.proc.pid)
    pad = "x" * 8000
    for i in range(0, 20_000, 500):
        c.send(b"".join(parse(f"SELECT '{pad}' AS k{j}", f"b{j}")
                        for j in range(i, i + 500)), SYNC)
        c.until_ready()
    grown = _rss_mb(proxy.proc.pid) - before
    assert tags(c.run("SELECT 1")) == ["SELECT 1"]
    c.close()
    # 20,000 names with 8 KB texts: 160 MB of text if kept, three times (the policy's
    # prepared-statement memory, the generation check, the audit's pairing)
    assert grown < 120, grown


def test_closed_statements_never_push_out_a_live_one(gproxy):
    # (helper 87) closed names counted toward the bound and the oldest name went first:
    # psycopg / asyncpg churning their caches past 10,000 statements had their hot
    # statement refused. Closed names go first now.
    proxy = gproxy
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD)
    c.send(parse("SELECT 7 AS hot", "hot"), SYNC)
    c.until_ready()
    for i in range(0, 10_500, 500):
        c.send(b"".join(parse(f"SELECT {j} AS k", f"c{j}") + close("S", f"c{j}")
                        for j in range(i, i + 500)), SYNC)
        assert not errors(c.until_ready())
    for _ in range(2):
        c.send(bind("hot"), execute(), SYNC)
        assert tags(c.until_ready()) == ["SELECT 1"]
    c.close()


def _dup_items(pg) -> None:
    pg.execute("DROP TABLE IF EXISTS dup_items; CREATE TABLE dup_items (id int, v text); "
               "INSERT INTO dup_items SELECT g, 'v' FROM generate_series(1, 50) g; "
               "GRANT ALL ON dup_items TO PUBLIC", dbname="appdb")


# Red team, round 18 (helper 93): a Parse of a name Postgres still has fails (42P05) and
# leaves the older statement in place, but pgguard took the failed one's text as the
# name's: after DDL, the Bind was judged again as that text, and its plan replaced the
# guard's. "UPDATE t SET v = 'x' WHERE id > $1" then "SELECT 1" under the same name, a
# CREATE TEMP TABLE, and the Bind with 0 changed every row past the blast-radius guard.
# Both texts are judged now (either may run), and the guard measures whichever does.
DUPS = {
    "select": [parse("SELECT 1", "s1"), SYNC],
    "select-param": [parse("SELECT $1::int AS k", "s1"), SYNC],
    "small-update": [parse("UPDATE dup_items SET v = v WHERE id = -1", "s1"), SYNC],
    "three-in-a-segment": [parse("SELECT 1", "s1"), parse("SELECT 2", "s1"),
                           parse("SELECT 3", "s1"), SYNC],
    "after-a-skipped-close": [parse("SELECT 1/0"), bind(), execute(), close("S", "s1"),
                              parse("SELECT 1", "s1"), SYNC],
    "close-skipped-then-dup": [parse("SELECT 1/0"), bind(), execute(), close("S", "s1"),
                               SYNC, parse("SELECT 1", "s1"), SYNC],
}


@pytest.mark.parametrize("dup", DUPS)
def test_a_failed_parse_of_a_live_name_does_not_replace_its_statement(gproxy, pg, dup):
    _dup_items(pg)
    c = RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD, database="appdb")
    try:
        c.send(parse("UPDATE dup_items SET v = 'x' WHERE id > $1", "s1"), SYNC)
        assert not errors(c.until_ready())
        c.send(*DUPS[dup])
        c.until_ready(DUPS[dup].count(SYNC))
        assert not errors(c.run("CREATE TEMP TABLE dup_other (a int)"))
        c.send(bind("s1", [b"0"]), execute(), SYNC)
        errs = errors(c.until_ready())
        assert tags(c.run("SELECT 1")) == ["SELECT 1"]      # the session goes on
    finally:
        c.close()
    changed = pg.execute("SELECT count(*) FROM dup_items WHERE v = 'x'", dbname="appdb")
    assert changed[0][0] == 0, (dup, errs)
    assert errs and "blast-radius" in errs[0]["M"], errs


def test_a_statement_prepared_once_still_runs_after_ddl(gproxy, pg):
    _dup_items(pg)
    c = RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD, database="appdb")
    try:
        c.send(parse("UPDATE dup_items SET v = 'x' WHERE id = $1", "s1"), SYNC)
        c.until_ready()
        c.send(parse("SELECT 1", "s1"), SYNC)           # fails: the name is taken
        assert errors(c.until_ready())[0]["C"] == "42P05"
        assert not errors(c.run("CREATE TEMP TABLE dup_other2 (a int)"))
        c.send(bind("s1", [b"7"]), execute(), SYNC)
        assert tags(c.until_ready()) == ["UPDATE 1"]
    finally:
        c.close()


# Red team, round 18 (helper 92): a Query (or FunctionCall) Postgres skipped after an
# error earlier in its segment still counted as owed a ReadyForQuery, so the guard's next
# statement waited for one ReadyForQuery too many: its answer never came, and the session
# held everything the client sent after it. Judged by the answers the client gets and by
# the rows upstream.
SKIPPED = {
    "query": [bind("nosuch"), query("SELECT 1"), SYNC],
    "two-queries": [bind("nosuch"), query("SELECT 1"), query("SELECT 2"), SYNC],
    "execute-error": [parse("SELECT 1/0"), bind(), execute(), query("SELECT 1"), SYNC],
    "query-after-parse-error": [parse("SELEC 1"), query("SELECT 1"), SYNC],
}
FOLLOW = {
    "extended": lambda: [parse("UPDATE dup_items SET v = 'y' WHERE id = $1"),
                         bind("", [b"2"]), execute(), SYNC],
    "simple": lambda: [query("UPDATE dup_items SET v = 'y' WHERE id = 2")],
}


@pytest.mark.parametrize("follow", FOLLOW)
@pytest.mark.parametrize("skipped", SKIPPED)
def test_a_skipped_query_does_not_stall_the_next_guarded_statement(gproxy, pg, skipped,
                                                                   follow):
    _dup_items(pg)
    c = RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD, database="appdb")
    try:
        c.send(parse("UPDATE dup_items SET v = v WHERE id = $1"), bind("", [b"1"]),
               execute(), SYNC)
        assert tags(c.until_ready()) == ["UPDATE 1"]
        c.send(*SKIPPED[skipped])
        assert errors(c.until_ready())
        c.send(*FOLLOW[follow]())
        assert tags(c.until_ready()) == ["UPDATE 1"]
        assert tags(c.run("SELECT 1")) == ["SELECT 1"]
    finally:
        c.close()
    assert pg.execute("SELECT v FROM dup_items WHERE id = 2", dbname="appdb") == [("y",)]


# Regression hunt, round 18 (helper 94): the texts a name may still hold were kept past
# the point Postgres settles them: a name closed (first in its segment: it runs) or
# DEALLOCATEd and prepared again was judged against its old text after DDL (a SELECT
# refused as the UPDATE it once was), and five reuses made every stale Bind of the name
# "statement-memory"; the unnamed statement likewise across pipelines.
RESETS = {
    "close": lambda c: (c.send(close("S", "s1"), SYNC), c.until_ready()),
    "deallocate": lambda c: c.run("DEALLOCATE s1"),
    "deallocate-all": lambda c: c.run("DEALLOCATE ALL"),
    "deallocate-prepare": lambda c: c.run("DEALLOCATE PREPARE s1"),
}


def _ddl_elsewhere(proxy, name: str) -> None:
    other = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database="appdb")
    try:
        assert not errors(other.run(f"CREATE TEMP TABLE {name} (a int)"))
    finally:
        other.close()


@pytest.mark.parametrize("times", [1, 6])
@pytest.mark.parametrize("reset", RESETS)
def test_a_name_prepared_again_after_it_is_gone_is_judged_as_itself(gproxy, pg, reset,
                                                                    times):
    _dup_items(pg)
    c = RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD, database="appdb")
    try:
        for i in range(times):
            c.send(parse(f"UPDATE dup_items SET v = 'x{i}' WHERE id > $1", "s1"), SYNC)
            assert not errors(c.until_ready())
            RESETS[reset](c)
        c.send(parse("SELECT $1::int AS v", "s1"), SYNC)
        assert not errors(c.until_ready())
        _ddl_elsewhere(gproxy, f"reuse_{reset.replace('-', '_')}_{times}")
        c.send(bind("s1", [b"5"]), execute(), SYNC)
        msgs = c.until_ready()
        assert not errors(msgs), errors(msgs)
        assert tags(msgs) == ["SELECT 1"]
    finally:
        c.close()


def test_the_unnamed_statement_after_a_pipeline_of_them(gproxy, pg):
    c = RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD, database="appdb")
    try:
        c.send(*[m for i in range(6) for m in (parse(f"SELECT {i} AS k{i}"), bind(),
                                                execute())], SYNC)
        assert tags(c.until_ready()) == ["SELECT 1"] * 6
        c.send(parse("SELECT $1::int AS v"), SYNC)
        assert not errors(c.until_ready())
        _ddl_elsewhere(gproxy, "reuse_unnamed_pipeline")
        c.send(bind("", [b"7"]), execute(), SYNC)
        msgs = c.until_ready()
        assert not errors(msgs) and tags(msgs) == ["SELECT 1"], msgs
    finally:
        c.close()
