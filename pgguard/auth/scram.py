# SCRAM-SHA-256 (RFC 5802/7677) for both ends of the proxy, md5 and SASL-list helpers; no I/O.
from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import secrets
import stringprep
import unicodedata

from pgguard.errors import ProtocolViolation

MECHANISM = "SCRAM-SHA-256"
_KEY_LEN = 32        # SHA-256 digest size: stored key, server key, proofs, signatures
_NONCE_BYTES = 18    # raw random bytes per nonce, as Postgres (24 base64 chars)
_SALT_BYTES = 16     # Postgres' default salt length


class ScramError(ProtocolViolation):
    """Malformed or out-of-order SCRAM message, or a server signature that does not verify."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ScramError(f"malformed base64 in {what}") from None


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("SCRAM message is not valid UTF-8") from None


def _attr(part: str, name: str) -> str:
    # Attributes come in a fixed order; a missing, extra or reordered one lands here.
    if not part.startswith(name + "="):
        raise ScramError(f"malformed SCRAM message: expected attribute {name!r}")
    return part[2:]


def _check_nonce(nonce: str) -> str:
    # RFC 5802 "printable": %x21-2B / %x2D-7E, i.e. visible ASCII except ','.
    if not nonce or not all("\x21" <= ch <= "\x7e" for ch in nonce):
        raise ScramError("malformed SCRAM nonce")
    return nonce


def _new_nonce() -> str:
    return _b64(secrets.token_bytes(_NONCE_BYTES))


def saslprep(password: str) -> str | None:
    """The password as SCRAM hashes it (RFC 4013 SASLprep, stored-string rules), or None
    when SASLprep refuses it: Postgres (and libpq) then hash the raw bytes instead.

    >>> saslprep("pw"), saslprep("I\u00adX"), saslprep("\u2168"), saslprep("a\u0007\u00e9")
    ('pw', 'IX', 'IX', None)
    """
    if password.isascii():
        return password         # Postgres' shortcut: ASCII passes as it is, controls too
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch for ch in password
                     if not stringprep.in_table_b1(ch))
    if not mapped:
        return None
    out = unicodedata.normalize("NFKC", mapped)
    for ch in out:
        if (stringprep.in_table_c12(ch) or stringprep.in_table_c21_c22(ch)
                or stringprep.in_table_c3(ch) or stringprep.in_table_c4(ch)
                or stringprep.in_table_c5(ch) or stringprep.in_table_c6(ch)
                or stringprep.in_table_c7(ch) or stringprep.in_table_c8(ch)
                or stringprep.in_table_c9(ch) or stringprep.in_table_a1(ch)):
            return None
    if any(stringprep.in_table_d1(ch) for ch in out):
        # right-to-left text: no left-to-right characters, and RandALCat at both ends
        if any(stringprep.in_table_d2(ch) for ch in out) or not (
                stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1])):
            return None
    return out


def _password_bytes(password: str | bytes) -> bytes:
    # what PBKDF2 hashes: the SASLprep'd UTF-8, or the raw bytes where SASLprep refuses
    # (or the bytes are not UTF-8), as Postgres' pg_saslprep callers do
    if isinstance(password, bytes):
        try:
            text = password.decode("utf-8")
        except UnicodeDecodeError:
            return password
    else:
        text = password
    prepped = saslprep(text)
    return text.encode("utf-8", "surrogatepass") if prepped is None else prepped.encode("utf-8")


def _salted_keys(password: str | bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    salted = hashlib.pbkdf2_hmac("sha256", _password_bytes(password), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return client_key, _hmac(salted, b"Server Key")


@dataclasses.dataclass(frozen=True)
class ScramVerifier:
    """What the server stores for one secret. ``str(v)`` gives Postgres' rolpassword form.

    >>> v = ScramVerifier.from_password("pw"); ScramVerifier.parse(str(v)) == v
    True
    """

    salt: bytes
    iterations: int
    stored_key: bytes = dataclasses.field(repr=False)
    server_key: bytes = dataclasses.field(repr=False)

    @classmethod
    def from_password(cls, password: str, *, salt: bytes | None = None,
                      iterations: int = 4096) -> ScramVerifier:
        salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
        client_key, server_key = _salted_keys(password, salt, iterations)
        return cls(salt, iterations, hashlib.sha256(client_key).digest(), server_key)

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Parse ``SCRAM-SHA-256$<iter>:<salt>$<storedkey>:<serverkey>`` (base64 fields)."""
        try:
            scheme, params, keys = text.split("$")
            iters, salt = params.split(":")
            stored, server = keys.split(":")
        except ValueError:
            raise ScramError("malformed SCRAM verifier") from None
        if scheme != MECHANISM or not (iters.isascii() and iters.isdigit()) or int(iters) < 1:
            raise ScramError("malformed SCRAM verifier")
        v = cls(_unb64(salt, "verifier"), int(iters),
                _unb64(stored, "verifier"), _unb64(server, "verifier"))
        if not v.salt or len(v.stored_key) != _KEY_LEN or len(v.server_key) != _KEY_LEN:
            raise ScramError("malformed SCRAM verifier")
        return v

    @classmethod
    def fake(cls, username: str, secret: bytes) -> ScramVerifier:
        """A stand-in for an unknown user: stable per username so probing the salt twice
        reveals nothing, and keys no password maps to (finding one is a SHA-256 preimage)."""
        def derive(label: bytes) -> bytes:
            return _hmac(secret, b"pgguard-scram-fake\0" + label + b"\0" + username.encode())
        return cls(derive(b"salt")[:_SALT_BYTES], 4096, derive(b"stored"), derive(b"server"))

    def verify_password(self, password: str | bytes) -> bool:
        """True if a cleartext password is the one this verifier was made from (the same
        PBKDF2 work for every input, a fake verifier included; constant-time compare).

        >>> v = ScramVerifier.from_password("pw")
        >>> v.verify_password(b"pw"), v.verify_password("no")
        (True, False)
        """
        _, server_key = _salted_keys(password, self.salt, self.iterations)
        return hmac.compare_digest(server_key, self.server_key)

    def __str__(self) -> str:
        return (f"{MECHANISM}${self.iterations}:{_b64(self.salt)}"
                f"${_b64(self.stored_key)}:{_b64(self.server_key)}")


