# pgguard.policy: classify statements with pglast, apply [[rules]], cache decisions.
"""Policy: what a statement does, and whether this identity may run it.

Example::

    >>> from pgguard.policy import PolicyEngine, classify
    >>> classify("DROP INDEX orders_pkey")[0].flags
    ('destructive',)
"""
from .cache import DecisionCache, shape_key
from .classify import (FLAGS, PolicyParseError, PreparedMemory, Reason, Statement,
                       StatementTooLong, classify)
from .rules import Decision, PolicyEngine, Verdict

__all__ = [
    "FLAGS", "Decision", "DecisionCache", "PolicyEngine", "PolicyParseError",
    "PreparedMemory", "Reason", "Statement", "StatementTooLong", "Verdict", "classify",
    "shape_key",
]
