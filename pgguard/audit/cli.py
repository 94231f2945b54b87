# `pgguard audit ...`: query, follow, replay, verify and report on the audit log (DuckDB).
"""Query and verify the pgguard audit log.

Examples::

    pgguard audit -c pgguard.toml sql "SELECT identity, decision, count(*) FROM audit GROUP BY ALL"
    pgguard audit --dir audit tail -n 20 -f
    pgguard audit sessions --since 1d
    pgguard audit replay 3f9c2a
    pgguard audit verify
    pgguard audit report --since 7d --html report.html
    pgguard audit --store s3://audit-bucket/pgguard verify     # the whole fleet

With ``[audit] store`` in the config (or ``--store URI``), every command reads every
instance's files in the object store, plus this instance's local files not uploaded yet
and its WAL; the view gains a column ``instance``. The store's credentials come from the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL).

The view ``audit`` has every column of the audit schema plus ``dt`` (the UTC day of the
file). Outside pgguard the same data is
``SELECT * FROM read_parquet('<dir>/**/*.parquet', hive_partitioning = true)``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import duckdb
import orjson

from .. import config
from ..approvals.hold import visible
from ..cliparse import Parser as _Parser
from ..cliparse import UsageError as _UsageError
from ..errors import PgguardError
from . import report, storage
from .query import fetch, open_audit, parse_when, rows_as_dicts
from .record import UTC
from .store import UPLOADED_DIR, Store, read_uploaded
from .verify import verify, verify_store


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="pgguard TOML config: uses [audit] dir")
    common.add_argument("--dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="the audit directory (instead of -c)")
    common.add_argument("--store", metavar="URI", default=argparse.SUPPRESS,
                        help="an audit store (s3://bucket/prefix, gs://..., file:///...): "
                        "read every instance's files there (instead of -c's [audit] store)")
    common.add_argument("--instance", metavar="NAME", default=argparse.SUPPRESS,
                        help="with --store and --dir: the instance whose local dir that is")
    p = _Parser(prog="pgguard audit", parents=[common], description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("sql", parents=[common], help="run SQL over the view `audit`",
                       description="Run DuckDB SQL; the view `audit` holds every record.\n\n"
                       "  pgguard audit sql \"SELECT identity, count(*) FROM audit "
                       "WHERE decision = 'blocked' GROUP BY ALL\"",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("query", help="SQL text (DuckDB dialect)")
    s.add_argument("--json", action="store_true", help="a JSON array of objects on stdout")
    s.add_argument("--max-width", type=int, default=80, metavar="N",
                   help="truncate cells wider than N characters (0: never; default 80)")
    s.add_argument("--no-wal", action="store_true",
                   help="sealed Parquet files only (skip records still in the WAL)")

    s = sub.add_parser("tail", parents=[common], help="show the latest records; -f follows",
                       description="Show the latest records, oldest first.\n\n"
                       "  pgguard audit tail -n 50 -f",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("-n", type=int, default=10, metavar="N", help="how many (default 10)")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    s.add_argument("--interval", type=float, default=0.5, metavar="S",
                   help="poll interval with -f, seconds (default 0.5)")
    s.add_argument("--json", action="store_true", help="one JSON object per line")

    s = sub.add_parser("sessions", parents=[common], help="one line per session",
                       description="One line per session: who, from where, how much, "
                       "how much refused.\n\n  pgguard audit sessions --since 1d "
                       "--identity ci-agent",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--since", default=None, metavar="WHEN",
                   help="a duration back from now (30m, 7d) or a date/time (2024-05-01)")
    s.add_argument("--identity", default=None, help="only this identity")
    s.add_argument("--limit", type=int, default=100, metavar="N", help="default 100")
    s.add_argument("--json", action="store_true", help="a JSON array on stdout")

    s = sub.add_parser("replay", parents=[common], help="a session's events in order",
                       description="A session's events in order: decisions, timing, rows."
                       "\n\n  pgguard audit replay 3f9c2a   (an unambiguous prefix is "
                       "enough)", formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("session", help="session_id, or an unambiguous prefix of it")
    s.add_argument("--json", action="store_true", help="a JSON array on stdout")
    s.add_argument("--max-width", type=int, default=100, metavar="N",
                   help="truncate statements wider than N characters (0: never)")

    s = sub.add_parser("verify", parents=[common], help="check the hash chain",
                       description="Check every record and file of the hash chain; name "
                       "the first modified, deleted, reordered or missing record or file. "
                       "Exit status 1 when anything is wrong.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.add_argument("--allow-pruned", action="store_true",
                   help="accept chains whose first files were deleted on purpose")

    s = sub.add_parser("report", parents=[common], help="evidence report (Markdown / HTML)",
                       description="Evidence summary per identity: statements, refused, "
                       "approved, masked reads; Markdown on stdout.\n\n"
                       "  pgguard audit report --since 7d --html report.html --verify",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--since", default="7d", metavar="WHEN",
                   help="a duration back from now (7d) or a date/time (default 7d)")
    s.add_argument("--until", default=None, metavar="WHEN", help="default: now")
    s.add_argument("--html", default=None, metavar="FILE",
                   help="also write an HTML page with charts to FILE")
    s.add_argument("--verify", action="store_true",
                   help="verify the hash chain and state the result in the report")
    return p


# -- helpers ---------------------------------------------------------------------------

@dataclass
class _Source:
    """What a command reads: a local audit dir, an object store, or both (then
    *instance* names whose local dir it is)."""

    root: Path | None
    store: Store | None = None
    instance: str | None = None

    def open(self, include_wal: bool = True) -> tuple[duckdb.DuckDBPyConnection, Any]:
        return open_audit(self.root if self.store is not None else _existing(self.root),
                          include_wal=include_wal, store=self.store, instance=self.instance)

    def verify(self, allow_pruned: bool = False) -> Any:
        if self.store is not None:
            return verify_store(self.store, root=self.root, instance=self.instance,
                                allow_pruned=allow_pruned)
        return verify(_existing(self.root), allow_pruned=allow_pruned)

    def describe(self) -> str:
        return self.store.uri if self.store is not None else str(self.root)


def _resolve(args: argparse.Namespace) -> _Source:
    store_uri = getattr(args, "store", None)
    instance = getattr(args, "instance", None)
    if getattr(args, "dir", None):
        if store_uri and not instance:
            raise PgguardError("--store with --dir needs --instance (whose dir it is), so "
                               "files both local and uploaded are counted once")
        root = Path(args.dir)
        if not store_uri:
            _not_uploading(root)
        return _Source(root, Store.open(store_uri) if store_uri else None,
                       instance if store_uri else None)
    cfg_path = getattr(args, "config", None)
    if cfg_path is None and store_uri:
        return _Source(None, Store.open(store_uri), None)
    if cfg_path is None and Path("pgguard.toml").is_file():
        cfg_path = "pgguard.toml"
    if cfg_path is None:
        raise PgguardError("no audit directory: give -c pgguard.toml or --dir DIR "
                           "(or --store URI for an object store)")
    cfg = config.load(cfg_path)
    d = Path(cfg.audit.dir)
    root = d if d.is_absolute() else Path(cfg.base_dir) / d
    store_uri = store_uri or cfg.audit.store
    if not store_uri:
        return _Source(root)
    return _Source(root, Store.open(store_uri), instance or config.instance_name(cfg))


def _not_uploading(root: Path) -> None:
    # a dir whose sealed files go to a store holds only what is not uploaded yet: read
    # alone, it would look like a chain with its files deleted
    for p in sorted((root / UPLOADED_DIR).glob("*.json")):
        try:
            u = read_uploaded(root, p.stem)
        except PgguardError:
            continue
        if u is not None:
            raise PgguardError(f"{root} uploads its sealed files to {u.store}: read it with "
                               f"--store {u.store} --instance {u.instance} (or -c)")


def _existing(root: Path | None) -> Path:
    if root is None or not root.is_dir():
        raise PgguardError(f"no audit log at {root}")
    return root


_when = parse_when


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, datetime):
        if v.utcoffset() == timedelta(0):
            return v.strftime("%Y-%m-%d %H:%M:%S.%f") + "Z"
        return v.isoformat(sep=" ")
    if isinstance(v, (list, tuple)):
        return "{" + ",".join(_fmt(x) for x in v) + "}"
    if isinstance(v, bool):
        return "t" if v else "f"
    return str(v)


def _json_default(v: Any) -> Any:
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, timedelta):
        return v.total_seconds()
    return str(v)


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, default=_json_default,
                        option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z)


def _print_table(names: list[str], rows: list[tuple], out: TextIO, max_width: int = 80,
                 footer: bool = True) -> None:
    def clip(s: str) -> str:
        # control and format characters spelled out: a statement's escape sequences,
        # carriage returns or bidi overrides must not redraw the auditor's terminal
        s = visible(s).replace("\n", "\\n")
        return s if not max_width or len(s) <= max_width else s[:max_width - 1] + "…"

    cells = [[clip(_fmt(v)) for v in r] for r in rows]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float, Decimal)) and
                                  not isinstance(r[i], bool) or r[i] is None for r in rows)
               for i in range(len(names))]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    out.write(" | ".join(n.center(w) for n, w in zip(names, widths)).rstrip() + "\n")
    out.write("-+-".join("-" * w for w in widths) + "\n")
    for c in cells:
        out.write(" | ".join(v.rjust(w) if num else v.ljust(w)
                             for v, w, num in zip(c, widths, numeric)).rstrip() + "\n")
    if footer:
        out.write(f"({len(rows)} row{'' if len(rows) == 1 else 's'})\n")


# -- commands --------------------------------------------------------------------------

def _cmd_sql(args: argparse.Namespace, src: _Source, out: TextIO) -> int:
    con, snap = src.open(include_wal=not args.no_wal)
    if snap.foreign:
        print(f"pgguard audit: warning: {len(snap.foreign)} .parquet file(s) that are not part "
              f"of any audit chain were left out (run `pgguard audit verify`)",
              file=sys.stderr)
    names, rows = fetch(con, args.query)
    if args.json:
        out.write(_dumps([dict(zip(names, r)) for r in rows]).decode() + "\n")
    elif names:
        _print_table(names, rows, out, args.max_width)
    return 0


_TAIL_COLS = ("event_id", "ts", "session_id", "identity", "identity_kind", "event",
              "decision", "rule", "rows", "duration_us", "sqlstate", "statement", "error")


def _tail_line(r: dict) -> str:
    ts = r["ts"].strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z" if r.get("ts") else "?"
    who = f"{r.get('identity') or '-'}"
    if r.get("identity_kind"):
        who += f"({r['identity_kind']})"
    parts = [ts, who, (r.get("session_id") or "-")[:12], r.get("event") or "?"]
    if r.get("decision"):
        parts.append(r["decision"] + (f"[{r['rule']}]" if r.get("rule") else ""))
    if r.get("rows") is not None:
        parts.append(f"rows={r['rows']}")
    if r.get("duration_us") is not None:
        parts.append(f"{r['duration_us'] / 1000:.1f}ms")
    if r.get("sqlstate"):
        parts.append(f"sqlstate={r['sqlstate']}")
    line = "  ".join(parts)
    if r.get("statement"):
        line += "  " + visible(r["statement"]).replace("\n", " ")
    if r.get("error"):
        line += "  error: " + visible(r["error"]).replace("\n", " ")
    return line


def _emit(rows: list[dict], args: argparse.Namespace, out: TextIO) -> None:
    for r in rows:
        if args.json:
            out.write(_dumps(r).decode() + "\n")
        else:
            out.write(_tail_line(r) + "\n")
    out.flush()


def _cmd_tail(args: argparse.Namespace, src: _Source, out: TextIO) -> int:
    if args.follow and src.root is None:
        raise PgguardError("tail -f follows a local audit dir (give -c or --dir)")
    cols = ", ".join(_TAIL_COLS)
    con, snap = src.open()
    root = src.root
    rows = rows_as_dicts(con, f"SELECT {cols} FROM (SELECT {cols} FROM audit "
                              f"ORDER BY ts DESC, event_id DESC LIMIT {max(args.n, 0)}) "
                              f"ORDER BY ts, event_id")
    _emit(rows, args, out)
    if not args.follow:
        return 0
    # what has been seen: sealed files by (stream, seq); open WAL segments by how far
    # they were read (a growing segment is read from there on, not from the start)
    seen_files = {(f.stream, f.seq) for f in snap.files}
    wal_printed = {(s, q): t.num_rows for s, q, t in snap.wal}
    wal_pos: dict[tuple[str, int], storage.WalSegment] = {}
    try:
        while True:
            time.sleep(args.interval)
            new = _follow_poll(root, seen_files, wal_printed, wal_pos)
            new.sort(key=lambda r: (r["ts"], r["event_id"]))
            _emit(new, args, out)
    except KeyboardInterrupt:
        return 0


def _follow_poll(root: Path, seen_files: set, wal_printed: dict, wal_pos: dict) -> list[dict]:
    import pyarrow.parquet as pq

    new: list[dict] = []
    for stream in storage.list_wal_streams(root):
        for seq, path in storage.list_wal(root, stream):
            key = (stream, seq)
            if key in seen_files:
                continue
            prev = wal_pos.get(key)
            try:
                # a segment seen before is read on from where we stopped
                seg = storage.read_wal(path, resume=prev)
            except (FileNotFoundError, storage.AuditError):
                continue            # sealed meanwhile: picked up as a file below
            wal_pos[key] = seg
            if not seg.records:
                continue
            t = storage.wal_table(seg)
            done = wal_printed.get(key, 0) if prev is None else 0
            if t.num_rows > done:
                new.extend(t.slice(done).select(list(_TAIL_COLS)).to_pylist())
            wal_printed[key] = (max(done, t.num_rows) if prev is None
                                else wal_printed.get(key, 0) + t.num_rows)
    streams, _ = storage.list_parquet(root)
    for files in streams.values():
        for f in files:
            key = (f.stream, f.seq)
            if key in seen_files:
                continue
            seen_files.add(key)
            wal_pos.pop(key, None)
            done = wal_printed.pop(key, 0)
            t = pq.read_table(f.path, columns=list(_TAIL_COLS))
            if t.num_rows > done:
                new.extend(t.slice(done).to_pylist())
    return new


def _cmd_sessions(args: argparse.Namespace, src: _Source, out: TextIO) -> int:
    con, _ = src.open()
    where, params = [], []
    if args.since:
        where.append("ts >= ?")
        params.append(_when(args.since, datetime.now(UTC)))
    if args.identity:
        where.append("identity = ?")
        params.append(args.identity)
    cond = ("WHERE " + " AND ".join(where)) if where else ""
    names, rows = fetch(con, f"""
        SELECT session_id, any_value(identity) AS identity,
               any_value(identity_kind) AS kind, any_value(client_addr) AS client_addr,
               any_value(application_name) AS application, any_value(database) AS database,
               min(ts) AS started,
               max(ts) FILTER (event IN ('disconnect', 'auth_failed')) AS ended,
               CASE WHEN bool_or(event = 'auth_failed') AND NOT bool_or(event = 'connect')
                    THEN 'auth_failed' END AS login,
               count(*) FILTER (event = 'statement') AS statements,
               count(*) FILTER (decision IN ('blocked', 'denied', 'timed_out')) AS refused,
               count(*) FILTER (decision = 'approved') AS approved,
               coalesce(sum(rows), 0)::BIGINT AS rows,
               coalesce(sum(masked_cells), 0)::BIGINT AS masked_cells
        FROM audit {cond}
        GROUP BY session_id HAVING session_id <> ''
        ORDER BY started DESC LIMIT {max(args.limit, 0)}""", params or None)
    if args.json:
        out.write(_dumps([dict(zip(names, r)) for r in rows]).decode() + "\n")
    else:
        _print_table(names, rows, out)
    return 0


def _cmd_replay(args: argparse.Namespace, src: _Source, out: TextIO) -> int:
    con, _ = src.open()
    _, ids = fetch(con, "SELECT DISTINCT session_id FROM audit WHERE starts_with(session_id, ?) "
                        "ORDER BY 1 LIMIT 6", [args.session])
    exact = [i[0] for i in ids if i[0] == args.session]
    if exact:
        sid = exact[0]
    elif len(ids) == 1:
        sid = ids[0][0]
    elif not ids:
        raise PgguardError(f"no events for session {args.session!r}")
    else:
        raise PgguardError(f"session prefix {args.session!r} is ambiguous: "
                           + ", ".join(i[0] for i in ids[:5]))
    names, rows = fetch(con, """
        SELECT row_number() OVER (ORDER BY ts, event_id) AS n,
               date_diff('microsecond', first_value(ts) OVER (ORDER BY ts, event_id), ts)
                   AS offset_us,
               ts, event, identity, decision, rule, approver, duration_us, rows, bytes_out,
               masked_cells, sqlstate, statement, error, event_id
        FROM audit WHERE session_id = ? ORDER BY ts, event_id""", [sid])
    if args.json:
        out.write(_dumps([dict(zip(names, r)) for r in rows]).decode() + "\n")
        return 0
    first = dict(zip(names, rows[0]))
    out.write(f"session {sid}: identity {first['identity'] or '-'}, "
              f"{len(rows)} events from {_fmt(first['ts'])}\n\n")
    show = ["n", "offset_us", "event", "decision", "rule", "approver", "duration_us", "rows",
            "masked_cells", "sqlstate", "statement", "error"]
    idx = [names.index(c) for c in show]
    trimmed = []
    for r in rows:
        vals = [r[i] for i in idx]
        vals[1] = f"+{vals[1] / 1e6:.3f}s" if vals[1] is not None else ""
        trimmed.append(tuple(vals))
    show[1] = "offset"
    _print_table(show, trimmed, out, args.max_width)
    return 0


def _verify_line(result: Any) -> str:
    if result.ok:
        files = sum(s.files for s in result.streams)
        pending = sum(s.pending_wal_records for s in result.streams)
        return (f"verified: {result.records:,} records in {files} file(s), "
                f"{len(result.streams)} chain(s)"
                + (f" ({pending:,} still in the WAL)" if pending else ""))
    return f"FAILED: {result.problems[0].message}"


def _cmd_verify(args: argparse.Namespace, src: _Source, out: TextIO) -> int:
    result = src.verify(allow_pruned=args.allow_pruned)
    if args.json:
        out.write(_dumps(result.to_dict()).decode() + "\n")
        return 0 if result.ok else 1
    for s in result.streams:
        head = (f"head seq {s.head_seq} {s.head_hash[:16]}…" if s.head_hash
                else "no head anchor")
        out.write(f"chain {s.instance + '/' if s.instance else ''}{s.stream}: {s.records:,} records in {s.files} file(s) "
                  f"(seq {s.first_seq or '-'}..{s.last_seq or '-'}), "
                  f"{s.pending_wal_records:,} pending in WAL; {head}\n")
    if result.ok:
        out.write(_verify_line(result) + "\n")
        return 0
    for p in result.problems:
        out.write(f"  {p.message}\n")
    print(f"pgguard audit verify: {result.problems[0].message}", file=sys.stderr)
    return 1


def _cmd_report(args: argparse.Namespace, src: _Source, out: TextIO) -> int:
    now = datetime.now(UTC)
    since = _when(args.since, now)
    until = _when(args.until, now) if args.until else now
    if since >= until:
        raise PgguardError("--since must be before --until")
    con, _ = src.open()
    data = report.gather(con, since, until, source=src.describe())
    if args.verify:
        data.chain = _verify_line(src.verify())
    out.write(report.to_markdown(data))
    if args.html:
        try:
            Path(args.html).write_text(report.to_html(data), encoding="utf-8")
        except OSError as e:
            raise PgguardError(f"cannot write {args.html}: {e.strerror}") from None
        print(f"pgguard audit: wrote {args.html}", file=sys.stderr)
    return 0


_COMMANDS = {"sql": _cmd_sql, "tail": _cmd_tail, "sessions": _cmd_sessions,
             "replay": _cmd_replay, "verify": _cmd_verify, "report": _cmd_report}


def main(argv: list[str], out: TextIO | None = None) -> int:
    """Entry point of ``pgguard audit``; *argv* is everything after ``audit``.

    Returns the exit status; every failure prints one line on stderr.
    Example: ``main(["--dir", "audit", "verify"])``.
    """
    out = out or sys.stdout
    try:
        args = _build_parser().parse_args(argv)
    except _UsageError as e:
        print(f"pgguard audit: {e} (see pgguard audit --help)", file=sys.stderr)
        return 2
    except SystemExit as e:     # --help
        return int(e.code or 0)
    try:
        src = _resolve(args)
        return _COMMANDS[args.cmd](args, src, out)
    except PgguardError as e:
        print(f"pgguard audit {args.cmd}: {e.message}", file=sys.stderr)
        return 1
    except duckdb.Error as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"pgguard audit {args.cmd}: {msg}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"pgguard audit {args.cmd}: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