class ScramServer:
    """Server side of one exchange. Raises ScramError(reason) on malformed input;
    a wrong password is not an exception: handle_final() returns None then.

    >>> srv = ScramServer(ScramVerifier.from_password("pw"))
    >>> cli = ScramClient("pw")
    >>> final = srv.handle_final(cli.handle_continue(srv.handle_initial(*cli.initial())))
    >>> cli.handle_final(final)   # None, and no exception: both sides verified
    """

    def __init__(self, verifier: ScramVerifier, *, nonce: str | None = None) -> None:
        self._verifier = verifier
        self._server_nonce = _check_nonce(nonce) if nonce is not None else _new_nonce()
        self._state = "initial"
        self._gs2_header = self._nonce = self._auth_prefix = ""

    def handle_initial(self, mechanism: str, data: bytes) -> bytes:
        """SASLInitialResponse (mechanism, client-first) -> server-first for SASLContinue."""
        if self._state != "initial":
            raise ScramError("unexpected SASLInitialResponse")
        self._state = "failed"
        if mechanism != MECHANISM:
            raise ScramError(f"unsupported SASL mechanism {mechanism!r}")
        parts = _decode(data).split(",")
        if parts[0].startswith("p="):
            raise ScramError("channel binding was not offered")
        # 'y' = client could bind but thinks we cannot: true, we never offer -PLUS.
        if parts[0] not in ("n", "y"):
            raise ScramError("malformed SCRAM message: bad GS2 header")
        if len(parts) < 4:
            raise ScramError("malformed SCRAM message: client-first too short")
        if parts[1]:
            raise ScramError("authorization identity is not supported")
        if parts[2].startswith("m="):
            raise ScramError("mandatory SCRAM extension is not supported")
        _attr(parts[2], "n")  # any username, even empty: Postgres uses the startup user
        client_nonce = _check_nonce(_attr(parts[3], "r"))
        if len(parts) > 4:
            raise ScramError("SCRAM extensions are not supported")
        self._gs2_header = f"{parts[0]},,"
        self._nonce = client_nonce + self._server_nonce
        v = self._verifier
        server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        self._auth_prefix = f"{parts[2]},{parts[3]},{server_first},"
        self._state = "final"
        return server_first.encode("ascii")

    def handle_final(self, data: bytes) -> bytes | None:
        """SASLResponse (client-final) -> server-final for SASLFinal, or None on a wrong proof."""
        if self._state != "final":
            raise ScramError("unexpected SASLResponse")
        self._state = "done"
        parts = _decode(data).split(",")
        if len(parts) != 3:
            raise ScramError("malformed SCRAM message: client-final needs c, r, p only")
        binding, nonce, proof_b64 = _attr(parts[0], "c"), _attr(parts[1], "r"), _attr(parts[2], "p")
        if binding != _b64(self._gs2_header.encode("ascii")):
            raise ScramError("SCRAM channel binding does not match")
        if nonce != self._nonce:
            raise ScramError("SCRAM nonce does not match")
        proof = _unb64(proof_b64, "client proof")
        if len(proof) != _KEY_LEN:
            raise ScramError("malformed SCRAM client proof")
        # From here on the same work for every input, wrong password and fake verifier alike.
        v = self._verifier
        auth_message = (self._auth_prefix + parts[0] + "," + parts[1]).encode("utf-8")
        client_key = _xor(proof, _hmac(v.stored_key, auth_message))
        ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key)
        server_final = b"v=" + _b64(_hmac(v.server_key, auth_message)).encode("ascii")
        return server_final if ok else None


