# Type stubs for the compiled relay-phase protocol.
from typing import Any

from .relay import MessageScan

class Pipe:
    scan: MessageScan
    transport: Any
    peer: Any
    notify_chunks: bool
    divert: bool
    exact: dict | None
    shapes: dict | None
    allow_all: bool
    log_types: bytes | None
    fast_log: list | None
    # client side: the blast-radius Guard whose unguarded Bind/Execute/Close/Sync the
    # pipe forwards itself (None: they go to the hooks)
    guard: Any
    @property
    def fast_forwarded(self) -> int: ...
    # upstream side: hold the answers up to the next ReadyForQuery for the guard's
    # in-block lane; hooks.hold_done() / hooks.hold_fallback() end it
    def hold_count(self, limit: int) -> None: ...
    @property
    def holding(self) -> bool: ...
    def __init__(self, scan: MessageScan, transport: Any, peer: Any, hooks: Any,
                 client_side: bool) -> None: ...
    def set_peer(self, peer: Any) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool: ...
    def connection_lost(self, exc: BaseException | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
