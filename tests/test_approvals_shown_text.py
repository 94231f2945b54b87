# Red team, round 17 (helper 79): an approver was shown another statement than the one
# held. Control characters in a comment (a carriage return, ESC [2K erasing the line, ESC
# [8m hiding the rest) made `pgguard approvals show` draw "UPDATE ... WHERE id = 42" on
# a terminal while the held statement updated every row. What an approver is shown
# (CLI list and show, the admin API the web page and Slack read) spells such characters
# as escapes now. Judged by the bytes each surface gives an approver.
import threading

import psycopg
import pytest
from test_approvals_prepared import DB, orders, statuses  # noqa: F401  (fixture)
from test_approvals_wire import RULES, api, cli, pending_ids

HIDDEN = {
    "erase-line": "\r\x1b[2Kstatement:      UPDATE orders SET status = 'x' WHERE id = 4\x1b[8m",
    "csi-c1": "\x9b2K\x9b8m",
    "bidi-override": "\u202e24 = di EREHW",
    "zero-width": "\u200b\u200d\u2060",
    "line-separator": "\u2028\u2029UPDATE orders SET status = 'x' WHERE id = 4",
    "backspaces": "\x08" * 40 + "WHERE id = 4",
}
BAD = set("\r\x1b\x9b\u202e\u200b\u200d\u2060\u2028\u2029\x08")


@pytest.mark.parametrize("kind", sorted(HIDDEN))
def test_what_an_approver_is_shown_has_no_hidden_characters(pg, make_proxy, kind):
    proxy = make_proxy(extra=RULES)
    sql = f"UPDATE orders SET status = 'cancelled' WHERE id > 0 /*{HIDDEN[kind]} */"
    done = []

    def run():
        with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as c:
            try:
                psycopg.ClientCursor(c).execute(sql)
                done.append("ran")
            except psycopg.Error as e:
                done.append(e.sqlstate)
    t = threading.Thread(target=run)
    t.start()
    (rid,) = pending_ids(proxy)
    shown = [cli(proxy, "show", str(rid)).stdout, cli(proxy, "list").stdout,
             str(api(proxy, "GET", "/api/approvals?state=pending"))]
    for text in shown:
        assert not BAD & set(text), (kind, text)
        assert "WHERE id > 0" in text or "WHERE id &gt; 0" in text, text
    r = cli(proxy, "deny", str(rid), "--as", "alice")
    assert r.returncode == 0, r.stderr
    t.join(10)
    assert done == ["42501"]
    assert set(statuses(pg)) == {"new"}
