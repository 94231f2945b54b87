# Type stubs for the compiled relay scan.
from .answers import Answers
class MessageScan:
    count: int
    status: int
    bytes_seen: int
    messages: int
    error: Exception | None
    bad: bytes | None
    last_type: int
    model: Answers | None
    rest: bytes | None
    def __init__(self, interest: bytes = ..., valid: bytes | None = ..., counted: bytes = ...,
                 withhold: bool = ..., max_len: int = ...,
                 pg_limits: dict[bytes, int] | None = ...) -> None: ...
    def feed(self, data: bytes) -> list[bytes | tuple[int, bytes]]: ...
    def set_interest(self, types: bytes, on: bool) -> None: ...
    def release(self) -> None: ...
    @property
    def at_boundary(self) -> bool: ...
    def drop_partial(self) -> bool: ...
