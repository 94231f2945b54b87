# SCRAM, md5 and SASL-list helpers: RFC 7677 vector, round trips, tampering, real PG verifiers.
from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from pgguard.auth.scram import (
    MECHANISM, ScramClient, ScramError, ScramServer, ScramVerifier,
    choose_mechanism, md5_password, parse_sasl_mechanisms,
)
from pgguard.errors import ProtocolViolation

# RFC 7677 section 3: user "user", password "pencil".
C_NONCE = "rOprNGfwEbeRWgbNEkqO"
S_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# rolpassword values read from pg_authid of a PostgreSQL 15 server started by hand
# (password_encryption='scram-sha-256'); the second password is "p,=ss wörd".
PG15_VERIFIERS = [
    ("pw", "SCRAM-SHA-256$4096:v2gW+hxcghl3MtCoMrNFMA=="
           "$QxQBdv/NXtc9NVxP4moxQsuac9lQ8f5xOzKRLDpGOeA="
           ":SeU5gyjl6Iof5tpJPeUUrBORXJqz7t03KXPRuVuWvk0="),
    ("p,=ss wörd", "SCRAM-SHA-256$4096:jiaCOQQaPSGZzuFoGyJa3g=="
                   "$r919z/SFW9SHwROeXUYe/79X7C4km16OHXxgooCYW1M="
                   ":pbP29rODeRJkjHMV+7/KQtCOfLCTUsyDusKri+uagJI="),
]
# Same server: CREATE ROLE rmd5 PASSWORD 'md5 pw' with password_encryption='md5'.
PG15_MD5_ROLPASSWORD = "md5404f8cb2b3f7aad07515f5c78c79d1d8"


def rfc_server() -> ScramServer:
    return ScramServer(ScramVerifier.from_password("pencil", salt=SALT), nonce=S_NONCE)


def started(password: str = "pw", verifier: ScramVerifier | None = None):
    srv = ScramServer(verifier or ScramVerifier.from_password("pw"))
    cli = ScramClient(password)
    return srv, cli, cli.handle_continue(srv.handle_initial(*cli.initial()))


def test_rfc7677_client():
    cli = ScramClient("pencil", nonce=C_NONCE, username="user")
    assert cli.initial() == (MECHANISM, RFC_CLIENT_FIRST)
    assert cli.handle_continue(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    cli.handle_final(RFC_SERVER_FINAL)


def test_rfc7677_server():
    srv = rfc_server()
    assert srv.handle_initial(MECHANISM, RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert srv.handle_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


@pytest.mark.parametrize("password", ["pw", "", "longer pässword, with = and ,"])
def test_round_trip(password):
    srv, cli, final = started(password, ScramVerifier.from_password(password, iterations=2))
    server_final = srv.handle_final(final)
    assert server_final is not None
    cli.handle_final(server_final)


def hand_proof(password: str, salt: bytes, auth_message: bytes) -> bytes:
    # Independent oracle for RFC 5802 ClientProof, straight from the formulas.
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    signature = hmac.new(stored_key, auth_message, "sha256").digest()
    return base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature)))


@pytest.mark.parametrize(("header", "binding"), [(b"n,,", b"biws"), (b"y,,", b"eSws")])
def test_libpq_style_first_message_and_y_flag(header, binding):
    # libpq sends an empty n=; 'y' (client could bind, thinks server cannot) is accepted,
    # and then c= must carry that same header.
    bare = b"n=,r=" + C_NONCE.encode()
    srv = rfc_server()
    server_first = srv.handle_initial(MECHANISM, header + bare)
    without_proof = b"c=" + binding + b",r=" + C_NONCE.encode() + S_NONCE.encode()
    proof = hand_proof("pencil", SALT, bare + b"," + server_first + b"," + without_proof)
    assert srv.handle_final(without_proof + b",p=" + proof) is not None
    srv = rfc_server()
    srv.handle_initial(MECHANISM, header + bare)
    other = b"c=" + (b"eSws" if binding == b"biws" else b"biws") + without_proof[6:]
    with pytest.raises(ScramError):
        srv.handle_final(other + b",p=" + proof)


def test_wrong_password_returns_none():
    srv, _cli, final = started("not pw")
    assert srv.handle_final(final) is None


def test_fake_verifier_is_stable_and_never_matches():
    a = ScramVerifier.fake("alice", b"k" * 32)
    assert a == ScramVerifier.fake("alice", b"k" * 32)
    assert a.salt != ScramVerifier.fake("bob", b"k" * 32).salt
    assert a != ScramVerifier.fake("alice", b"other")
    assert len(a.salt) == 16 and len(a.stored_key) == len(a.server_key) == 32
    for password in ("", "alice", "pw"):
        srv, _cli, final = started(password, a)
        assert srv.handle_final(final) is None


@pytest.mark.parametrize("tamper", [
    lambda c, r, p: b"c=eSws," + r + b"," + p,        # binding differs from client-first header
    lambda c, r, p: c + b"," + r + b"x," + p,         # nonce is not client + server nonce
    lambda c, r, p: c + b"," + r[:-1] + b"," + p,
    lambda c, r, p: c + b"," + p + b"," + r,          # attributes out of order
    lambda c, r, p: r + b"," + c + b"," + p,
    lambda c, r, p: c + b"," + r + b",x=ext," + p,    # extension
    lambda c, r, p: c + b"," + r + b",p=!!!",         # proof not base64
    lambda c, r, p: c + b"," + r + b",p=" + base64.b64encode(b"short"),
    lambda c, r, p: c + b"," + r,                     # no proof
    lambda c, r, p: b"\xff" + c + b"," + r + b"," + p,
])
def test_tampered_client_final(tamper):
    srv, _cli, final = started()
    with pytest.raises(ScramError):
        srv.handle_final(tamper(*final.split(b",")))


