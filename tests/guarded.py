# A pgguard whose agents are under the "guarded" default policy, for policy wire tests.
from __future__ import annotations

from contextlib import contextmanager

from conftest import Proxy


@contextmanager
def guarded_proxy(pg, tmp, extra: str = "", **kw):
    """A started Proxy with ``[policy] agents = "guarded"`` and ``extra`` config; stopped
    on exit (``stop()`` inside is fine: it flushes the audit for a test to read)."""
    p = Proxy(pg, tmp, extra=extra, **kw)
    p.config.write_text(p.config.read_text().replace('agents = "allow"', 'agents = "guarded"'))
    p.start()
    try:
        yield p
    finally:
        p.stop()
