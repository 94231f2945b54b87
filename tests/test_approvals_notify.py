# Webhook notifications: received by a local HTTP server, retried after a 500, never blocking.
from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web
from pgcluster import free_port

from pgguard.approvals.notify import Notifier, message_text, payload
from pgguard.approvals.store import ApprovalStore
from pgguard.approvals.web import start_admin
from pgguard.config import loads


class Hook:
    """A local webhook receiver: records bodies; fails the first ``fail`` calls with 500."""

    def __init__(self, fail: int = 0, delay: float = 0.0) -> None:
        self.fail = fail
        self.delay = delay
        self.bodies: list[dict] = []
        self.calls = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.got = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.calls <= self.fail:
            return web.Response(status=500, text="boom")
        self.bodies.append(await request.json())
        self.got.set()
        return web.Response(text="ok")

    async def __aenter__(self) -> "Hook":
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    async def wait_for(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < n:
            assert time.monotonic() < deadline, f"webhook got {len(self.bodies)} of {n}"
            await asyncio.sleep(0.02)


def _ask(store, **kw):
    args = dict(identity="ci-agent", database="app",
                statement="UPDATE orders SET note = '<b>&' WHERE id = 7", fingerprint="fp",
                classification="update public.orders [write]", rule="orders", timeout_s=60,
                session_id="s-1")
    args.update(kw)
    return store.request(**args)


def test_webhook_request_and_decision_with_retry_after_500(tmp_path):
    async def main():
        async with Hook(fail=1) as hook:
            store = ApprovalStore(tmp_path / "a.sqlite3")
            n = Notifier(hook.url, console_url="http://127.0.0.1:6480/", backoff_s=0.05)
            n.start()
            store.listeners.append(n.submit)
            r = _ask(store)
            await hook.wait_for(1)
            assert hook.calls == 2                   # the 500, then the retry
            # decided from another thread: still delivered, in order
            await asyncio.to_thread(store.decide, r.id, False, "alice", ["dba"], "too risky")
            await hook.wait_for(2)
            await n.close()
            store.close()
            return hook.bodies, n

    bodies, n = asyncio.run(main())
    first, second = bodies
    assert first["event"] == "requested" and first["approval"]["id"] == 1
    assert first["approval"]["statement"].startswith("UPDATE orders")
    assert first["approval"]["identity"] == "ci-agent" and first["approval"]["rule"] == "orders"
    assert "waits for approval #1" in first["text"]
    assert "&lt;b&gt;&amp;" in first["text"] and "<b>" not in first["text"]   # Slack escaping
    assert "pgguard approvals approve 1" in first["text"]
    assert first["console_url"] == "http://127.0.0.1:6480/#1"
    assert second["event"] == "denied" and second["approval"]["reason"] == "too risky"
    assert "denied by alice" in second["text"] and "too risky" in second["text"]
    assert (n.sent, n.failed, n.dropped) == (2, 0, 0)


def test_webhook_gives_up_after_retries(tmp_path):
    async def main():
        async with Hook(fail=100) as hook:
            store = ApprovalStore(tmp_path / "a.sqlite3")
            n = Notifier(hook.url, retries=2, backoff_s=0.02)
            n.start()
            store.listeners.append(n.submit)
            _ask(store)
            await n.drain(10)
            calls = hook.calls
            await n.close()
            store.close()
            return calls, n

    calls, n = asyncio.run(main())
    assert calls == 3 and n.failed == 1 and n.sent == 0


def test_webhook_unreachable_and_4xx(tmp_path):
    async def main():
        store = ApprovalStore(tmp_path / "a.sqlite3")
        n = Notifier(f"http://127.0.0.1:{free_port()}/nothing", retries=1, backoff_s=0.01)
        n.start()
        store.listeners.append(n.submit)
        _ask(store)
        await n.drain(10)
        await n.close()
        store.close()
        return n

    n = asyncio.run(main())
    assert n.failed == 1


def test_webhook_never_blocks_and_queue_is_bounded(tmp_path):
    async def main():
        async with Hook(delay=5.0) as hook:         # a webhook that hangs
            store = ApprovalStore(tmp_path / "a.sqlite3")
            n = Notifier(hook.url, queue_max=3, timeout_s=10)
            n.start()
            store.listeners.append(n.submit)
            t0 = time.monotonic()
            for _ in range(20):
                _ask(store)
            took = time.monotonic() - t0
            await asyncio.sleep(0.1)
            dropped = n.dropped
            await n.close(timeout=0.1)
            store.close()
            return took, dropped

    took, dropped = asyncio.run(main())
    assert took < 1.0
    assert dropped >= 16        # one in flight, three queued, the rest dropped


def test_admin_server_sends_webhooks_from_config(tmp_path):
    """[approvals] webhook_url: the admin server's notifier reports its decisions
    (and its sweeps of timeouts); requests made through the same store too."""
    async def main():
        async with Hook() as hook:
            cfg = loads(f'[admin]\nport = 0\n[approvals]\nwebhook_url = "{hook.url}"\n'
                        f'state_dir = "{tmp_path}"\n'
                        '[identities.alice]\nkind = "human"\ngroups = ["dba"]\n')
            store = ApprovalStore.from_config(cfg)
            admin = await start_admin(cfg, store, token="t")
            r = _ask(store)
            expiring = _ask(store, timeout_s=0.2)
            async with aiohttp.ClientSession() as http:
                async with http.post(admin.url + f"api/approvals/{r.id}/approve",
                                     json={"approver": "alice", "window": "10m"},
                                     headers={"Authorization": "Bearer t"}) as resp:
                    assert resp.status == 200
            await hook.wait_for(4)
            m = admin.shared.render()
            await admin.close()
            store.close()
            return hook.bodies, m, expiring

    bodies, metrics_text, expiring = asyncio.run(main())
    events = sorted((b["event"], b["approval"]["id"]) for b in bodies)
    assert events == [("approved", 1), ("requested", 1), ("requested", 2),
                      ("timed_out", expiring.id)]
    approved = next(b for b in bodies if b["event"] == "approved")
    assert "repeats allowed for 10 min" in approved["text"]
    assert 'pgguard_webhook_notifications_total{outcome="sent"}' in metrics_text


def test_payload_texts():
    from pgguard.approvals.store import Request
    r = Request(id=3, identity="bot", database="app", statement="x" * 2000, fingerprint="f",
                classification="update t", rule="r", approvers=("dba",), session_id=None,
                requested_at=0.0, expires_at=300.0, state="timed_out", decided_at=300.0)
    text = message_text("timed_out", r)
    assert text.startswith("pgguard: approval #3 timed out (bot on app, rule r)")
    assert len(text) < 800                       # long SQL is shortened
    body = payload("requested", r)
    assert "times out in ~5 min" in body["text"] and "console_url" not in body
