# Red team, round 18 (helper 93): statements that ran upstream with no truthful record.
# A FunctionCall from a session under no policy (a human's) had no record at all; a
# statement in flight when the client went away ran and was never recorded; an Execute of
# a statement or cursor made by SQL PREPARE / DECLARE was recorded with an empty text.
# Judged by the rows upstream against the audit's records.
import socket
import time

import pytest
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD
from exactlib import audit_rows
from rawpg import SYNC, RawClient, bind, errors, execute, function_call, parse, query, tags

USERS = [(AGENT, AGENT_PASSWORD), (HUMAN, HUMAN_PASSWORD)]


@pytest.fixture(autouse=True)
def table(pg):
    pg.execute("DROP TABLE IF EXISTS un_rows CASCADE; CREATE TABLE un_rows (id int, v text);"
               "INSERT INTO un_rows SELECT g, 'v' FROM generate_series(1, 20) g;"
               "GRANT ALL ON un_rows TO PUBLIC;"
               "CREATE OR REPLACE FUNCTION un_bump(n int) RETURNS int LANGUAGE sql AS "
               "$$ UPDATE un_rows SET v = v || 'f' WHERE id <= n RETURNING 1 $$;"
               "GRANT EXECUTE ON FUNCTION un_bump(int) TO PUBLIC")


def _records(proxy) -> list:
    return audit_rows(proxy, "SELECT identity, statement, decision, rows, error FROM audit "
                             "WHERE event = 'statement' ORDER BY event_id")


def test_a_humans_function_call_is_recorded(make_proxy, pg):
    proxy = make_proxy()
    oid = pg.execute("SELECT 'un_bump(int)'::regprocedure::oid")[0][0]
    c = RawClient.connect(proxy.port, HUMAN, HUMAN_PASSWORD)
    for n in (3, 5):
        c.send(function_call(oid, [str(n).encode()]))
        assert not errors(c.until_ready())
    c.close()
    assert proxy.stop() == 0
    assert pg.execute("SELECT count(*) FROM un_rows WHERE v LIKE '%f'")[0][0] == 5
    calls = [r for r in _records(proxy) if "FunctionCall" in (r[1] or "")]
    assert len(calls) == 2, _records(proxy)
    assert all(str(oid) in r[1] and r[0] == HUMAN for r in calls), calls


def _in_flight(proxy, user, password, frames, wait=0.3):
    c = RawClient.connect(proxy.port, user, password)
    c.send(*frames)
    time.sleep(wait)            # upstream has it; the client goes before the answer
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()


IN_FLIGHT = {
    "query": lambda: [query("UPDATE un_rows SET v = v || 'q' WHERE id <= 4; "
                            "SELECT pg_sleep(1.5)")],
    "query-sleep-first": lambda: [query("SELECT pg_sleep(1.5); "
                                        "UPDATE un_rows SET v = v || 'q' WHERE id <= 4")],
    "extended": lambda: [parse("UPDATE un_rows SET v = v || 'q' WHERE id <= 4 "
                               "AND pg_sleep(1.5) IS NOT NULL"), bind(), execute(), SYNC],
    "pipeline": lambda: [parse("UPDATE un_rows SET v = v || 'q' WHERE id <= 4"), bind(),
                         execute(), parse("SELECT pg_sleep(1.5)"), bind(), execute(),
                         SYNC],
    "two-syncs": lambda: [parse("UPDATE un_rows SET v = v || 'q' WHERE id <= 4"), bind(),
                          execute(), SYNC, parse("SELECT pg_sleep(1.5)"), bind(),
                          execute(), SYNC],
}


@pytest.mark.parametrize("user,password", USERS)
@pytest.mark.parametrize("route", IN_FLIGHT)
def test_a_statement_in_flight_when_the_client_goes_is_recorded(make_proxy, pg, route,
                                                                 user, password):
    proxy = make_proxy()
    _in_flight(proxy, user, password, IN_FLIGHT[route]())
    time.sleep(2.5)                 # Postgres finishes (or stops) what it was given
    assert proxy.stop() == 0
    changed = pg.execute("SELECT count(*) FROM un_rows WHERE v LIKE '%q'")[0][0]
    recs = [r for r in _records(proxy) if "un_rows" in (r[1] or "")]
    if changed:
        assert recs, (route, _records(proxy))
    for r in recs:                  # recorded, and never as a plain success it may not be
        assert r[0] == user
        if r[2] == "allowed" and r[3] is None:
            assert r[4] and "outcome unknown" in r[4], r


@pytest.mark.parametrize("user,password", USERS)
def test_sql_prepared_statements_and_cursors_are_named_in_their_records(make_proxy, pg,
                                                                        user, password):
    proxy = make_proxy()
    c = RawClient.connect(proxy.port, user, password)
    assert not errors(c.run("PREPARE un_s(int) AS UPDATE un_rows SET v = v || 'p' "
                            "WHERE id = $1"))
    c.send(bind("un_s", [b"7"]), execute(), SYNC)
    msgs = c.until_ready()
    c.close()
    assert proxy.stop() == 0
    if errors(msgs):                # refused for the agent: nothing ran
        assert pg.execute("SELECT count(*) FROM un_rows WHERE v LIKE '%p'")[0][0] == 0
        return
    assert tags(msgs) == ["UPDATE 1"]
    texts = [r[1] for r in _records(proxy)]
    assert "" not in texts and None not in texts, texts
    assert any('prepared statement "un_s"' in t for t in texts), texts
