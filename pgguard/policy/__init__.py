# pgguard.policy: classify statements with pglast, apply [[rules]], cache decisions.
"""Policy: what a statement does, and whether this identity may run it.

Example::

    >>> from pgguard.policy.classify import classify
    >>> classify("DROP INDEX orders_pkey")[0].flags
    ('destructive',)

(``pgguard.policy.classify`` is the module; the function lives in it, so that the
module stays importable under its own name.)
"""
from .cache import DecisionCache, shape_key
from .classify import (FLAGS, PolicyParseError, PreparedMemory, Reason, Statement,
                       StatementTooLong)
from .rules import Decision, PolicyEngine, Verdict

__all__ = [
    "FLAGS", "Decision", "DecisionCache", "PolicyEngine", "PolicyParseError",
    "PreparedMemory", "Reason", "Statement", "StatementTooLong", "Verdict", "shape_key",
]
