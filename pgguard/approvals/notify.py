# Webhook notifications of approval requests and decisions: fire-and-forget, bounded, retried.
"""POST a JSON message to ``[approvals] webhook_url`` on each new request and each
decision (approved, denied, timed out, withdrawn).

The body has a Slack-compatible ``text`` (so a Slack or Mattermost incoming webhook
shows it as is) plus structured fields for anything else::

    {"text": "pgguard: ci-agent waits for approval #17 on app ...",
     "event": "requested", "approval": {"id": 17, "identity": "ci-agent", ...},
     "console_url": "http://127.0.0.1:6480/#17"}

Sessions never wait for a webhook: :meth:`Notifier.submit` only puts the message on a
bounded queue (full: the message is dropped and counted) and one background task sends
them in order. A connection error, a 5xx or a 429 is retried with exponential backoff
(0.5 s, 1 s, 2 s, ... capped at 30 s) up to ``retries`` times; other 4xx are not retried.

Example::

    notifier = Notifier("https://hooks.slack.com/services/T0/B0/XYZ",
                        console_url="http://127.0.0.1:6480/")
    notifier.start()                    # on the running loop
    store.listeners.append(notifier.submit)
    ...
    await notifier.close()              # drains what is queued (bounded by a timeout)
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
from typing import Any

import aiohttp

from .metrics import Counter, Registry
from .store import Request

log = logging.getLogger("pgguard.approvals.notify")

_VERBS = {
    "requested": "waits for approval",
    "approved": "approved",
    "denied": "denied",
    "timed_out": "timed out",
    "withdrawn": "withdrawn",
}


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _short(sql: str, limit: int = 600) -> str:
    sql = sql.strip()
    return sql if len(sql) <= limit else sql[:limit - 1] + "…"


def message_text(event: str, req: Request, console_url: str | None = None) -> str:
    """The human line(s) of a notification (Slack mrkdwn, escaped).

    Example: ``message_text("approved", req)`` ->
    ``"pgguard: approval #17 approved by alice (ci-agent on app, rule orders) ..."``.
    """
    sql = "```" + _slack_escape(_short(req.statement)).replace("```", "`\u200b``") + "```"
    who = f"{_slack_escape(req.identity)} on {_slack_escape(req.database)}"
    rule = _slack_escape(req.rule)
    if event == "requested":
        minutes = max(1, round(req.timeout_s / 60))
        head = (f"pgguard: {who} waits for approval #{req.id} (rule {rule}, "
                f"{_slack_escape(req.classification)}); times out in ~{minutes} min")
        how = f"Approve: `pgguard approvals approve {req.id}`"
        if console_url:
            how += f" or <{console_url}#{req.id}|the web console>"
        return f"{head}\n{sql}\n{how}"
    line = f"pgguard: approval #{req.id} {_VERBS.get(event, event)}"
    if event in ("approved", "denied") and req.approver:
        line += f" by {_slack_escape(req.approver)}"
    line += f" ({who}, rule {rule})"
    if req.reason:
        line += f": {_slack_escape(req.reason)}"
    if event == "approved" and req.window_s:
        line += f"; repeats allowed for {round(req.window_s / 60)} min"
    return f"{line}\n{sql}"


def payload(event: str, req: Request, console_url: str | None = None) -> dict[str, Any]:
    """The JSON body POSTed for ``event`` about ``req``."""
    body: dict[str, Any] = {"text": message_text(event, req, console_url), "event": event,
                            "approval": req.as_json()}
    if console_url:
        body["console_url"] = f"{console_url}#{req.id}"
    return body


class Notifier:
    """Sends webhook messages from a background task on the event loop.

    ``submit(event, request)`` matches the store's listener signature and may be called
    from any thread; it never blocks. ``sent``, ``failed`` and ``dropped`` count
    outcomes (the admin server exports them as metrics).
    """

    def __init__(self, url: str, *, console_url: str | None = None, timeout_s: float = 5.0,
                 retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 queue_max: int = 1000) -> None:
        self.url = url
        self.console_url = console_url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.queue_max = queue_max
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._queue: asyncio.Queue[dict[str, Any]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: int | None = None
        self._counter: Counter | None = None

    def attach_metrics(self, metrics: Registry) -> None:
        """Count outcomes in ``pgguard_webhook_notifications_total{outcome}``
        (sent, failed, dropped)."""
        self._counter = metrics.counter("pgguard_webhook_notifications_total",
                                        "Webhook messages by outcome", labels=("outcome",))

    def _count(self, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)
        if self._counter is not None:
            self._counter.inc(outcome=outcome)

    def start(self) -> None:
        """Start the sender on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._queue = asyncio.Queue(self.queue_max)
        self._task = self._loop.create_task(self._run(), name="pgguard-webhook")

    def submit(self, event: str, req: Request) -> None:
        """Queue a notification (dropped when the queue is full or the notifier stopped)."""
        if self._loop is None or self._loop.is_closed() or self._task is None:
            self._count("dropped")
            return
        body = payload(event, req, self.console_url)
        if threading.get_ident() == self._thread:
            self._put(body)
        else:
            try:
                self._loop.call_soon_threadsafe(self._put, body)
            except RuntimeError:
                self._count("dropped")

    def _put(self, body: dict[str, Any]) -> None:
        assert self._queue is not None
        try:
            self._queue.put_nowait(body)
        except asyncio.QueueFull:
            self._count("dropped")
            log.warning("webhook queue full: dropped a notification for approval #%s",
                        body["approval"]["id"])

    async def _run(self) -> None:
        assert self._queue is not None
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                body = await self._queue.get()
                try:
                    await self._send(http, body)
                finally:
                    self._queue.task_done()

    async def _send(self, http: aiohttp.ClientSession, body: dict[str, Any]) -> None:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            error: str
            try:
                async with http.post(self.url, json=body) as resp:
                    await resp.read()
                    if resp.status < 300:
                        self._count("sent")
                        return
                    error = f"HTTP {resp.status}"
                    if resp.status < 500 and resp.status != 429:
                        break           # the hook rejects this message: retrying won't help
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                error = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
                delay = min(delay * 2, self.max_backoff_s)
        self._count("failed")
        log.warning("webhook for approval #%s (%s) failed: %s", body["approval"]["id"],
                    body["event"], error)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far was sent or given up (or ``timeout``)."""
        if self._queue is not None:
            try:
                await asyncio.wait_for(self._queue.join(), timeout)
            except asyncio.TimeoutError:
                pass

    async def close(self, timeout: float = 5.0) -> None:
        """Drain for at most ``timeout`` seconds, then stop the sender."""
        await self.drain(timeout)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
