# pgguard.audit: crash-safe, hash-chained audit log in Parquet, queried with DuckDB.
"""The audit log (DESIGN §6).

Example::

    from pgguard.audit import AuditLog, AuditRecord
    audit = AuditLog(cfg.audit, cfg.base_dir)
    audit.start()
    audit.log(AuditRecord(session_id="s1", event="connect", identity="ci-agent"))
    audit.close()
"""
from .record import SCHEMA, AuditRecord, normalize, scrub_secrets
from .storage import AuditError
from .writer import AuditLog, AuditStats

__all__ = ["AuditError", "AuditLog", "AuditRecord", "AuditStats", "SCHEMA", "normalize",
           "scrub_secrets"]
