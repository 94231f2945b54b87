# The admin HTTP server (aiohttp): approvals JSON API, web console, /metrics, /healthz.
"""The admin server on ``[admin] address:port``.

``/api/*`` needs ``Authorization: Bearer <token>`` with the token from the environment
variable named by ``[admin] token_env`` (compared in constant time; 401 without it;
503 when the variable is not set where pgguard runs). ``/``, ``/metrics`` and
``/healthz`` are open: the page holds no data, and metrics and health say nothing
sensitive.

===========================================  =====================================
``GET  /api/approvals?state=pending``        array of requests (``state``: pending
                                             (default), decided, all, approved, denied,
                                             timed_out, withdrawn; ``limit`` default 100)
``GET  /api/approvals/{id}``                 one request (404 when unknown)
``POST /api/approvals/{id}/approve``         ``{"approver": "alice", "reason"?: "...",
                                             "window"?: "10m"}`` -> the decided request
``POST /api/approvals/{id}/deny``            ``{"approver": "alice", "reason"?: "..."}``
``GET  /api/grants``                         active just-in-time windows
``POST /api/grants/{id}/revoke``             end a window now
``GET  /api/approvers``                      identity names that may approve something
``GET  /api/sessions``                       this worker's client sessions
``GET  /``                                   the web console
``GET  /metrics``                            Prometheus text format
``GET  /healthz``                            ``{"status": "ok", ...}`` (503 if the store fails)
===========================================  =====================================

Errors are ``{"error": "one line", "code": "..."}`` with 400 (bad input), 403 (may not
decide: own request, not in an approver group, unknown approver), 404, 409 (no longer
pending). The approver must be an identity in the config; their groups come from there.

Run it inside the proxy (every worker may serve the port: SO_REUSEPORT, shared store)::

    admin = await start_admin(cfg, store, metrics, sessions=list_sessions)
    ...
    await admin.close()

or alone: ``python -m pgguard.approvals.web -c pgguard.toml``.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import orjson
from aiohttp import web

from ..config import Config, load, parse_duration
from ..errors import ConfigError, PgguardError
from . import page
from .hold import admin_url
from .metrics import Registry, SharedMetrics
from .notify import Notifier
from .store import (STATES, ApprovalError, ApprovalStore, InvalidInput, NotAllowed,
                    StoreUnavailable)

log = logging.getLogger("pgguard.approvals.web")

SessionsProvider = Callable[[], Iterable[Mapping[str, Any]]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status,
                        content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": message, "code": code}, status)


_CODES = {400: "bad_request", 403: "forbidden", 404: "not_found", 409: "not_pending"}


class AdminServer:
    """The admin app bound to a store; :meth:`start` listens, :meth:`close` stops.

    ``token`` overrides the environment variable (tests). ``notifier`` None builds one
    from ``[approvals] webhook_url`` (when set) and subscribes it to the store;
    ``background`` runs the janitor: persist timeouts every second, publish this
    worker's metrics, prune history hourly.
    """

    def __init__(self, cfg: Config, store: ApprovalStore, metrics: Registry | None = None, *,
                 sessions: SessionsProvider | None = None, token: str | None = None,
                 notifier: Notifier | None = None, background: bool = True) -> None:
        self.cfg = cfg
        self.store = store
        self.metrics = metrics if metrics is not None else Registry()
        self.sessions = sessions
        self.token = token if token is not None else os.environ.get(cfg.admin.token_env)
        self.notifier = notifier
        self.background = background
        self.shared = SharedMetrics(self.metrics, store.path.parent)
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self.host: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._own_notifier = False
        self._register_metrics()
        self.app = self._build_app()

    # ------------------------------------------------------------------ setup

    @property
    def url(self) -> str:
        """``http://host:port/`` where this server listens (after :meth:`start`)."""
        host = self.host or "127.0.0.1"
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def _register_metrics(self) -> None:
        m, store = self.metrics, self.store
        counts: dict[str, Any] = {"at": 0.0, "value": {}}

        def cached_counts() -> dict[str, int]:
            # one store query per scrape, shared by the metrics below
            if time.monotonic() - counts["at"] > 0.5:
                counts["value"] = store.counts()
                counts["at"] = time.monotonic()
            return counts["value"]

        m.gauge("pgguard_approvals_pending", "Held statements waiting for a decision",
                fn=lambda: cached_counts().get("pending", 0))
        m.gauge("pgguard_approval_requests",
                "Approval requests kept in the store, by state (pruned after [approvals] "
                "retention)",
                labels=("state",),
                fn=lambda: {(s,): n for s, n in cached_counts().items()})
        m.gauge("pgguard_approval_grants_active", "Just-in-time windows now open",
                fn=lambda: len(store.grants()))

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.metrics_text)
        r.add_get("/api/approvals", self.list_approvals)
        r.add_get("/api/approvals/{id:\\d+}", self.get_approval)
        r.add_post("/api/approvals/{id:\\d+}/approve", self.approve)
        r.add_post("/api/approvals/{id:\\d+}/deny", self.deny)
        r.add_get("/api/grants", self.list_grants)
        r.add_post("/api/grants/{id:\\d+}/revoke", self.revoke_grant)
        r.add_get("/api/approvers", self.approvers)
        r.add_get("/api/sessions", self.list_sessions)
        return app

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        if request.path.startswith("/api/"):
            if not self.token:
                return _error(503, "no_token",
                              f"the admin API is disabled: set the environment variable "
                              f"{self.cfg.admin.token_env} where pgguard runs")
            got = request.headers.get("Authorization", "")
            scheme, _, value = got.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    value.strip().encode(), self.token.encode()):
                resp = _error(401, "unauthorized", "missing or wrong admin token "
                              "(Authorization: Bearer <token>)")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="pgguard"'
                return resp
        try:
            return await handler(request)
        except ApprovalError as e:
            return _error(e.http_status, _CODES.get(e.http_status, "error"), e.message)

    async def start(self, host: str | None = None, port: int | None = None) -> AdminServer:
        """Listen (``[admin] address``/``port`` unless given; port 0 picks a free one)."""
        host = self.cfg.admin.address if host is None else host
        port = self.cfg.admin.port if port is None else port
        if self.notifier is None and self.cfg.approvals.webhook_url:
            self.notifier = Notifier(
                self.cfg.approvals.webhook_url, console_url=admin_url(self.cfg),
                timeout_s=parse_duration(self.cfg.approvals.webhook_timeout),
                retries=self.cfg.approvals.webhook_retries)
            self._own_notifier = True
        if self.notifier is not None:
            self.notifier.attach_metrics(self.metrics)
            if self.notifier._task is None:
                self.notifier.start()
            if self.notifier.submit not in self.store.listeners:
                self.store.listeners.append(self.notifier.submit)
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        sock = _listen(host, port)
        site = web.SockSite(self.runner, sock)
        await site.start()
        self.host, self.port = host, sock.getsockname()[1]
        if self.background:
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._janitor(), name="pgguard-approvals-janitor"))
        if not self.token:
            log.warning("admin API disabled: environment variable %s is not set",
                        self.cfg.admin.token_env)
        return self

    async def close(self) -> None:
        """Stop listening and the background tasks; drain and stop an owned notifier."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.notifier is not None:
            if self.notifier.submit in self.store.listeners:
                self.store.listeners.remove(self.notifier.submit)
            if self._own_notifier:
                await self.notifier.close()
        self.shared.remove()

    async def _janitor(self) -> None:
        retention = parse_duration(self.cfg.approvals.retention)
        last_prune = 0.0
        last_error = None
        while True:
            try:
                await asyncio.to_thread(self.shared.publish)
                await asyncio.to_thread(self.store.expire)
                if time.monotonic() - last_prune > 3600:
                    last_prune = time.monotonic()
                    await asyncio.to_thread(self.store.prune, retention)
            except Exception as e:          # keep going; the store may be busy a moment
                if str(e) != last_error:    # once per cause, not every second
                    log.warning("approvals janitor: %s", e)
                last_error = str(e)
            else:
                last_error = None
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ pages

    async def index(self, request: web.Request) -> web.Response:
        nonce = secrets.token_urlsafe(16)
        return web.Response(
            text=page.render(nonce, self.cfg.admin.token_env), content_type="text/html",
            headers={
                "Content-Security-Policy": (
                    f"default-src 'none'; script-src 'nonce-{nonce}'; "
                    f"style-src 'nonce-{nonce}'; connect-src 'self'; img-src 'self'; "
                    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store"})

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            pending = (await asyncio.to_thread(self.store.counts))["pending"]
        except StoreUnavailable as e:
            # a fleet's control database is away: this instance still relays (only
            # approvals are refused), so a load balancer must keep sending it clients
            return _json({"status": "degraded", "pid": os.getpid(),
                          "control": "unreachable", "error": e.message})
        except Exception as e:
            return _json({"status": "error", "error": str(e)}, 503)
        return _json({"status": "ok", "pid": os.getpid(), "approvals_pending": pending})

    async def metrics_text(self, request: web.Request) -> web.Response:
        text = await asyncio.to_thread(self.shared.render)
        return web.Response(text=text, headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # ------------------------------------------------------------------ API

    async def list_approvals(self, request: web.Request) -> web.Response:
        state = request.query.get("state", "pending")
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise InvalidInput("limit must be a whole number") from None
        limit = max(1, min(limit, 1000))
        if state == "pending":
            reqs = await asyncio.to_thread(self.store.pending)
        elif state in ("decided", "recent"):
            reqs = await asyncio.to_thread(self.store.recent, limit)
        elif state == "all":
            pending = await asyncio.to_thread(self.store.pending)
            reqs = pending + await asyncio.to_thread(self.store.recent, limit)
        elif state in STATES:
            reqs = await asyncio.to_thread(lambda: self.store.recent(limit, state=state))
        else:
            raise InvalidInput(f"unknown state {state!r} (pending, decided, all, "
                               f"{', '.join(STATES[1:])})")
        return _json([r.as_json() for r in reqs[:limit]])

    async def get_approval(self, request: web.Request) -> web.Response:
        req = await asyncio.to_thread(self.store.get, int(request.match_info["id"]))
        return _json(req.as_json())

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidInput("the body is not JSON") from None
        if not isinstance(body, dict):
            raise InvalidInput("the body must be a JSON object")
        return body

    def _approver(self, body: dict[str, Any]) -> tuple[str, list[str]]:
        name = body.get("approver")
        if not isinstance(name, str) or not name.strip():
            raise InvalidInput('"approver" (an identity name) is required')
        ident = self.cfg.identities.get(name.strip())
        if ident is None:
            raise NotAllowed(f"unknown approver {name!r}: not an identity in the config")
        return name.strip(), list(ident.groups)

    async def _decide(self, request: web.Request, approve: bool) -> web.Response:
        body = await self._body(request)
        name, groups = self._approver(body)
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise InvalidInput('"reason" must be a string')
        window = body.get("window")
        window_s = None
        if window not in (None, "", 0):
            if not approve:
                raise InvalidInput('"window" only goes with an approval')
            try:
                window_s = parse_duration(window)
            except (ValueError, TypeError):
                raise InvalidInput(f'"window": invalid duration {window!r} '
                                   '(e.g. "10m", "1h")') from None
        req = await asyncio.to_thread(self.store.decide, int(request.match_info["id"]),
                                      approve, name, groups, reason or None, window_s)
        return _json(req.as_json())

    async def approve(self, request: web.Request) -> web.Response:
        return await self._decide(request, True)

    async def deny(self, request: web.Request) -> web.Response:
        return await self._decide(request, False)

    async def list_grants(self, request: web.Request) -> web.Response:
        grants = await asyncio.to_thread(self.store.grants)
        return _json([g.as_json() for g in grants])

    async def revoke_grant(self, request: web.Request) -> web.Response:
        g = await asyncio.to_thread(self.store.revoke_grant, int(request.match_info["id"]))
        return _json(g.as_json())

    async def approvers(self, request: web.Request) -> web.Response:
        groups = set(self.cfg.admin.groups)
        for rule in self.cfg.rules:
            groups.update(rule.approvers or ())
        names = sorted(n for n, i in self.cfg.identities.items() if groups & set(i.groups))
        return _json(names)

    async def list_sessions(self, request: web.Request) -> web.Response:
        rows = [dict(s) for s in (self.sessions() if self.sessions else [])]
        return web.Response(body=orjson.dumps(rows, default=str), status=200,
                            content_type="application/json")


def _listen(host: str, port: int, *, probe: bool = False) -> socket.socket:
    """A listening socket with SO_REUSEPORT, so every worker can serve the admin port
    (probe=True: bound only, without SO_REUSEPORT, before the workers start: a port
    another process serves is refused instead of shared with it)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not probe and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        if not probe:
            sock.listen(128)
            sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise PgguardError(f"admin: cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def probe_admin(cfg: Config) -> socket.socket | None:
    """Before any worker listens: bind ``[admin]``'s address and port without
    SO_REUSEPORT (a held port raises ConfigError naming the key); the caller closes the
    socket it returns. None when the port is 0 (picked when the server starts)."""
    a = cfg.admin
    if not a.port:
        return None
    try:
        return _listen(a.address, a.port, probe=True)
    except PgguardError as e:
        raise ConfigError(f"admin.port: {e}".replace("admin: ", "", 1)) from None


async def start_admin(cfg: Config, store: ApprovalStore, metrics: Registry | None = None, *,
                      sessions: SessionsProvider | None = None, token: str | None = None,
                      notifier: Notifier | None = None, host: str | None = None,
                      port: int | None = None, background: bool = True) -> AdminServer:
    """Start the admin server on the running loop; returns it (``.url``, ``.port``,
    ``await .close()``).

    Example::

        store = ApprovalStore.from_config(cfg)
        admin = await start_admin(cfg, store, metrics, sessions=lambda: sessions_info())
        print("admin console on", admin.url)
    """
    server = AdminServer(cfg, store, metrics, sessions=sessions, token=token,
                         notifier=notifier, background=background)
    return await server.start(host, port)


def main(argv: list[str] | None = None, open_store=None) -> int:
    """``python -m pgguard.approvals.web -c pgguard.toml [--port N]``: the admin server
    alone (approvals, web console, metrics) on the shared store, until Ctrl-C.
    ``open_store(cfg)`` returns that store (the program's own, at the end of this file:
    the control database's or SQLite's); without it, SQLite's."""
    p = argparse.ArgumentParser(prog="python -m pgguard.approvals.web",
                                description=main.__doc__)
    p.add_argument("-c", "--config", required=True, metavar="FILE")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("PGGUARD_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load(args.config)
        store = (open_store or ApprovalStore.from_config)(cfg)
    except PgguardError as e:
        print(f"pgguard admin: {e.message}", file=sys.stderr)
        return 1

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        admin = await start_admin(cfg, store, host=args.host, port=args.port)
        print(f"pgguard admin: listening on {admin.url} (store {store.path})", flush=True)
        await stop.wait()
        await admin.close()

    try:
        asyncio.run(run())
    except PgguardError as e:
        print(f"pgguard admin: {e.message}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    # the program: a fleet's control database holds the store when [control] says so.
    # Imported here, where nothing imports it: control builds on this package.
    from ..control import approval_store, open_link

    def _open_store(cfg):
        link = open_link(cfg, role="admin")
        store = approval_store(cfg, link)
        if link is not None:
            link.start()
        return store

    sys.exit(main(open_store=_open_store))
