# Leak checks for the masking tests: a recording TCP hop between any client and pgguard,
# every backend message it carried, and the forms of a clear value none of them may hold.
from __future__ import annotations

import base64
import socket
import struct
import subprocess
import threading

import pytest

import rawpg
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, UPSTREAM_USER, Proxy

DB = "mask2db"

# unique, searchable values: no other test data holds them
EMAILS = ["zqalpha.7731@example.com", "wvbravo.4419@example.org", "kxcharlie.5521@example.net"]
SSNS = ["219-43-6571", "345-67-1234", "412-88-3057"]
NAMES = ["Ada", "Grace", "Edsger"]

MASKS = """
[[masks]]
column = "public.customers.email"
strategy = "email"
except_groups = ["dba"]

[[masks]]
column = "public.customers.ssn"
strategy = "partial"
keep = 4
except_groups = ["dba"]

[detectors]
builtin = ["email", "ssn", "credit_card", "aws_access_key"]
"""

SEED = """
DROP TABLE IF EXISTS customers, plain_notes, docs CASCADE;
DROP TYPE IF EXISTS contact CASCADE;
CREATE TABLE customers (id int PRIMARY KEY, name text, email text UNIQUE, ssn text,
                        city text);
INSERT INTO customers VALUES
  (1, 'Ada', 'zqalpha.7731@example.com', '219-43-6571', 'London'),
  (2, 'Grace', 'wvbravo.4419@example.org', '345-67-1234', 'New York'),
  (3, 'Edsger', 'kxcharlie.5521@example.net', '412-88-3057', 'Austin');
CREATE TABLE plain_notes (id int PRIMARY KEY, body text, n int);
INSERT INTO plain_notes VALUES (1, 'write to zqalpha.7731@example.com today', 7),
  (2, 'ssn 219-43-6571 on file', 8), (3, 'nothing to see here', 9);
CREATE TYPE contact AS (label text, mail text, n int);
CREATE TABLE docs (id int PRIMARY KEY, tags text[], meta jsonb, metas jsonb[],
                   who contact, whos contact[], x xml, grid text[][]);
INSERT INTO docs VALUES
  (1, ARRAY['vip', 'zqalpha.7731@example.com'], '{"mail": "zqalpha.7731@example.com"}',
   ARRAY['{"ssn": "219-43-6571"}'::jsonb], ROW('home', 'zqalpha.7731@example.com', 1),
   ARRAY[ROW('w', 'wvbravo.4419@example.org', 2)::contact],
   '<p>mail zqalpha.7731@example.com</p>', ARRAY[['a', '219-43-6571'], ['b', 'c']]),
  (2, ARRAY['plain', 'tag'], '{"n": 1}', ARRAY['{"k": "v"}'::jsonb], ROW('x', 'y', 2),
   ARRAY[ROW('z', 'q', 3)::contact], '<p>hello</p>', ARRAY[['a', 'b'], ['c', 'd']]);
CREATE OR REPLACE FUNCTION cust_email(int) RETURNS text LANGUAGE sql
  AS 'SELECT email FROM customers WHERE id = $1';
CREATE OR REPLACE FUNCTION cust_ssn(int) RETURNS text LANGUAGE sql
  AS 'SELECT ssn FROM customers WHERE id = $1';
CREATE OR REPLACE FUNCTION cust_hex(int) RETURNS text LANGUAGE sql
  AS 'SELECT encode(email::bytea, ''hex'') FROM customers WHERE id = $1';
CREATE OR REPLACE FUNCTION set_app(v text) RETURNS text LANGUAGE plpgsql
  AS 'BEGIN PERFORM set_config(''application_name'', v, false); RETURN ''ok''; END';
"""


def seed(pg) -> None:
    if not pg.execute(f"SELECT 1 FROM pg_database WHERE datname = '{DB}'"):
        pg.execute(f"CREATE DATABASE {DB} OWNER {UPSTREAM_USER}")
    for stmt in SEED.split(";\n"):
        if stmt.strip():
            pg.execute(stmt, dbname=DB)
    pg.execute(f"ALTER TABLE customers OWNER TO {UPSTREAM_USER}", dbname=DB)


