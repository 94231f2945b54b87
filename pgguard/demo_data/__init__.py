# Sample data for `pgguard demo`: deterministic fake customers (with PII) and orders.
"""The demo's shop: ``customers`` full of personal data and ``orders``.

Everything is generated from a fixed seed, so every demo database holds the same rows.
Example::

    from pgguard import demo_data
    script = demo_data.load_script()     # SQL for psql: schema, COPY data, indexes
    rows = demo_data.customers()         # [(id, name, email, ssn, card, phone, notes), ...]

The values only look real: emails use reserved domains (RFC 2606), SSNs avoid the
ranges never issued, card numbers pass the Luhn check but use test prefixes, phones
are in the fictional 555-01xx block, and the AWS keys are made up.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import random
from importlib import resources

# Bump when the rows or the schema change: existing demo databases then reload.
DATA_VERSION = 1
SEED = 20240601
N_CUSTOMERS = 200
N_ORDERS = 1000

_FIRST = (
    "Olivia Liam Emma Noah Amelia Oliver Sophia Elijah Mia James Isabella William Ava "
    "Benjamin Harper Lucas Evelyn Henry Aisha Mateo Chloe Wei Priya Arjun Fatima Omar "
    "Yuki Hiroshi Ingrid Lars Sofia Diego Camila Mateus Ana Kwame Amara Chinedu Zanele "
    "Siobhan Declan Marta Tomasz Elena Dmitri Leila Reza Nora Jonas Chiara Luca Grace "
    "Samuel Hannah Daniel Zoe Ethan Maya Gabriel"
).split()
_LAST = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez "
    "Lopez Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson "
    "White Harris Clark Lewis Robinson Walker Young Allen King Wright Scott Nguyen Chen "
    "Patel Kim Okafor Mensah Kowalski Novak Rossi Ferrari Müller Schmidt Johansson "
    "Nielsen O'Brien Murphy Tanaka Sato Haddad Rahman Silva Santos Ivanova Cohen Dubois"
).split()
_DOMAINS = ("example.com", "example.org", "example.net", "mail.example", "shop.test")
_AREA = (212, 213, 305, 312, 415, 503, 512, 617, 646, 702, 713, 206, 303, 404, 808)
_STATUS = (("delivered", 45), ("shipped", 15), ("paid", 15), ("pending", 12),
           ("refunded", 6), ("cancelled", 7))
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def luhn_digit(partial: str) -> str:
    """The check digit that makes ``partial + digit`` pass the Luhn test."""
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:      # these get doubled once the check digit is appended
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def luhn_ok(number: str) -> bool:
    digits = [c for c in number if c.isdigit()]
    return len(digits) > 1 and luhn_digit("".join(digits[:-1])) == digits[-1]


def _card(rng: random.Random) -> str:
    kind = rng.choices(("visa", "mc", "amex", "discover"), (50, 30, 12, 8))[0]
    if kind == "visa":
        prefix, length = "4", 16
    elif kind == "mc":
        prefix, length = str(rng.randint(51, 55)), 16
    elif kind == "amex":
        prefix, length = rng.choice(("34", "37")), 15
    else:
        prefix, length = "6011", 16
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    return body + luhn_digit(body)


def _ssn(rng: random.Random) -> str:
    area = rng.randint(1, 899)
    while area == 666:
        area = rng.randint(1, 899)
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def _phone(rng: random.Random) -> str:
    return f"({rng.choice(_AREA)}) 555-01{rng.randrange(100):02d}"


def _aws_key(rng: random.Random) -> str:
    return "AKIA" + "".join(rng.choice(_B32) for _ in range(16))


def _jwt(rng: random.Random, sub: int) -> str:
    def b64(obj) -> str:
        raw = json.dumps(obj, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    sig = base64.urlsafe_b64encode(rng.randbytes(32)).rstrip(b"=").decode()
    header = b64({"alg": "HS256", "typ": "JWT"})
    return f"{header}.{b64({'sub': str(sub), 'iat': 1717200000})}.{sig}"


def _ascii(s: str) -> str:
    return (s.replace("ü", "u").replace("'", "").replace(" ", "").lower())


def _note(rng: random.Random, cid: int, first: str, last: str, ssn: str, card: str) -> str | None:
    r = rng.random()
    if r < 0.45:
        return None
    alt = f"{_ascii(first)}.{_ascii(last)}{rng.randint(1, 99)}@{rng.choice(_DOMAINS)}"
    day = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(540))
    templates = [
        f"Prefers to be contacted at {alt} rather than the account email.",
        f"Called support on {day}; asked to update the billing address.",
        f"VIP since {rng.randint(2015, 2023)}. Send the holiday gift card.",
        f"Disputed a charge on the card ending {card[-4:]}; refunded on {day}.",
        f"Referred by employee EMP-{rng.randint(100000, 999999)}.",
        f"Pasted an access key into ticket #{rng.randint(1000, 9999)}: {_aws_key(rng)} "
        "(asked them to rotate it).",
        f"Asked us to remove SSN {ssn} from the old account.",
        f"Integration test account; token {_jwt(rng, cid)} expires never.",
        f"Prefers phone calls after 5pm at {_phone(rng)}.",
        "Gate code 4411. Leave parcels with the neighbour at no. 12.",
    ]
    return rng.choice(templates)


def customers() -> list[tuple]:
    """``(id, name, email, ssn, card_number, phone, notes)`` for every customer."""
    rng = random.Random(SEED)
    rows, seen = [], set()
    for cid in range(1, N_CUSTOMERS + 1):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        style = rng.randrange(4)
        f, l_ = _ascii(first), _ascii(last)
        local = (f"{f}.{l_}", f"{f[0]}{l_}", f"{f}{rng.randint(1, 99)}", f"{f}_{l_}")[style]
        email = f"{local}@{rng.choice(_DOMAINS)}"
        if email in seen:
            email = f"{local}{cid}@{rng.choice(_DOMAINS)}"
        seen.add(email)
        ssn = _ssn(rng)
        card = _card(rng)
        phone = _phone(rng)
        notes = _note(rng, cid, first, last, ssn, card)
        rows.append((cid, f"{first} {last}", email, ssn, card, phone, notes))
    return rows


def orders() -> list[tuple]:
    """``(id, customer_id, amount, status, created_at)`` for every order (UTC times)."""
    rng = random.Random(SEED + 1)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    span = int(dt.timedelta(days=540).total_seconds())
    statuses = [s for s, _ in _STATUS]
    weights = [w for _, w in _STATUS]
    rows = []
    times = sorted(rng.randrange(span) for _ in range(N_ORDERS))
    for oid, secs in enumerate(times, start=1):
        cid = rng.randint(1, N_CUSTOMERS)
        amount = round(min(2500.0, max(4.99, rng.lognormvariate(4.0, 0.9))), 2)
        rows.append((oid, cid, f"{amount:.2f}", rng.choices(statuses, weights)[0],
                     (start + dt.timedelta(seconds=secs)).isoformat(sep=" ")))
    return rows


def _copy_value(v) -> str:
    if v is None:
        return r"\N"
    s = str(v)
    return (s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


def _copy_block(table: str, columns: tuple[str, ...], rows: list[tuple]) -> str:
    lines = [f"COPY {table} ({', '.join(columns)}) FROM stdin;"]
    lines += ["\t".join(_copy_value(v) for v in row) for row in rows]
    lines.append("\\.")
    return "\n".join(lines) + "\n"


def _sql(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text()


def load_script() -> str:
    """One psql script (run it with ``psql -1 -v ON_ERROR_STOP=1``) that (re)creates the
    sample tables, loads every row and builds the indexes."""
    return "".join([
        "SET client_min_messages = warning;\n",
        _sql("schema.sql"),
        _copy_block("customers", ("id", "name", "email", "ssn", "card_number", "phone", "notes"),
                    customers()),
        _copy_block("orders", ("id", "customer_id", "amount", "status", "created_at"), orders()),
        _sql("indexes.sql"),
    ])


# What `pgguard demo` compares to decide whether the sample data is still as loaded
# (a statement tried through the proxy may have changed it). Same text, same answer.
FINGERPRINT_SQL = """\
SET TimeZone = 'UTC';
SELECT md5(concat_ws('|',
  (SELECT string_agg(c::text, ',' ORDER BY c.id) FROM customers c),
  (SELECT string_agg(o::text, ',' ORDER BY o.id) FROM orders o),
  (SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes
    WHERE schemaname = 'public' AND tablename IN ('customers', 'orders')),
  (SELECT string_agg(attname, ',' ORDER BY attrelid, attnum) FROM pg_attribute
    WHERE attrelid IN ('customers'::regclass, 'orders'::regclass) AND attnum > 0
      AND NOT attisdropped)));
"""
