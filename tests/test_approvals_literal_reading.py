# Red team, round 18 (helper 96): an approver reads a held statement as Postgres will run
# it only if what they are shown reads the same. A binary bool of 0x02 was shown as
# "false" and ran as true (Postgres' boolrecv: any byte but 0): 801 orders cancelled
# where one was approved. A session that set DateStyle = 'ISO, DMY' first had '01/12/2024'
# read as December while the approver read January (43 rows, 12 expected). Binary bools
# are shown as Postgres reads them, and the settings that change how literals read are
# shown with the statement (and are part of what an approval window matches). Judged by
# what the approver decided from the text, and by the rows upstream.

import psycopg
import pytest
from conftest import AGENT, AGENT_PASSWORD
from rawpg import SYNC, RawClient, bind, errors, execute, parse
import test_approvals_prepared
from test_approvals_prepared import DB, Approver, statuses

aproxy = test_approvals_prepared.aproxy
orders = test_approvals_prepared.orders     # (autouse there: here too)

BOOLS = {b"\x00": "false", b"\x01": "true", b"\x02": "true", b"\xff": "true",
         b"\x80": "true"}


@pytest.mark.parametrize("raw", sorted(BOOLS))
def test_a_binary_bool_is_shown_as_postgres_reads_it(pg, aproxy, raw):
    # the approver approves only what reads as changing row 1 alone
    ap = Approver(aproxy, decide=lambda shown: "approve" if "$1 = false" in shown
                  else "deny")
    ap.start()
    c = RawClient.connect(aproxy.port, AGENT, AGENT_PASSWORD, database=DB, timeout=30)
    try:
        c.send(parse("UPDATE orders SET status = 'b' WHERE id = 1 OR ($1 AND id > 5)",
                     types=[16]), bind("", [raw], param_formats=[1]), execute(), SYNC)
        msgs = c.until_ready()
    finally:
        c.close()
        ap.stop = True
        ap.join(5)
    assert len(ap.seen) == 1 and f"$1 = {BOOLS[raw]}" in ap.seen[0][1], ap.seen
    want = ["b"] + ["new"] * 9 if BOOLS[raw] == "false" else ["new"] * 10
    assert statuses(pg) == want, (raw, errors(msgs))


def test_a_malformed_binary_bool_is_shown_so(pg, aproxy):
    ap = Approver(aproxy, decide=lambda shown: "deny")
    ap.start()
    c = RawClient.connect(aproxy.port, AGENT, AGENT_PASSWORD, database=DB, timeout=30)
    try:
        c.send(parse("UPDATE orders SET status = 'b' WHERE $1", types=[16]),
               bind("", [b"\x00\x01"], param_formats=[1]), execute(), SYNC)
        c.until_ready()
    finally:
        c.close()
        ap.stop = True
        ap.join(5)
    assert "malformed" in ap.seen[0][1], ap.seen
    assert statuses(pg) == ["new"] * 10


SETTINGS = {
    "datestyle-dmy": ("SET DateStyle = 'ISO, DMY'", "DateStyle = 'ISO, DMY'"),
    "datestyle-german": ("SET datestyle TO 'German'", "DateStyle = 'German, DMY'"),
    "timezone": ("SET TimeZone = 'Asia/Tokyo'", "TimeZone = 'Asia/Tokyo'"),
    "intervalstyle": ("SET IntervalStyle = 'sql_standard'",
                      "IntervalStyle = 'sql_standard'"),
    "set-config": ("SELECT set_config('datestyle', 'SQL, DMY', false)",
                   "DateStyle = 'SQL, DMY'"),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_settings_that_change_literals_are_shown_to_the_approver(pg, aproxy, setting):
    sql_set, shown_setting = SETTINGS[setting]
    ap = Approver(aproxy, decide=lambda shown: "deny")
    ap.start()
    done = []
    try:
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            try:
                c.execute(sql_set)
            except psycopg.Error as e:          # refused: nothing to show then
                done.append(("refused", e.sqlstate))
            if not done:
                try:
                    psycopg.ClientCursor(c).execute(
                        "UPDATE orders SET status = 'dated' WHERE id = 3")
                except psycopg.Error as e:
                    done.append(("update", e.sqlstate))
    finally:
        ap.stop = True
        ap.join(5)
    if done and done[0][0] == "refused":
        return
    assert len(ap.seen) == 1, ap.seen
    assert shown_setting in ap.seen[0][1], ap.seen
    assert statuses(pg) == ["new"] * 10


def test_the_settings_line_is_there_when_nothing_changed(pg, aproxy):
    # (round 19: settings chosen at login were never shown: the line was only for
    # changes since; it is always there now, with the values in force)
    ap = Approver(aproxy, decide=lambda shown: "deny")
    ap.start()
    try:
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            with pytest.raises(psycopg.Error):
                psycopg.ClientCursor(c).execute(
                    "UPDATE orders SET status = 'plain' WHERE id = 3")
    finally:
        ap.stop = True
        ap.join(5)
    shown = ap.seen[0][1]
    assert "session settings" in shown and "DateStyle = 'ISO, MDY'" in shown, ap.seen
    assert "TimeZone = '" in shown and "IntervalStyle = 'postgres'" in shown, ap.seen
