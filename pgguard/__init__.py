# pgguard: a Postgres wire-protocol proxy that guards a production database from AI agents.
from .errors import PgguardError

__version__ = "0.1.0"
__all__ = ["PgguardError", "__version__"]