def test_flipped_proof_bit_is_wrong_password_not_error():
    srv, _cli, final = started()
    head, proof = final.split(b",p=")
    flipped = bytearray(base64.b64decode(proof))
    flipped[0] ^= 1
    assert srv.handle_final(head + b",p=" + base64.b64encode(flipped)) is None


@pytest.mark.parametrize("first", [
    b"p=tls-server-end-point,,n=,r=abc",           # channel binding: never offered
    b"n,a=bob,n=,r=abc",                           # authzid
    b"x,,n=,r=abc",
    b"n,,m=ext,n=,r=abc",                          # mandatory extension
    b"n,,r=abc,n=",                                # out of order
    b"n,,n=,r=abc,x=ext",                          # extension
    b"n,,n=,r=",                                   # empty nonce
    b"n,,n=,r=a\x7fb",                             # nonce not printable
    b"n,,n=",
    b"\xff\xfe",
])
def test_malformed_client_first(first):
    with pytest.raises(ScramError):
        rfc_server().handle_initial(MECHANISM, first)


def test_wrong_mechanism_and_order():
    with pytest.raises(ScramError):
        rfc_server().handle_initial("SCRAM-SHA-256-PLUS", RFC_CLIENT_FIRST)
    with pytest.raises(ScramError):
        rfc_server().handle_final(RFC_CLIENT_FINAL)
    srv = rfc_server()
    srv.handle_initial(MECHANISM, RFC_CLIENT_FIRST)
    srv.handle_final(RFC_CLIENT_FINAL)
    with pytest.raises(ScramError):
        srv.handle_final(RFC_CLIENT_FINAL)
    assert issubclass(ScramError, ProtocolViolation)


def test_client_rejects_bad_server_messages():
    def fresh() -> ScramClient:
        cli = ScramClient("pencil", nonce=C_NONCE, username="user")
        cli.initial()
        return cli
    for bad in [
        RFC_SERVER_FIRST.replace(b"r=rOpr", b"r=XOpr"),         # nonce does not extend ours
        b"r=" + C_NONCE.encode() + b",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nothing added
        RFC_SERVER_FIRST.replace(b"i=4096", b"i=0"),
        RFC_SERVER_FIRST.replace(b"i=4096", b"i=x"),
        RFC_SERVER_FIRST.replace(b"s=W22", b"s=*22"),
        b"m=ext," + RFC_SERVER_FIRST,
        b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    ]:
        with pytest.raises(ScramError):
            fresh().handle_continue(bad)
    for bad in [RFC_SERVER_FINAL[:-4] + b"AAA=", b"e=invalid-proof", b"x=1", b"v=???"]:
        cli = fresh()
        cli.handle_continue(RFC_SERVER_FIRST)
        with pytest.raises(ScramError):
            cli.handle_final(bad)
    with pytest.raises(ScramError):
        fresh().handle_final(RFC_SERVER_FINAL)   # before handle_continue


@pytest.mark.parametrize(("password", "text"), PG15_VERIFIERS)
def test_parse_real_postgres_verifier(password, text):
    v = ScramVerifier.parse(text)
    assert str(v) == text
    assert v.iterations == 4096 and len(v.salt) == 16
    assert ScramVerifier.from_password(password, salt=v.salt, iterations=v.iterations) == v
    # and our server accepts our client against it
    srv, cli, final = started(password, v)
    cli.handle_final(srv.handle_final(final))


@pytest.mark.parametrize("text", [
    "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
    "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
    "SCRAM-SHA-256$4096:c2FsdA==$AAAA:" + "A" * 43 + "=",
    "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",
    "SCRAM-SHA-256$4096:c2FsdA==",
    "md5404f8cb2b3f7aad07515f5c78c79d1d8",
])
def test_parse_rejects(text):
    with pytest.raises(ScramError):
        ScramVerifier.parse(text)


def test_verifier_repr_hides_keys():
    v = ScramVerifier.from_password("pw")
    assert base64.b64encode(v.stored_key).decode() not in repr(v)
    assert v.stored_key.hex() not in repr(v)


def test_md5_password():
    # rolpassword is "md5" + md5(password + user); the reply salts its hex digest.
    assert PG15_MD5_ROLPASSWORD == "md5" + hashlib.md5(b"md5 pwrmd5").hexdigest()
    salt = b"\x01\x02\x03\x04"
    inner = PG15_MD5_ROLPASSWORD[3:].encode()
    expected = b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
    assert md5_password("rmd5", "md5 pw", salt) == expected
    assert len(md5_password("u", "p", salt)) == 35


def test_sasl_mechanisms():
    assert parse_sasl_mechanisms(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0") == [
        "SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    assert parse_sasl_mechanisms(b"\0") == []
    for bad in [b"", b"SCRAM-SHA-256\0", b"SCRAM-SHA-256", b"SCRAM-SHA-256\0\0x"]:
        with pytest.raises(ScramError):
            parse_sasl_mechanisms(bad)
    assert choose_mechanism(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]) == MECHANISM
    with pytest.raises(ScramError):
        choose_mechanism(["SCRAM-SHA-256-PLUS"])
