# Type stubs for the compiled DataRow/CopyData rewriter.
from collections.abc import Iterable
from typing import Any, Protocol

ACTION_NONE: int
ACTION_STRATEGY: int
ACTION_NULL: int
ACTION_DETECT: int
STRATEGY_REDACT: int
STRATEGY_PARTIAL: int
STRATEGY_EMAIL: int
STRATEGY_HASH: int
CELL_OTHER: int
CELL_TEXT: int
CELL_JSON: int
CELL_JSONB_BINARY: int
CELL_WHOLE: int
CELL_LITERAL: int
CELL_INT8_BINARY: int
CELL_UINT8_BINARY: int
CELL_NUMERIC_BINARY: int
CELL_FLOAT8_BINARY: int
CELL_FLOAT8_TEXT: int

class _Column(Protocol):
    action: int
    strategy: int
    kind: int
    keep: int
    replacement: bytes
    key: bytes

def hmac_sha256(key: bytes, msg: bytes) -> bytes: ...

class MaskPlan:
    columns: tuple[Any, ...]
    detectors: Any
    copy: Any
    def __init__(self, columns: Iterable[_Column], detectors: Any = ...,
                 copy: Any = ...) -> None: ...
    @property
    def ncolumns(self) -> int: ...
    @property
    def actions(self) -> list[int]: ...
    @property
    def kinds(self) -> list[int]: ...
    @property
    def masks_anything(self) -> bool: ...

class RowRewriter:
    masked_cells: int
    rows_rewritten: int
    bytes_in: int
    bytes_out: int
    def __init__(self, max_len: int = ...) -> None: ...
    def set_plan(self, plan: MaskPlan | None) -> None: ...
    def clear_plan(self) -> None: ...
    def feed(self, data: bytes) -> bytes: ...
    def take_counts(self) -> tuple[list[int], list[int]]: ...
    def take_total(self) -> int: ...
    @property
    def plan(self) -> MaskPlan | None: ...
    @property
    def at_boundary(self) -> bool: ...
    @property
    def pending(self) -> int: ...
