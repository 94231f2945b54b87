# The web console in headless Chromium (DevTools protocol): click approve / deny, see it decided.
from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from pgguard.approvals.store import ApprovalStore
from pgguard.approvals.web import start_admin
from pgguard.config import loads

TOKEN = "browser-token-9Zk"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or \
    shutil.which("google-chrome")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium "
                                "(apt-get install chromium)")


class Browser:
    """Headless Chromium driven over the DevTools protocol (no chromedriver needed)."""

    def __init__(self, tmp: Path) -> None:
        self.profile = tmp / "chromium-profile"
        self.profile.mkdir()
        self.ids = itertools.count(1)
        self.console: list[str] = []

    async def __aenter__(self) -> "Browser":
        args = [CHROMIUM, "--headless=new", "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}", "--no-first-run", "--disable-gpu",
                "--disable-dev-shm-usage", "--disable-extensions", "--window-size=1400,1000",
                "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not start")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json(content_type=None)
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self.pending: dict[int, asyncio.Future] = {}
        self.reader = asyncio.ensure_future(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value")) for a in
                                             data["params"]["args"]))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append("EXCEPTION " + json.dumps(data["params"])[:500])

    async def send(self, method: str, **params) -> dict:
        i = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        data = await asyncio.wait_for(fut, 20)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data["result"]

    async def eval(self, expr: str):
        res = await self.send("Runtime.evaluate", expression=expr, returnByValue=True,
                              awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait(self, expr: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            value = await self.eval(expr)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expr!r}; console: {self.console}")
            await asyncio.sleep(0.1)

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = await self.wait(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"],
                            button="left", clickCount=1)

    async def type(self, selector: str, text: str) -> None:
        await self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", text=text)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait("document.readyState === 'complete'")

    async def __aexit__(self, *exc) -> None:
        self.reader.cancel()
        await self.ws.close()
        await self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


CONFIG = """
[admin]
port = 0
[identities.ci-agent]
kind = "agent"
[identities.alice]
kind = "human"
groups = ["dba"]
"""


def _ask(store, **kw):
    args = dict(identity="ci-agent", database="app",
                statement="UPDATE orders SET state = 'paid' WHERE id = 7", fingerprint="fp-7",
                classification="update public.orders [write]",
                rule="agent-writes-to-orders-need-approval", timeout_s=120, session_id="s-1")
    args.update(kw)
    return store.request(**args)


def test_web_console_approve_and_deny(tmp_path):
    async def main():
        cfg = loads(CONFIG + f'[approvals]\nstate_dir = "{tmp_path / "state"}"\n')
        store = ApprovalStore.from_config(cfg)
        admin = await start_admin(cfg, store, token=TOKEN)
        try:
            held = _ask(store)
            # the held statement's session waits for the decision (as the proxy does)
            waiter = asyncio.ensure_future(store.wait_decision(held.id))
            async with Browser(tmp_path) as b:
                await b.goto(admin.url + f"#token={TOKEN}&as=alice")
                # the token left the address bar
                assert "token" not in await b.eval("location.href")
                await b.wait(f"document.querySelector('#req-{held.id}') !== null")
                row_text = await b.eval(f"document.querySelector('#req-{held.id}').innerText")
                assert "UPDATE orders SET state = 'paid' WHERE id = 7" in row_text
                assert "ci-agent" in row_text and "agent-writes-to-orders" in row_text
                assert await b.eval("document.querySelector('#approver').value") == "alice"

                await b.click(f"button.approve[data-id='{held.id}']")
                final = await asyncio.wait_for(waiter, 10)
                assert final.state == "approved" and final.approver == "alice"
                # the page moves it to recent decisions
                await b.wait(f"!!document.querySelector("
                             f"'#recent tr[data-id=\"{held.id}\"] .state-approved')")
                await b.wait(f"document.querySelector('#req-{held.id}') === null")

                # a new request shows up live; deny it with a reason typed in the row
                other = _ask(store, statement="DELETE FROM orders WHERE id = 8")
                await b.wait(f"document.querySelector('#req-{other.id}') !== null")
                await b.type(f"#req-{other.id} input.reason", "wrong order id")
                await b.click(f"button.deny[data-id='{other.id}']")
                await b.wait(f"!!document.querySelector("
                             f"'#recent tr[data-id=\"{other.id}\"] .state-denied')")
                got = store.get(other.id)
                assert (got.state, got.approver, got.reason) == ("denied", "alice",
                                                                 "wrong order id")

                # approve with a just-in-time window; the grant appears and can be ended
                third = _ask(store)
                await b.wait(f"document.querySelector('#req-{third.id}') !== null")
                await b.eval(f"document.querySelector('#req-{third.id} select.window')"
                             ".value = '10m'")
                await b.click(f"button.approve[data-id='{third.id}']")
                await b.wait("document.querySelectorAll('#grants button.revoke').length === 1")
                assert store.check_grant("ci-agent", "app", "fp-7") is not None
                await b.click("#grants button.revoke")
                await b.wait("document.querySelectorAll('#grants button.revoke').length === 0")
                assert store.check_grant("ci-agent", "app", "fp-7") is None

                # a refused decision shows its reason in the row (own request)
                mine = _ask(store, identity="alice")
                await b.wait(f"document.querySelector('#req-{mine.id}') !== null")
                await b.click(f"button.approve[data-id='{mine.id}']")
                err = await b.wait(f"document.querySelector('#req-{mine.id} .err')"
                                   ".textContent")
                assert "own request" in err and store.get(mine.id).pending
                assert not [c for c in b.console if c.startswith("EXCEPTION")], b.console
        finally:
            await admin.close()
            store.close()

    asyncio.run(main())


def test_web_console_asks_for_the_token(tmp_path):
    async def main():
        cfg = loads(CONFIG + f'[approvals]\nstate_dir = "{tmp_path / "state"}"\n')
        store = ApprovalStore.from_config(cfg)
        admin = await start_admin(cfg, store, token=TOKEN)
        try:
            r = _ask(store)
            async with Browser(tmp_path) as b:
                await b.goto(admin.url)
                await b.wait("document.querySelector('#login').classList.contains('shown')")
                assert await b.eval(f"document.querySelector('#req-{r.id}')") is None
                await b.type("#token", "wrong")
                await b.click("#save-token")
                await b.wait("document.querySelector('#status').classList.contains('error')")
                assert await b.eval(f"document.querySelector('#req-{r.id}')") is None
                await b.wait("document.querySelector('#login').classList.contains('shown')")
                await b.type("#token", TOKEN)
                await b.click("#save-token")
                await b.wait(f"document.querySelector('#req-{r.id}') !== null")
                # without an approver name the page says so instead of posting
                await b.click(f"button.approve[data-id='{r.id}']")
                err = await b.wait(f"document.querySelector('#req-{r.id} .err').textContent")
                assert "approve as" in err and store.get(r.id).pending
        finally:
            await admin.close()
            store.close()

    asyncio.run(main())
