# Type stubs for the compiled relay-phase protocol.
from typing import Any

from .relay import MessageScan

class MaskLane:
    # the compiled lane of a masking session, shared by both pipes (see pipe.pxd)
    on: bool
    idle: bool
    track: bool
    z: int
    forwarded: int
    reported: int
    dirty: int
    exact: dict
    shapes: dict
    stmts: set
    plans: dict
    state: Any
    @property
    def generation(self) -> int: ...
    # generation: a buffer whose first 8 bytes (big-endian) hold the catalog generation
    def __init__(self, state: Any, rw: Any, generation: Any) -> None: ...
    def forget(self) -> None: ...

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
    # a masking session's compiled lane (None: no masking)
    mask: MaskLane | None
    # client side, under a policy: statement name -> the catalog generation its Parse
    # was judged under (a Bind of one judged under another goes to the hooks)
    stmt_gens: dict[bytes, int] | None
    unknown_stale: bool
    def names_forgotten(self) -> None: ...
    # the last unnamed Parse the pipe forwarded itself
    unnamed_parse: bytes | None
    def watch_statements(self, gens: dict[bytes, int], generation: Any) -> None: ...
    @property
    def generation(self) -> int: ...
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
