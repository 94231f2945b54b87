# pgguard.audit: crash-safe, hash-chained audit log in Parquet, queried with DuckDB.
"""The audit log (DESIGN §6).

Every event is one record with these columns (stable; Parquet, zstd)::

    event_id          string, 26 chars, sortable by time (ULID-like: ms time + writer + counter)
    ts                timestamp[us, UTC]   when the event happened
    session_id        string               one client connection
    identity          string               who (the pgguard identity, never a token)
    identity_kind     string               agent | human
    client_addr       string               "ip:port"
    application_name  string
    database          string
    upstream_user     string
    event             string               connect | auth_failed | statement | disconnect
                                           | audit_dropped (batched queue overflow, count
                                           in rows)
    statement         string               literals replaced by $n unless
                                           [audit] capture_literals; passwords never kept
    fingerprint       string
    statement_kind    string
    relations         list<string>         schema-qualified
    flags             list<string>         destructive, privilege, escape, opaque, write
    decision          string               allowed | blocked | approved | denied |
                                           timed_out | error
    rule              string               the deciding rule
    approver          string
    rows              int64
    bytes_out         int64
    masked_cells      int64
    duration_us       int64
    sqlstate          string
    error             string
    prev_hash         string (hex)         hash of the previous record of the same writer
    hash              string (hex)         sha256(unhex(prev_hash) + canonical content)

Files: ``<dir>/dt=YYYY-MM-DD/<stream>-<seq>.parquet`` (UTC day the file was started),
published by rename, so a reader never sees half a file. Example queries::

    -- what did the agent do last Tuesday, and what was refused?
    SELECT ts, decision, rule, statement, rows
    FROM read_parquet('audit/**/*.parquet', hive_partitioning = true)
    WHERE identity = 'ci-agent' AND dt = DATE '2024-04-30'
    ORDER BY event_id;

    -- refusals per identity and rule this week
    SELECT identity, rule, count(*) FROM read_parquet('audit/**/*.parquet',
        hive_partitioning = true)
    WHERE decision IN ('blocked', 'denied', 'timed_out') AND ts > now() - INTERVAL 7 DAY
    GROUP BY ALL ORDER BY 3 DESC;

    -- who approved what
    SELECT ts, identity, approver, statement FROM read_parquet('audit/**/*.parquet',
        hive_partitioning = true) WHERE decision = 'approved';

    -- which tables did agents read masked data from
    SELECT identity, unnest(relations) AS relation, sum(masked_cells)
    FROM read_parquet('audit/**/*.parquet', hive_partitioning = true)
    WHERE masked_cells > 0 GROUP BY ALL;

Or ``pgguard audit sql "..."`` with the view ``audit`` (includes records still in the
write-ahead log). ``pgguard audit verify`` checks the chain (see ``verify``).

Using it from the proxy::

    from pgguard.audit import AuditLog, AuditRecord
    audit = AuditLog(cfg.audit, cfg.base_dir, stream=f"w{worker_index}")
    audit.start()                       # blocking: recovers leftover WAL first
    audit.log(AuditRecord(session_id="s1", event="connect", identity="ci-agent",
                          identity_kind="agent", ts=datetime.now(timezone.utc)))
    await audit.log_strict(record)      # strict durability: fsynced when this returns
    audit.close()                       # at shutdown: drains and seals the last file
"""
from .record import SCHEMA, AuditRecord, normalize, scrub_secrets
from .storage import AuditError
from .writer import AuditLog, AuditStats

__all__ = ["AuditError", "AuditLog", "AuditRecord", "AuditStats", "SCHEMA", "normalize",
           "scrub_secrets"]
