# The evidence report: per-identity activity, refusals, approvals and masked reads over a
# period, as Markdown or as a self-contained HTML page with CSS/SVG bar charts.
"""``pgguard audit report --since 7d [--html report.html]``.

Example::

    con, _ = open_audit(Path("audit"))
    data = gather(con, since, until)
    print(to_markdown(data))
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb

from .query import rows_as_dicts

REFUSED = ("blocked", "denied", "timed_out")


@dataclass
class ReportData:
    since: datetime
    until: datetime
    source: str
    summary: dict[str, Any]
    identities: list[dict[str, Any]]
    refusals: list[dict[str, Any]]
    approvals: list[dict[str, Any]]
    masked: list[dict[str, Any]]
    auth_failures: list[dict[str, Any]]
    daily: list[dict[str, Any]]
    chain: str | None = None            # verify result line, when asked for
    notes: list[str] = field(default_factory=list)


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list) -> list[dict[str, Any]]:
    return rows_as_dicts(con, sql, params or None)


def gather(con: duckdb.DuckDBPyConnection, since: datetime, until: datetime,
           source: str = "") -> ReportData:
    """Run the report queries over ``audit`` for ``since <= ts < until``."""
    con.execute(
        "CREATE OR REPLACE TEMP VIEW a AS SELECT * FROM audit "
        f"WHERE ts >= '{since.isoformat()}'::TIMESTAMPTZ "
        f"AND ts < '{until.isoformat()}'::TIMESTAMPTZ")
    refused = ", ".join(f"'{d}'" for d in REFUSED)
    p: list = []
    summary = _rows(con, """
        SELECT count(*) FILTER (event = 'statement') AS statements,
               count(*) FILTER (list_contains(flags, 'introspection')) AS introspection,
               count(*) FILTER (decision = 'allowed') AS allowed,
               count(*) FILTER (decision = 'blocked') AS blocked,
               count(*) FILTER (decision = 'approved') AS approved,
               count(*) FILTER (decision = 'denied') AS denied,
               count(*) FILTER (decision = 'timed_out') AS timed_out,
               count(*) FILTER (decision = 'error') AS errors,
               count(DISTINCT session_id) FILTER (event <> 'audit_dropped') AS sessions,
               count(DISTINCT identity) AS identities,
               count(*) FILTER (event = 'auth_failed') AS auth_failures,
               count(*) FILTER (masked_cells > 0) AS masked_reads,
               coalesce(sum(masked_cells), 0)::BIGINT AS masked_cells,
               coalesce(sum(rows) FILTER (event = 'audit_dropped'), 0)::BIGINT AS dropped_records
        FROM a""", p)[0]
    identities = _rows(con, f"""
        SELECT coalesce(identity, '(unknown)') AS identity,
               coalesce(any_value(identity_kind), '') AS kind,
               count(DISTINCT session_id) AS sessions,
               count(*) FILTER (event = 'statement') AS statements,
               count(*) FILTER (decision = 'allowed') AS allowed,
               count(*) FILTER (decision IN ({refused})) AS refused,
               count(*) FILTER (decision = 'approved') AS approved,
               count(*) FILTER (decision = 'error') AS errors,
               count(*) FILTER (masked_cells > 0) AS masked_reads,
               coalesce(sum(masked_cells), 0)::BIGINT AS masked_cells,
               coalesce(sum(rows) FILTER (event = 'statement'), 0)::BIGINT AS rows,
               coalesce(sum(bytes_out), 0)::BIGINT AS bytes_out,
               count(*) FILTER (event = 'auth_failed') AS auth_failures
        FROM a WHERE event <> 'audit_dropped'
        GROUP BY 1 ORDER BY statements DESC, identity""", p)
    refusals = _rows(con, f"""
        SELECT coalesce(rule, '(default policy)') AS rule,
               coalesce(identity, '(unknown)') AS identity, decision, count(*) AS count,
               any_value(statement) AS example, max(ts) AS last
        FROM a WHERE decision IN ({refused})
        GROUP BY ALL ORDER BY count DESC, rule LIMIT 25""", p)
    approvals = _rows(con, """
        SELECT ts, coalesce(identity, '(unknown)') AS identity,
               coalesce(approver, '') AS approver, decision, coalesce(rule, '') AS rule,
               statement
        FROM a WHERE decision IN ('approved', 'denied', 'timed_out') OR approver IS NOT NULL
        ORDER BY ts DESC LIMIT 50""", p)
    masked = _rows(con, """
        SELECT identity, relation, count(*) AS statements, sum(masked_cells)::BIGINT AS cells
        FROM (SELECT coalesce(identity, '(unknown)') AS identity,
                     unnest(coalesce(relations, ['(unknown)'])) AS relation, masked_cells
              FROM a WHERE masked_cells > 0)
        GROUP BY ALL ORDER BY cells DESC, identity, relation LIMIT 25""", p)
    auth = _rows(con, """
        SELECT coalesce(identity, '(unknown)') AS identity,
               coalesce(client_addr, '') AS client_addr, count(*) AS count, max(ts) AS last
        FROM a WHERE event = 'auth_failed'
        GROUP BY ALL ORDER BY count DESC LIMIT 25""", p)
    daily = _rows(con, f"""
        SELECT CAST(timezone('UTC', ts) AS DATE) AS day,
               count(*) FILTER (event = 'statement') AS statements,
               count(*) FILTER (decision IN ({refused})) AS refused,
               count(*) FILTER (decision = 'approved') AS approved
        FROM a GROUP BY 1 ORDER BY 1""", p)
    data = ReportData(since, until, source, summary, identities, refusals, approvals, masked,
                      auth, daily)
    if summary.get("introspection"):
        data.notes.append(f"{summary['introspection']} of the statements only read the system "
                          "catalogs (psql's \\d and the like; flag 'introspection'): leave "
                          "them out of your own queries with NOT coalesce(list_contains("
                          "flags, 'introspection'), false)")
    if summary.get("dropped_records"):
        data.notes.append(f"{summary['dropped_records']} records were dropped by a full "
                          f"audit queue (batched durability); see event = 'audit_dropped'")
    return data


# -- Markdown --------------------------------------------------------------------------

def _cell(v: Any, width: int = 100) -> str:
    if v is None:
        return ""
    if isinstance(v, datetime):
        s = v.strftime("%Y-%m-%d %H:%M:%S")
    elif isinstance(v, int):
        s = f"{v:,}"
    else:
        s = str(v)
    s = s.replace("\n", " ").replace("|", "\\|")
    return s if len(s) <= width else s[:width - 1] + "…"


def _md_table(headers: list[str], keys: list[str], rows: list[dict]) -> str:
    if not rows:
        return "_none_\n"
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
    return "\n".join(out) + "\n"


_ID_COLS = (["identity", "kind", "sessions", "statements", "allowed", "refused",
             "approved", "errors", "masked reads", "masked cells", "rows", "auth failures"],
            ["identity", "kind", "sessions", "statements", "allowed", "refused", "approved",
             "errors", "masked_reads", "masked_cells", "rows", "auth_failures"])


def _period(d: ReportData) -> str:
    return (f"{d.since.strftime('%Y-%m-%d %H:%M')} UTC to "
            f"{d.until.strftime('%Y-%m-%d %H:%M')} UTC")


def to_markdown(d: ReportData) -> str:
    """The report as Markdown (GitHub tables)."""
    s = d.summary
    lines = ["# pgguard audit report", "",
             f"Period: {_period(d)}  ", f"Source: `{d.source}`  "]
    if d.chain:
        lines.append(f"Hash chain: {d.chain}  ")
    lines += [""]
    for note in d.notes:
        lines += [f"> **Note:** {note}", ""]
    lines += ["## Summary", "",
              _md_table(["statements", "allowed", "blocked", "approved", "denied",
                         "timed out", "errors", "sessions", "identities", "auth failures",
                         "masked reads"],
                        ["statements", "allowed", "blocked", "approved", "denied",
                         "timed_out", "errors", "sessions", "identities", "auth_failures",
                         "masked_reads"], [s]),
              "## Per identity", "", _md_table(*_ID_COLS, d.identities),
              "## Refused statements", "",
              _md_table(["rule", "identity", "decision", "count", "last", "example"],
                        ["rule", "identity", "decision", "count", "last", "example"],
                        d.refusals),
              "## Approvals", "",
              _md_table(["time", "identity", "approver", "decision", "rule", "statement"],
                        ["ts", "identity", "approver", "decision", "rule", "statement"],
                        d.approvals),
              "## Masked reads", "",
              _md_table(["identity", "relation", "statements", "masked cells"],
                        ["identity", "relation", "statements", "cells"], d.masked),
              "## Authentication failures", "",
              _md_table(["identity", "client", "count", "last"],
                        ["identity", "client_addr", "count", "last"], d.auth_failures),
              "## Daily activity", "",
              _md_table(["day", "statements", "refused", "approved"],
                        ["day", "statements", "refused", "approved"], d.daily)]
    return "\n".join(lines)


# -- HTML ------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;
max-width:1100px;color:#1d232a;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:2em;
border-bottom:1px solid #dde1e6;padding-bottom:.2em}
.meta{color:#57606a}table{border-collapse:collapse;width:100%;margin:.5em 0}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eceff2;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,monospace;white-space:pre-wrap;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:1em 0}
.card{border:1px solid #dde1e6;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:1.4em}.bad b{color:#c62828}.ok b{color:#2e7d32}
.bar{display:flex;height:14px;min-width:2px;border-radius:2px;overflow:hidden}
.bar span{display:block;height:100%}.allowed{background:#43a047}
.approved{background:#1e88e5}.refused{background:#e53935}.errors{background:#9e9e9e}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
.note{background:#fff8e1;border-left:4px solid #f9a825;padding:6px 10px}
"""