def forms(value: str) -> set[bytes]:
    """The clear value and the forms an agent could turn it into."""
    raw = value.encode()
    out = {raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw),
           raw[::-1], raw.upper(), raw.lower()}
    digits = bytes(c for c in raw if 48 <= c <= 57)
    if len(digits) >= 6:
        out.add(digits)
    return out


def secret_forms() -> set[bytes]:
    out: set[bytes] = set()
    for v in EMAILS + SSNS:
        out |= forms(v)
    return out


SECRETS = secret_forms()
# backend messages the leak check reads (every one the client gets is checked)
CHANNELS = {b"D": "DataRow", b"d": "CopyData", b"E": "ErrorResponse",
            b"N": "NoticeResponse", b"A": "NotificationResponse",
            b"S": "ParameterStatus", b"V": "FunctionCallResponse"}


def leaks(messages, secrets: set[bytes] = SECRETS) -> list[tuple[str, bytes]]:
    """(message type, form) of every secret form found in any backend message."""
    found = []
    for t, payload in messages:
        for form in secrets:
            if form in payload:
                found.append((t.decode("latin-1"), form))
    return found


def split(stream: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 0
    while pos + 5 <= len(stream):
        (n,) = struct.unpack_from("!I", stream, pos + 1)
        out.append((stream[pos:pos + 1], stream[pos + 5:pos + 1 + n]))
        pos += 1 + n
    return out


def _untyped_requests(client: bytes) -> int:
    # SSLRequest / GSSENCRequest packets before the StartupMessage: one byte back each
    n, pos = 0, 0
    while pos + 8 <= len(client):
        (ln, code) = struct.unpack_from("!II", client, pos)
        if code in (80877103, 80877104) and ln == 8:
            n += 1
            pos += 8
            continue
        break
    return n


class Tap:
    """A TCP hop that records what the server sends. ``dsn()`` connects through it;
    ``messages()`` are every backend message of every connection so far."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[tuple[bytearray, bytearray]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            rec = (bytearray(), bytearray())
            with self.lock:
                self.conns.append(rec)
            threading.Thread(target=self._pump, args=(c, u, rec[0]), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, rec[1]), daemon=True).start()

    @staticmethod
    def _pump(src, dst, buf: bytearray) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                buf += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset(self) -> None:
        with self.lock:
            self.conns = []

    def messages(self) -> list[tuple[bytes, bytes]]:
        out = []
        with self.lock:
            conns = list(self.conns)
        for client, server in conns:
            skip = _untyped_requests(bytes(client))
            out += split(bytes(server[skip:]))
        return out

    def dsn(self, human: bool = False, db: str = DB) -> str:
        user, pw = (HUMAN, HUMAN_PASSWORD) if human else (AGENT, AGENT_PASSWORD)
        return (f"postgresql://{user}:{pw}@127.0.0.1:{self.port}/{db}"
                "?sslmode=disable")

    def close(self) -> None:
        self.sock.close()


def types_seen(messages) -> set[str]:
    return {t.decode("latin-1") for t, _ in messages}


def env_fixture(name: str, setup: str | None = None):
    """A module fixture: the seeded database, a pgguard with MASKS in front of it and a
    Tap in front of that, as (proxy, tap)."""
    @pytest.fixture(scope="module")
    def env(pg, tmp_path_factory):
        seed(pg)
        if setup:
            pg.execute(setup, dbname=DB)
        p = Proxy(pg, tmp_path_factory.mktemp(name), extra=MASKS).start()
        tap = Tap(p.port)
        yield p, tap
        tap.close()
        p.stop()
    return env


def connect(port: int, human: bool = False) -> rawpg.RawClient:
    user, pw = (HUMAN, HUMAN_PASSWORD) if human else (AGENT, AGENT_PASSWORD)
    return rawpg.RawClient.connect(port, user, pw, database=DB)


def psql_messages(psql_bin: str, tap: Tap, sql: str, human: bool = False,
                  check: bool = True) -> list[tuple[bytes, bytes]]:
    """Run psql -c sql through the tap; every backend message it got."""
    tap.reset()
    r = subprocess.run([psql_bin, "-X", "-d", tap.dsn(human=human), "-c", sql],
                       capture_output=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return tap.messages()
