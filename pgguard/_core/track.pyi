# Type stubs for the compiled statement tracker (the audit's pairing of messages).
from collections import deque
from datetime import datetime
from typing import Any

REFUSAL_SYNC: int

class StatementTracker:
    session: Any
    audit: Any
    flog: list
    pending: deque
    strict: bool
    answers: deque | None
    def __init__(self, session: Any, audit: Any, helpers: tuple, base: datetime,
                 mono0: int) -> None: ...
    def refusal_ignored(self) -> None: ...
    def on_events(self, events: list) -> None: ...
    def on_backend(self, t: int, msg: bytes) -> None: ...
    def strict_record(self, msg: bytes) -> Any: ...
    def wall(self, mono_ns: int) -> datetime: ...
