#!/usr/bin/env python3
"""A seeded protocol fuzzer for pgguard, judged against Postgres itself.

    python tests/fuzz/pgfuzz.py --seconds 600 [--seed N] [--identity allow|guarded|both]

Each case is a byte sequence a client might send: startup packets (mutated lengths,
versions, garbage, truncation, Terminate before startup, messages in the middle of
authentication) and frontend messages after login (mutated lengths and types, truncation,
huge lengths, garbage, pipelines of valid and broken frames, and messages in the wrong state:
Bind before Parse, Execute of an unknown portal, COPY data outside COPY, a truncated Bind on
a masked table). Every case is sent split at random byte boundaries, to Postgres directly
and to pgguard, and the class of each reply is compared: the SQLSTATEs of the
ErrorResponses in order, and how it ended ("ready": the marker query after the case
answered, "closed": the server closed, "hang": neither within the timeout).

Judged: pgguard alive after every case, no hang, no traceback in its log, its RSS growth
bounded, a healthy session (its own connection, masked table and all) answering correctly
between cases, and every reply class equal to Postgres'. `run()` is the library entry the
test suite uses; this script starts its own Postgres and pgguard.
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from rawpg import (RawClient, bind, close, cstr, describe, error_fields, execute,  # noqa: E402
                   frame, parse, query, startup_packet)

MARKER = "fuzz-marker-7q"
# how long a case's answer may take before the client closes its side (a server waiting for
# the rest of a frame must then close); the full timeout applies after that
FIRST_WAIT = 1.0
SYNC = frame(b"S", b"")
FLUSH = frame(b"H", b"")
MASKED_TABLE = "fz_cust"
MASKED_SECRET = "fuzz.secret@example.com"

# guarded agent with a mask on the fuzz table (used by the test suite and --identity guarded)
GUARDED_EXTRA = f"""
[[masks]]
column = "public.{MASKED_TABLE}.email"
strategy = "redact"
except_groups = ["dba"]
"""


# -- case generation -------------------------------------------------------------------------

@dataclass
class Case:
    kind: str                 # "startup" or "session"
    name: str
    data: bytes               # for startup: bytes after connect; for session: after login
    auth_first: bool = False  # startup: read the first auth request before sending `data`
    notes: list[str] = field(default_factory=list)


def _valid_session_frames(rng: random.Random) -> list[bytes]:
    n = rng.randint(1, 9)
    return [
        query(f"SELECT {n}"),
        parse(f"SELECT $1::int + {n}", "fs", [23]),
        bind("fs", [str(n).encode()], "fp"),
        describe("P", "fp"),
        execute("fp"),
        close("S", "fs"),
        parse(f"SELECT id, email FROM {MASKED_TABLE} WHERE id > $1", "", [23]),
        bind("", [b"0"]),
        execute(""),
        FLUSH,
        SYNC,
    ]


def _mutate_frame(rng: random.Random, fr: bytes) -> tuple[str, bytes]:
    op = rng.choice(["len-short", "len-long", "len-huge", "len-neg", "type", "truncate",
                     "garbage-body", "flip", "len-zero"])
    t, body = fr[:1], fr[5:]
    if op == "len-short":
        return op, t + struct.pack("!I", max(0, len(body) + 4 - rng.randint(1, 4))) + body
    if op == "len-long":
        return op, t + struct.pack("!I", len(body) + 4 + rng.randint(1, 8)) + body
    if op == "len-huge":
        return op, t + struct.pack("!I", rng.choice([0x7FFFFFFF, 0x40000001, 0x3FFFFFFF, 1 << 26])) + body
    if op == "len-neg":
        return op, t + struct.pack("!I", rng.choice([0xFFFFFFFF, 0x80000000])) + body
    if op == "len-zero":
        return op, t + struct.pack("!I", rng.choice([0, 1, 2, 3])) + body
    if op == "type":
        return op, bytes([rng.choice(b"\x00ABGIJLMNORTUVWYZabgijklmnoqrstuvwyz\xff")]) + fr[1:]
    if op == "truncate":
        return op, fr[:rng.randint(1, max(1, len(fr) - 1))]
    if op == "garbage-body":
        g = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        return op, t + struct.pack("!I", len(g) + 4) + g
    b = bytearray(fr)
    for _ in range(rng.randint(1, 3)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return op, bytes(b)


def _wrong_state(rng: random.Random) -> tuple[str, bytes]:
    opts = {
        "bind-before-parse": bind("nope_stmt", [b"1"]) + execute("") + SYNC,
        "execute-unknown-portal": execute("nope_portal") + SYNC,
        "describe-unknown-stmt": describe("S", "nope_stmt") + SYNC,
        "describe-bad-kind": frame(b"D", b"X" + cstr("")) + SYNC,
        "close-bad-kind": frame(b"C", b"Q" + cstr("x")) + SYNC,
        "copydata-outside-copy": frame(b"d", b"1\t2\n") + query("SELECT 1"),
        "copydone-outside-copy": frame(b"c", b"") + query("SELECT 1"),
        "copyfail-outside-copy": frame(b"f", cstr("nope")) + query("SELECT 1"),
        "bind-wrong-param-count": parse("SELECT $1::int", "w2", [23]) + bind("w2", [b"1", b"2"]) + SYNC,
        "bind-truncated-masked": (parse(f"SELECT email FROM {MASKED_TABLE} WHERE id = $1", "m1", [23])
                                  + bind("m1", [b"1"])[:-rng.randint(1, 6)]),
        "bind-bad-format-masked": (parse(f"SELECT email FROM {MASKED_TABLE}", "m2")
                                   + frame(b"B", cstr("") + cstr("m2") + struct.pack("!hh", 1, 7)
                                           + struct.pack("!h", 0) + struct.pack("!h", 0)) + SYNC),
        "execute-after-error": query("SELECT 1/0") + execute("") + SYNC,
        "copy-in-then-query": query("COPY fz_sink FROM STDIN") + query("SELECT 2"),
        "copy-in-garbage-then-done": (query("COPY fz_sink FROM STDIN") + frame(b"d", b"x\ty\n")
                                      + frame(b"c", b"")),
        "function-call-bad-oid": frame(b"F", struct.pack("!IhhIh", 1, 0, 0, 0, 0)),
        "parse-unterminated": frame(b"P", b"name-without-nul"),
        "password-after-login": frame(b"p", cstr("pw")) + SYNC,
        "startup-after-login": startup_packet({"user": "x"}),
        "pipeline-valid-then-broken": query(f"SELECT 'ok-{rng.randint(0, 99)}'") + b"Q\x00\x00\x00\x02",
        "pipelined-masking": query("SELECT 'harmless'") + query(f"SELECT email FROM {MASKED_TABLE} ORDER BY id"),
    }
    name = rng.choice(sorted(opts))
    return name, opts[name]


def _startup_case(rng: random.Random, user: str) -> Case:
    params = {"user": user, "database": "postgres"}
    good = startup_packet(params)
    op = rng.choice(["len-short", "len-huge", "len-tiny", "bad-version", "garbage", "truncate",
                     "terminate-first", "ssl-then-garbage", "cancel-random", "no-user",
                     "unterminated-params", "during-auth", "gss-then-garbage", "flip"])
    auth_first = False
    if op == "len-short":
        data = struct.pack("!I", len(good) - rng.randint(1, 6)) + good[4:]
    elif op == "len-huge":
        data = struct.pack("!I", rng.choice([10001, 1 << 20, 0x7FFFFFFF])) + good[4:]
    elif op == "len-tiny":
        data = struct.pack("!I", rng.choice([0, 4, 7])) + good[4:]
    elif op == "bad-version":
        data = good[:4] + struct.pack("!I", rng.choice([0x00020000, 0x00040000, 0x00030009, 0x04D2FFFF])) + good[8:]
    elif op == "garbage":
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
    elif op == "truncate":
        data = good[:rng.randint(1, len(good) - 1)]
    elif op == "terminate-first":
        data = frame(b"X", b"") + good
    elif op == "ssl-then-garbage":
        data = struct.pack("!II", 8, 80877103)
    elif op == "gss-then-garbage":
        data = struct.pack("!II", 8, 80877104)
    elif op == "cancel-random":
        data = struct.pack("!IIII", 16, 80877102, rng.getrandbits(32), rng.getrandbits(32))
    elif op == "no-user":
        data = startup_packet({"database": "postgres"})
    elif op == "unterminated-params":
        data = good[:-2]
        data = struct.pack("!I", len(data)) + data[4:]
    elif op == "during-auth":
        auth_first = True
        _, data = _wrong_state(rng) if rng.random() < 0.3 else ("q", query("SELECT 1"))
        if rng.random() < 0.4:
            data = frame(b"p", bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 30))))
    else:
        _, data = _mutate_frame(rng, b"\x00" + good)
        data = data[1:]
    return Case("startup", op, data, auth_first=auth_first)


def make_case(rng: random.Random, user: str) -> Case:
    r = rng.random()
    if r < 0.25:
        return _startup_case(rng, user)
    if r < 0.55:
        name, data = _wrong_state(rng)
        return Case("session", name, data)
    frames = _valid_session_frames(rng)
    chosen = [rng.choice(frames) for _ in range(rng.randint(1, 6))]
    i = rng.randrange(len(chosen))
    op, bad = _mutate_frame(rng, chosen[i])
    chosen[i] = bad
    return Case("session", f"pipeline-{op}@{i}/{len(chosen)}", b"".join(chosen))


# -- running a case --------------------------------------------------------------------------

@dataclass
class Target:
    port: int
    user: str
    password: str


def _send_split(sock: socket.socket, data: bytes, rng: random.Random) -> None:
    i = 0
    while i < len(data):
        n = rng.randint(1, max(1, min(len(data) - i, rng.choice([1, 3, 7, 64, 4096]))))
        sock.sendall(data[i:i + n])
        i += n
        if rng.random() < 0.1:
            time.sleep(0.002)


def _collect(c: RawClient, deadline: float, want_marker: bool) -> tuple[list[str], str]:
    """SQLSTATEs until the marker row + ReadyForQuery ("ready") or a close ("closed")."""
    states: list[str] = []
    seen_marker = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return states, "hang"
        c.sock.settimeout(left)
        try:
            t, p = c.read()
        except (ConnectionError, OSError) as e:
            if isinstance(e, socket.timeout):
                return states, "hang"
            return states, "closed"
        if t == b"E":
            st = error_fields(p).get("C", "?")
            if not states or states[-1] != st:
                states.append(st)
        elif t == b"D" and MARKER.encode() in p:
            seen_marker = True
        elif t == b"Z" and seen_marker and want_marker:
            return states, "ready"


def run_case(target: Target, case: Case, split_seed: int, timeout: float) -> tuple[str, ...]:
    """The reply class: (ending, *SQLSTATEs)."""
    rng = random.Random(split_seed)
    tail = SYNC + query(f"SELECT '{MARKER}'")
    try:
        if case.kind == "startup":
            sock = socket.create_connection(("127.0.0.1", target.port), timeout=timeout)
            c = RawClient(sock)
            if case.auth_first:
                sock.sendall(startup_packet({"user": target.user, "database": "postgres"}))
                t, p = c.read()
                if t != b"R":
                    return ("unexpected-" + t.decode("latin1"),)
            try:
                _send_split(sock, case.data, rng)
            except (BrokenPipeError, ConnectionResetError):
                pass                   # the server closed early: read what it said
            deadline = time.monotonic() + min(FIRST_WAIT, timeout)
            states, ending = _collect(c, deadline, want_marker=False)
            if ending == "hang":
                # the server may be waiting for more bytes: a client that closes its side
                # must see the connection closed
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                states2, ending = _collect(c, time.monotonic() + timeout, want_marker=False)
                states += states2
                ending = "closed-after-eof" if ending == "closed" else ending
            sock.close()
            return (ending, *states)
        c = RawClient.connect(target.port, target.user, target.password, timeout=timeout)
        try:
            _send_split(c.sock, case.data + tail, rng)
        except (BrokenPipeError, ConnectionResetError):
            pass
        states, ending = _collect(c, time.monotonic() + min(FIRST_WAIT, timeout), want_marker=True)
        if ending == "hang":
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            states2, ending = _collect(c, time.monotonic() + timeout, want_marker=True)
            states += states2
            ending = "closed-after-eof" if ending == "closed" else ending
        c.sock.close()
        return (ending, *states)
    except Exception as e:        # a login that fails is a finding too
        return ("client-error", type(e).__name__, str(e)[:80])


# -- the judge -------------------------------------------------------------------------------

def proc_rss_kb(pid: int) -> int:
    """RSS of `pid` and its children (pgguard workers), in kB."""
    total = 0
    pids = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


@dataclass
class Report:
    cases: int = 0
    mismatches: list[tuple[str, bytes, tuple, tuple]] = field(default_factory=list)
    hangs: list[tuple[str, bytes]] = field(default_factory=list)
    crashed: str = ""
    healthy_failures: list[str] = field(default_factory=list)
    tracebacks: int = 0
    rss_start_kb: int = 0
    rss_end_kb: int = 0

    def ok(self, rss_bound_kb: int) -> bool:
        return not (self.mismatches or self.hangs or self.crashed or self.healthy_failures
                    or self.tracebacks or self.rss_end_kb - self.rss_start_kb > rss_bound_kb)

    def summary(self, limit: int = 8) -> str:
        out = [f"cases {self.cases}; mismatches {len(self.mismatches)}; hangs {len(self.hangs)}; "
               f"crashed: {self.crashed or 'no'}; healthy-session failures "
               f"{len(self.healthy_failures)}; tracebacks in log {self.tracebacks}; "
               f"RSS {self.rss_start_kb} kB -> {self.rss_end_kb} kB"]
        kinds: dict[str, int] = {}
        for name, _, _, _ in self.mismatches:
            kinds[name.split("@")[0]] = kinds.get(name.split("@")[0], 0) + 1
        if kinds:
            out.append("mismatches by case: " + ", ".join(f"{k} {v}" for k, v in
                                                          sorted(kinds.items(), key=lambda kv: -kv[1])))
        for name, data, want, got in self.mismatches[:limit]:
            out.append(f"  {name}: postgres {want} pgguard {got}\n    bytes {data[:120]!r}")
        for name, data in self.hangs[:limit]:
            out.append(f"  HANG {name}: {data[:120]!r}")
        out += [f"  healthy: {h}" for h in self.healthy_failures[:limit]]
        return "\n".join(out)


def _healthy_check(h: RawClient, n: int, guarded: bool) -> str | None:
    try:
        msgs = h.run(f"SELECT {n}, email FROM {MASKED_TABLE} WHERE id = 1")
        rows = [p for t, p in msgs if t == b"D"]
        errs = [error_fields(p).get("C") for t, p in msgs if t == b"E"]
        if errs or len(rows) != 1 or str(n).encode() not in rows[0]:
            return f"after case {n}: errors {errs} rows {rows}"
        if guarded and MASKED_SECRET.encode() in rows[0]:
            return f"after case {n}: masked column in clear {rows[0]!r}"
        if not guarded and MASKED_SECRET.encode() not in rows[0]:
            return f"after case {n}: allow identity got {rows[0]!r}"
    except Exception as e:
        return f"after case {n}: {type(e).__name__} {e}"
    return None


def prepare_upstream(pg) -> None:
    """The fuzz cases' tables (a masked one and a COPY sink) on the upstream."""
    pg.execute(f"""
        DROP TABLE IF EXISTS {MASKED_TABLE}, fz_sink;
        CREATE TABLE {MASKED_TABLE} (id int PRIMARY KEY, email text);
        INSERT INTO {MASKED_TABLE} VALUES (1, '{MASKED_SECRET}'), (2, 'other.secret@example.org');
        CREATE TABLE fz_sink (a text, b text);
        GRANT ALL ON {MASKED_TABLE}, fz_sink TO PUBLIC;
    """)