def _h(v: Any) -> str:
    return html.escape(_cell(v, 200))


def _html_table(headers: list[str], keys: list[str], rows: list[dict],
                code: tuple[str, ...] = ("statement", "example")) -> str:
    if not rows:
        return "<p class=meta>none</p>"
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            if k in code:
                cells.append(f"<td><code>{_h(v)}</code></td>")
            elif isinstance(v, int):
                cells.append(f"<td class=n>{_h(v)}</td>")
            else:
                cells.append(f"<td>{_h(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _identity_bars(rows: list[dict]) -> str:
    top = max((r["statements"] for r in rows), default=0) or 1
    out = ["<table><tr><th>identity</th><th style='width:60%'>statements</th>"
           "<th>total</th></tr>"]
    for r in rows:
        other = max(r["statements"] - r["allowed"] - r["approved"] - r["refused"]
                    - r["errors"], 0)
        parts = ""
        for cls, n in (("allowed", r["allowed"] + other), ("approved", r["approved"]),
                       ("refused", r["refused"]), ("errors", r["errors"])):
            if n:
                parts += (f"<span class={cls} style='width:{100 * n / top:.2f}%' "
                          f"title='{cls}: {n:,}'></span>")
        out.append(f"<tr><td>{_h(r['identity'])} <span class=meta>{_h(r['kind'])}</span>"
                   f"</td><td><div class=bar>{parts}</div></td>"
                   f"<td class=n>{r['statements']:,}</td></tr>")
    out.append("</table><div class='legend meta'><span class=allowed></span>allowed"
               "<span class=approved></span>approved<span class=refused></span>refused"
               "<span class=errors></span>errors</div>")
    return "\n".join(out)


def _daily_svg(rows: list[dict]) -> str:
    if not rows:
        return "<p class=meta>no activity</p>"
    w, h, pad = 900, 160, 24
    n = len(rows)
    top = max(r["statements"] for r in rows) or 1
    bw = max((w - 2 * pad) / n - 2, 1)
    bars = []
    for i, r in enumerate(rows):
        x = pad + i * (w - 2 * pad) / n
        total_h = (h - 2 * pad) * r["statements"] / top
        ref_h = (h - 2 * pad) * r["refused"] / top
        day = r["day"].isoformat() if hasattr(r["day"], "isoformat") else str(r["day"])
        bars.append(f"<rect x='{x:.1f}' y='{h - pad - total_h:.1f}' width='{bw:.1f}' "
                    f"height='{total_h:.1f}' fill='#43a047'><title>{day}: "
                    f"{r['statements']:,} statements, {r['refused']:,} refused</title></rect>")
        if ref_h:
            bars.append(f"<rect x='{x:.1f}' y='{h - pad - ref_h:.1f}' width='{bw:.1f}' "
                        f"height='{ref_h:.1f}' fill='#e53935'/>")
        if n <= 31:
            bars.append(f"<text x='{x + bw / 2:.1f}' y='{h - 6}' font-size='10' "
                        f"text-anchor='middle' fill='#57606a'>{day[5:]}</text>")
    bars.append(f"<text x='{pad}' y='{pad - 8}' font-size='10' fill='#57606a'>"
                f"max {top:,}/day</text>")
    return (f"<svg viewBox='0 0 {w} {h}' width='100%' role='img' "
            f"aria-label='statements per day'>" + "".join(bars) + "</svg>")


def to_html(d: ReportData) -> str:
    """The report as one self-contained HTML page (no scripts, no external assets)."""
    s = d.summary
    refused = s["blocked"] + s["denied"] + s["timed_out"]
    cards = [("statements", s["statements"], ""), ("refused", refused, "bad" if refused else ""),
             ("approved", s["approved"], ""), ("errors", s["errors"], ""),
             ("sessions", s["sessions"], ""), ("identities", s["identities"], ""),
             ("auth failures", s["auth_failures"], "bad" if s["auth_failures"] else ""),
             ("masked reads", s["masked_reads"], "")]
    body = [f"<h1>pgguard audit report</h1><p class=meta>{html.escape(_period(d))}<br>"
            f"Source: <code>{html.escape(d.source)}</code>"]
    if d.chain:
        cls = "ok" if d.chain.startswith("verified") else "bad"
        body.append(f"<br>Hash chain: <span class={cls}><b>{html.escape(d.chain)}</b></span>")
    body.append("</p>")
    for note in d.notes:
        body.append(f"<p class=note>{html.escape(note)}</p>")
    body.append("<div class=cards>" + "".join(
        f"<div class='card {c}'><b>{v:,}</b>{html.escape(k)}</div>" for k, v, c in cards)
        + "</div>")
    body += ["<h2>Statements per identity</h2>", _identity_bars(d.identities),
             "<h2>Per identity</h2>", _html_table(*_ID_COLS, d.identities),
             "<h2>Daily activity</h2>", _daily_svg(d.daily),
             "<h2>Refused statements</h2>",
             _html_table(["rule", "identity", "decision", "count", "last", "example"],
                         ["rule", "identity", "decision", "count", "last", "example"],
                         d.refusals),
             "<h2>Approvals</h2>",
             _html_table(["time", "identity", "approver", "decision", "rule", "statement"],
                         ["ts", "identity", "approver", "decision", "rule", "statement"],
                         d.approvals),
             "<h2>Masked reads</h2>",
             _html_table(["identity", "relation", "statements", "masked cells"],
                         ["identity", "relation", "statements", "cells"], d.masked),
             "<h2>Authentication failures</h2>",
             _html_table(["identity", "client", "count", "last"],
                         ["identity", "client_addr", "count", "last"], d.auth_failures)]
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width,initial-scale=1'>"
            "<title>pgguard audit report</title><style>" + _CSS + "</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