class ScramClient:
    """Client side, for the proxy logging into the upstream Postgres. ``username`` only
    goes into client-first: Postgres ignores it, and libpq sends it empty, as we do by default."""

    def __init__(self, password: str, *, nonce: str | None = None, username: str = "") -> None:
        self._password = password
        self._nonce = _check_nonce(nonce) if nonce is not None else _new_nonce()
        saslname = username.replace("=", "=3D").replace(",", "=2C")
        self._first_bare = f"n={saslname},r={self._nonce}"
        self._state = "initial"
        self._server_signature = b""

    def initial(self) -> tuple[str, bytes]:
        """-> (mechanism, client-first) for SASLInitialResponse."""
        if self._state != "initial":
            raise ScramError("SCRAM client already started")
        self._state = "continue"
        return MECHANISM, ("n,," + self._first_bare).encode("utf-8")

    def handle_continue(self, data: bytes) -> bytes:
        """server-first (AuthenticationSASLContinue) -> client-final for SASLResponse."""
        if self._state != "continue":
            raise ScramError("unexpected AuthenticationSASLContinue")
        self._state = "failed"
        server_first = _decode(data)
        parts = server_first.split(",")
        if parts[0].startswith("m="):
            raise ScramError("mandatory SCRAM extension is not supported")
        if len(parts) < 3:
            raise ScramError("malformed SCRAM message: server-first too short")
        nonce = _check_nonce(_attr(parts[0], "r"))
        salt = _unb64(_attr(parts[1], "s"), "salt")
        iters = _attr(parts[2], "i")
        if not (iters.isascii() and iters.isdigit()) or int(iters) < 1 or not salt:
            raise ScramError("malformed SCRAM server-first message")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ScramError("SCRAM server nonce does not extend ours")
        client_key, server_key = _salted_keys(self._password, salt, int(iters))
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        auth_message = f"{self._first_bare},{server_first},{without_proof}".encode("utf-8")
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        self._server_signature = _hmac(server_key, auth_message)
        self._state = "final"
        return f"{without_proof},p={_b64(_xor(client_key, signature))}".encode("ascii")

    def handle_final(self, data: bytes) -> None:
        """server-final (AuthenticationSASLFinal): raises ScramError unless the server
        proved it knows our verifier."""
        if self._state != "final":
            raise ScramError("unexpected AuthenticationSASLFinal")
        self._state = "done"
        text = _decode(data).split(",")[0]
        if text.startswith("e="):
            raise ScramError(f"server reported SCRAM error: {text[2:]}")
        signature = _unb64(_attr(text, "v"), "server signature")
        if not hmac.compare_digest(signature, self._server_signature):
            raise ScramError("server signature does not verify")


def choose_mechanism(offered: list[str]) -> str:
    """Pick SCRAM-SHA-256 from AuthenticationSASL's list; we never do channel binding."""
    if MECHANISM not in offered:
        raise ScramError(f"server offers no supported SASL mechanism: {offered!r}")
    return MECHANISM


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """PasswordMessage body for AuthenticationMD5Password, without the trailing NUL."""
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest()
    return b"md5" + hashlib.md5(inner.encode("ascii") + salt).hexdigest().encode("ascii")


def parse_sasl_mechanisms(payload: bytes) -> list[str]:
    """AuthenticationSASL body after the int32 code: NUL-terminated names, then an empty one.

    >>> parse_sasl_mechanisms(b"SCRAM-SHA-256-PLUS\\0SCRAM-SHA-256\\0\\0")
    ['SCRAM-SHA-256-PLUS', 'SCRAM-SHA-256']
    """
    names: list[str] = []
    pos = 0
    while True:
        end = payload.find(b"\0", pos)
        if end < 0:
            raise ScramError("unterminated SASL mechanism list")
        if end == pos:
            break
        names.append(_decode(payload[pos:end]))
        pos = end + 1
    if end + 1 != len(payload):
        raise ScramError("trailing bytes after SASL mechanism list")
    return names
