# Cancel keys: the BackendKeyData clients see, turned back into the upstream's on cancel.
# The BackendKeyData a client sees carries the upstream backend's real process id and, as its secret, the upstream's secret under a keyed permutation tweaked
# by that pid. Any worker (or instance sharing the key) turns a CancelRequest back into
# the upstream's key without any shared state: the routing lives in the secret half.
from __future__ import annotations

import hashlib
import hmac
import secrets

# a Feistel network on 32 bits (two 16-bit halves): more rounds than the 4 of a
# balanced wide block, the domain being small
_ROUNDS = 8
_MASK16 = 0xFFFF
_MASK32 = 0xFFFFFFFF


class CancelKeyCipher:
    """A keyed permutation of the 32-bit cancel secret, tweaked by the backend pid.

    The proxy hands clients ``encode(pid, secret)``: the same pid (so
    ``pg_backend_pid()``, NotificationResponse and ``pg_stat_activity`` agree with the
    key) and a secret only the key holder can turn back with ``decode``. Nothing is
    stored, so every worker process that shares the key routes every cancel. A forged
    key decodes to some secret the upstream then refuses, as it would refuse a guess
    made against Postgres directly. Example::

        c = CancelKeyCipher(b"k" * 32)
        pid, s = c.encode(4242, 99)
        assert pid == 4242 and c.decode(pid, s) == (4242, 99)
    """

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key if key is not None else secrets.token_bytes(32)
        self._round_keys = [hmac.new(self.key, b"cancel-secret" + bytes((r,)),
                                     hashlib.sha256).digest() for r in range(_ROUNDS)]

    def _f(self, r: int, pid: bytes, half: int) -> int:
        d = hmac.new(self._round_keys[r], pid + half.to_bytes(2, "big"),
                     hashlib.sha256).digest()
        return int.from_bytes(d[:2], "big")

    def encode(self, pid: int, secret: int) -> tuple[int, int]:
        tweak = (pid & _MASK32).to_bytes(4, "big")
        left, right = (secret >> 16) & _MASK16, secret & _MASK16
        for r in range(_ROUNDS):
            left, right = right, left ^ self._f(r, tweak, right)
        return pid, (left << 16) | right

    def decode(self, pid: int, secret: int) -> tuple[int, int]:
        tweak = (pid & _MASK32).to_bytes(4, "big")
        left, right = (secret >> 16) & _MASK16, secret & _MASK16
        for r in reversed(range(_ROUNDS)):
            left, right = right ^ self._f(r, tweak, left), left
        return pid, (left << 16) | right
