# Cancel keys: the BackendKeyData a client sees is the upstream's key under a keyed
# permutation, so any worker (or instance sharing the key) can route a CancelRequest.
from __future__ import annotations

import hashlib
import hmac
import secrets

_ROUNDS = 4
_MASK32 = 0xFFFFFFFF


class CancelKeyCipher:
    """A keyed permutation of 63-bit values (upstream pid << 32 | secret).

    The proxy hands clients ``encode(pid, secret)`` and turns a CancelRequest back
    with ``decode``. Nothing is stored, so every worker process that shares the key
    routes every cancel. Example::

        c = CancelKeyCipher(b"k" * 32)
        assert c.decode(*c.encode(4242, 99)) == (4242, 99)
    """

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key if key is not None else secrets.token_bytes(32)
        self._round_keys = [hmac.new(self.key, bytes((r,)), hashlib.sha256).digest()
                            for r in range(_ROUNDS)]

    def _f(self, r: int, half: int) -> int:
        d = hmac.new(self._round_keys[r], half.to_bytes(4, "big"), hashlib.sha256).digest()
        return int.from_bytes(d[:4], "big")

    def _forward(self, x: int) -> int:
        left, right = x >> 32, x & _MASK32
        for r in range(_ROUNDS):
            left, right = right, left ^ self._f(r, right)
        return (left << 32) | right

    def _backward(self, x: int) -> int:
        left, right = x >> 32, x & _MASK32
        for r in reversed(range(_ROUNDS)):
            left, right = right ^ self._f(r, left), left
        return (left << 32) | right

    def encode(self, pid: int, secret: int) -> tuple[int, int]:
        # cycle-walk until the top bit is clear so the client's pid stays positive
        x = ((pid & 0x7FFFFFFF) << 32) | (secret & _MASK32)
        while True:
            x = self._forward(x)
            if not x >> 63:
                return x >> 32, x & _MASK32

    def decode(self, pid: int, secret: int) -> tuple[int, int]:
        x = ((pid & _MASK32) << 32) | (secret & _MASK32)
        if x >> 63:
            raise ValueError("not a key this proxy issued")
        while True:
            x = self._backward(x)
            if not x >> 63:
                return x >> 32, x & _MASK32