def run(direct: Target, proxied: Target, proxy_proc, proxy_log: Path, *, seed: int,
        seconds: float, guarded: bool, timeout: float = 3.0, max_cases: int | None = None,
        on_case=None) -> Report:
    """Fuzz for `seconds` (or `max_cases`): each case against Postgres, then pgguard."""
    rng = random.Random(seed)
    rep = Report()
    log_start = proxy_log.stat().st_size if proxy_log.exists() else 0
    healthy = RawClient.connect(proxied.port, proxied.user, proxied.password, timeout=timeout * 3)
    rep.rss_start_kb = proc_rss_kb(proxy_proc.pid)
    end = time.monotonic() + seconds
    while time.monotonic() < end and (max_cases is None or rep.cases < max_cases):
        # the same case for both, only the user name differs (startup packets carry it)
        case_seed = rng.getrandbits(64)
        case_d = make_case(random.Random(case_seed), direct.user)
        case_p = make_case(random.Random(case_seed), proxied.user)
        split_seed = rng.getrandbits(32)
        want = run_case(direct, case_d, split_seed, timeout)
        got = run_case(proxied, case_p, split_seed, timeout)
        rep.cases += 1
        if on_case:
            on_case(rep.cases, case_p, want, got)
        if got[0] == "hang":
            rep.hangs.append((case_p.name, case_p.data))
        elif want != got:
            rep.mismatches.append((case_p.name, case_p.data, want, got))
        if proxy_proc.poll() is not None:
            rep.crashed = f"pgguard exited with {proxy_proc.returncode} after {case_p.name}"
            break
        problem = _healthy_check(healthy, rep.cases, guarded)
        if problem:
            rep.healthy_failures.append(f"{problem} (case {case_p.name})")
            try:
                healthy.sock.close()
                healthy = RawClient.connect(proxied.port, proxied.user, proxied.password,
                                            timeout=timeout * 3)
            except Exception as e:
                rep.healthy_failures.append(f"healthy session cannot reconnect: {e}")
                break
    rep.rss_end_kb = proc_rss_kb(proxy_proc.pid)
    try:
        healthy.close()
    except Exception:
        pass
    text = proxy_log.read_bytes()[log_start:].decode(errors="replace") if proxy_log.exists() else ""
    rep.tracebacks = text.count("Traceback (most recent call last)")
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--cases", type=int, default=None,
                    help="stop after this many cases per identity (a fixed seed set)")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("PGFUZZ_SEED", "13")))
    ap.add_argument("--identity", choices=["allow", "guarded", "both"], default="both")
    ap.add_argument("--timeout", type=float, default=3.0, help="per reply, seconds")
    ap.add_argument("--rss-bound-mb", type=float, default=64)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    import tempfile

    from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER, Proxy
    from pgcluster import PgCluster

    pg = PgCluster().start()
    pg.create_role(UPSTREAM_USER, UPSTREAM_PASSWORD, "scram-sha-256")
    pg.execute(f"ALTER ROLE {UPSTREAM_USER} SUPERUSER")
    prepare_upstream(pg)
    direct = Target(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD)
    modes = ["allow", "guarded"] if args.identity == "both" else [args.identity]
    failed = False
    try:
        for mode in modes:
            tmp = Path(tempfile.mkdtemp(prefix=f"pgfuzz-{mode}-"))
            proxy = Proxy(pg, tmp, extra=GUARDED_EXTRA if mode == "guarded" else "")
            if mode == "guarded":
                proxy.config.write_text(proxy.config.read_text().replace(
                    'agents = "allow"', 'agents = "guarded"'))
            proxy.start()
            try:
                cb = None
                if args.verbose:
                    def cb(n, case, want, got):
                        if want != got:
                            print(f"[{n}] {case.name}: postgres {want} pgguard {got}", flush=True)
                rep = run(direct, Target(proxy.port, AGENT, AGENT_PASSWORD), proxy.proc, proxy.log,
                          seed=args.seed, seconds=args.seconds / len(modes), guarded=mode == "guarded",
                          timeout=args.timeout, max_cases=args.cases, on_case=cb)
            finally:
                proxy.stop()
            print(f"== {mode} identity (seed {args.seed}); proxy log {proxy.log}")
            print(rep.summary())
            failed |= not rep.ok(int(args.rss_bound_mb * 1024))
    finally:
        pg.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
