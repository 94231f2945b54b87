# The web console in headless Chromium against a real proxy: the agent's UPDATE waits,
# a click on approve lets it complete.
import asyncio
import threading

import psycopg

from conftest import ADMIN_TOKEN
from test_approvals_browser import CHROMIUM, Browser, pytestmark  # noqa: F401
from test_approvals_wire import RULES, pending_ids, status


def test_click_approve_completes_the_held_statement(pg, make_proxy, tmp_path):
    pg.execute("DROP TABLE IF EXISTS orders CASCADE; CREATE TABLE orders (id int, status text);"
               "INSERT INTO orders VALUES (1, 'new')", dbname="appdb")
    proxy = make_proxy(extra=RULES)
    box = {}

    def agent():
        with psycopg.connect(proxy.dsn(dbname="appdb"), autocommit=True) as conn:
            box["tag"] = conn.execute(
                "UPDATE orders SET status = 'clicked' WHERE id = 1").statusmessage

    t = threading.Thread(target=agent)
    t.start()
    (rid,) = pending_ids(proxy)

    async def click():
        async with Browser(tmp_path) as b:
            await b.goto(f"http://127.0.0.1:{proxy.admin_port}/#token={ADMIN_TOKEN}&as=alice")
            await b.wait(f"document.querySelector('#req-{rid}') !== null")
            text = await b.eval(f"document.querySelector('#req-{rid}').innerText")
            assert "UPDATE orders SET status = 'clicked'" in text
            await b.click(f"button.approve[data-id='{rid}']")
            await b.wait(f"document.querySelector('#req-{rid}') === null")

    asyncio.run(click())
    t.join(15)
    assert box.get("tag") == "UPDATE 1"
    assert status(pg) == "clicked"
