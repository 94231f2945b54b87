# Signed tokens: lifecycle, every refusal with its exception, key rotation, authenticate_password.
from __future__ import annotations

import base64
import time

import msgspec
import pytest

from pgguard import config
from pgguard.auth import tokens
from pgguard.auth.tokens import (
    DatabaseNotAllowed,
    TokenBadSignature,
    TokenExpired,
    TokenInvalid,
    TokenMalformed,
    TokenRevoked,
    TokenUnknownKey,
    TokenWrongIdentity,
    UnknownIdentity,
)
from pgguard.errors import AuthFailed, AuthRejected, ConfigError

SECRET = "s" * 16 + "0123456789abcdef0123"          # 36 chars
SECRET2 = "another-secret-of-enough-length-42!"

BASE = """
[auth]
{auth}
[identities.ci-agent]
kind = "agent"
groups = ["agents"]
[identities.alice]
kind = "human"
groups = ["dba"]
databases = ["app"]
"""


def make_cfg(tmp_path, auth: str = "", extra: str = "") -> config.Config:
    f = tmp_path / "pgguard.toml"
    f.write_text(BASE.format(auth=auth) + extra)
    return config.load(f)


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("PGGUARD_TOKEN_SECRET", SECRET)
    return make_cfg(tmp_path)


class Revoked:
    def __init__(self, *ids: str) -> None:
        self.ids = set(ids)

    def is_revoked(self, token_id: str) -> bool:
        return token_id in self.ids


def test_issue_and_verify_roundtrip(cfg):
    token, claims = tokens.issue(cfg, "ci-agent", "15m", ["app"], "readonly")
    assert token.startswith("pgg_k0.")
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert claims.identity == "ci-agent"
    assert claims.expires_at - claims.issued_at == 900
    assert claims.databases == ("app",) and claims.readonly and claims.key_id == "k0"
    assert len(claims.token_id) == 24
    got = tokens.verify(cfg, token, identity="ci-agent", database="app")
    assert got == claims
    assert 890 < got.remaining() <= 900


def test_defaults_all_databases_and_default_ttl(cfg):
    token, claims = tokens.issue(cfg, "ci-agent")
    assert claims.databases is None and claims.scope == "readwrite"
    assert claims.expires_at - claims.issued_at == 15 * 60
    assert tokens.verify(cfg, token, database="anything").allows("anything")


def test_token_ids_are_unique(cfg):
    ids = {tokens.issue(cfg, "ci-agent")[1].token_id for _ in range(200)}
    assert len(ids) == 200


def test_expired(cfg):
    token, claims = tokens.issue(cfg, "ci-agent", 60)
    tokens.verify(cfg, token, now=claims.expires_at - 1)
    with pytest.raises(TokenExpired) as e:
        tokens.verify(cfg, token, now=claims.expires_at, identity="ci-agent")
    assert e.value.sqlstate == "28P01" and e.value.severity == "FATAL"
    assert e.value.message == 'password authentication failed for user "ci-agent"'
    assert "expired" in e.value.reason


def test_longer_than_max_ttl_is_refused(tmp_path, monkeypatch, cfg):
    token, _ = tokens.issue(cfg, "ci-agent", "2h")
    shorter = make_cfg(tmp_path, 'max_ttl = "1h"\ndefault_ttl = "5m"')
    with pytest.raises(TokenExpired):
        tokens.verify(shorter, token)


def test_revoked(cfg):
    token, claims = tokens.issue(cfg, "ci-agent")
    tokens.verify(cfg, token, revocations=Revoked("other"))
    with pytest.raises(TokenRevoked):
        tokens.verify(cfg, token, revocations=Revoked(claims.token_id))


def _tamper_payload(token: str, **changes) -> str:
    kid, payload, sig = token.split(".")
    arr = msgspec.json.decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields = ["v", "sub", "iat", "exp", "db", "scp", "jti"]
    for k, v in changes.items():
        arr[fields.index(k)] = v
    new = base64.urlsafe_b64encode(msgspec.json.encode(arr)).rstrip(b"=").decode()
    return f"{kid}.{new}.{sig}"


@pytest.mark.parametrize("change", [
    {"sub": "alice"}, {"exp": 4_000_000_000}, {"db": None}, {"scp": "readwrite"},
    {"jti": "0" * 24},
])
def test_tampered_payload(cfg, change):
    token, _ = tokens.issue(cfg, "ci-agent", "5m", ["app"], "readonly")
    with pytest.raises(TokenBadSignature):
        tokens.verify(cfg, _tamper_payload(token, **change))


def test_tampered_signature_and_kid(cfg, monkeypatch):
    token, _ = tokens.issue(cfg, "ci-agent")
    sig = token.rsplit(".", 1)[1]
    flipped = token[:-len(sig)] + ("A" if sig[0] != "A" else "B") + sig[1:]
    with pytest.raises(TokenBadSignature):
        tokens.verify(cfg, flipped)
    with pytest.raises(TokenUnknownKey):
        tokens.verify(cfg, token.replace("pgg_k0.", "pgg_k7.", 1))


def test_wrong_key(cfg, tmp_path, monkeypatch):
    token, _ = tokens.issue(cfg, "ci-agent")
    monkeypatch.setenv("PGGUARD_TOKEN_SECRET", SECRET2)
    with pytest.raises(TokenBadSignature):
        tokens.verify(cfg, token)


def test_unknown_kid_and_unset_secret(cfg, monkeypatch):
    token, _ = tokens.issue(cfg, "ci-agent")
    monkeypatch.delenv("PGGUARD_TOKEN_SECRET")
    with pytest.raises(TokenUnknownKey) as e:
        tokens.verify(cfg, token)
    assert "PGGUARD_TOKEN_SECRET" in e.value.reason
    assert "PGGUARD_TOKEN_SECRET" not in e.value.message


@pytest.mark.parametrize("bad", [
    "", "pgg_", "pgg_k0..", "nope", "pgg_k0.abc.def",
    "pgg_k0.abc." + "A" * 44, "pgg_k0.a b." + "A" * 43, "pgg_" + "x" * 5000,
    "pgg_-k.abc." + "A" * 43,
])
def test_malformed(cfg, bad):
    with pytest.raises(TokenMalformed):
        tokens.verify(cfg, bad)


def test_well_formed_but_unsigned(cfg):
    with pytest.raises(TokenBadSignature):
        tokens.verify(cfg, "pgg_k0.e30." + "A" * 43)


def test_signed_garbage_payload_is_malformed(cfg):
    # a correctly signed payload that is not ours (e.g. another version) is refused
    key = tokens.load_key(cfg, "k0")
    payload = base64.urlsafe_b64encode(b'[2,"ci-agent",1,9999999999,null,"readonly","ab"]')
    signed = "pgg_k0." + payload.rstrip(b"=").decode()
    token = signed + "." + tokens._b64e(tokens._sign(key, signed))
    with pytest.raises(TokenMalformed):
        tokens.verify(cfg, token)


def test_wrong_identity(cfg):
    token, _ = tokens.issue(cfg, "ci-agent")
    with pytest.raises(TokenWrongIdentity) as e:
        tokens.verify(cfg, token, identity="alice")
    assert e.value.message == 'password authentication failed for user "alice"'


def test_wrong_database(cfg):
    token, _ = tokens.issue(cfg, "ci-agent", databases=["app"])
    with pytest.raises(DatabaseNotAllowed) as e:
        tokens.verify(cfg, token, identity="ci-agent", database="other")
    assert e.value.sqlstate == "28000" and e.value.severity == "FATAL"
    assert isinstance(e.value, AuthRejected) and not isinstance(e.value, AuthFailed)


def test_every_refusal_is_28P01(cfg):
    for exc in (TokenMalformed, TokenBadSignature, TokenUnknownKey, TokenExpired,
                TokenRevoked, TokenWrongIdentity):
        assert issubclass(exc, TokenInvalid) and issubclass(exc, AuthFailed)
        assert exc("why", identity="x").sqlstate == "28P01"
        assert "why" not in exc("why", identity="x").message


def test_rotation(tmp_path, monkeypatch):
    monkeypatch.setenv("PGGUARD_TOKEN_SECRET", SECRET)
    monkeypatch.setenv("PGGUARD_TOKEN_K2", SECRET2)
    old_cfg = make_cfg(tmp_path)
    old, _ = tokens.issue(old_cfg, "ci-agent")
    # step 1: add k2 and sign with it; k0 tokens keep working
    both = make_cfg(tmp_path, 'token_keys = { k2 = "PGGUARD_TOKEN_K2" }\ntoken_key_id = "k2"')
    new, claims = tokens.issue(both, "ci-agent")
    assert new.startswith("pgg_k2.") and claims.key_id == "k2"
    assert tokens.verify(both, old).key_id == "k0"
    assert tokens.verify(both, new).key_id == "k2"
    with pytest.raises(TokenUnknownKey):
        tokens.verify(old_cfg, new)
    # step 2: retire k0
    only_k2 = make_cfg(tmp_path, 'token_secret_env = ""\n'
                                 'token_keys = { k2 = "PGGUARD_TOKEN_K2" }\ntoken_key_id = "k2"')
    assert only_k2.auth.key_ids() == ["k2"]
    tokens.verify(only_k2, new)
    with pytest.raises(TokenUnknownKey):
        tokens.verify(only_k2, old)
    assert tokens.check_keys(both) == ["k0", "k2"]


def test_issue_refusals(cfg, monkeypatch):
    with pytest.raises(ConfigError, match="unknown identity 'bob'"):
        tokens.issue(cfg, "bob")
    with pytest.raises(ConfigError, match="ttl"):
        tokens.issue(cfg, "ci-agent", "soon")
    with pytest.raises(ConfigError, match="max_ttl"):
        tokens.issue(cfg, "ci-agent", "2d")
    with pytest.raises(ConfigError, match="ttl"):
        tokens.issue(cfg, "ci-agent", 0)
    with pytest.raises(ConfigError, match="identities.alice.databases"):
        tokens.issue(cfg, "alice", databases=["other"])
    with pytest.raises(ConfigError, match="scope"):
        tokens.issue(cfg, "alice", scope="admin")      # type: ignore[arg-type]
    monkeypatch.setenv("PGGUARD_TOKEN_SECRET", "short")
    with pytest.raises(ConfigError, match="too short"):
        tokens.issue(cfg, "ci-agent")
    monkeypatch.delenv("PGGUARD_TOKEN_SECRET")
    with pytest.raises(ConfigError, match="PGGUARD_TOKEN_SECRET is not set"):
        tokens.issue(cfg, "ci-agent")


def test_config_validation(tmp_path):
    for auth, msg in [
        ('token_key_id = "k9"', "not a configured key"),
        ('token_keys = { k0 = "X" }', "k0 is the key id"),
        ('token_keys = { "bad.id" = "X" }', "key id"),
        ('default_ttl = "2d"', "default_ttl"),
        ('throttle_window = "forever"', "invalid duration"),
    ]:
        with pytest.raises(ConfigError, match=msg) as e:
            make_cfg(tmp_path, auth)
        assert "auth" in e.value.message


def test_authenticate_password_token(cfg):
    token, claims = tokens.issue(cfg, "alice", "5m", ["app"], "readonly")
    p = tokens.authenticate_password(cfg, "alice", token.encode() + b"\0", database="app")
    assert (p.identity, p.kind, p.groups, p.scope, p.method) == (
        "alice", "human", ("dba",), "readonly", "token")
    assert p.token_id == claims.token_id and p.expires_at == claims.expires_at
    assert p.identity_config is cfg.identities["alice"] and p.readonly
    with pytest.raises(TokenRevoked):
        tokens.authenticate_password(cfg, "alice", token, database="app",
                                     revocations=Revoked(claims.token_id))
    with pytest.raises(TokenWrongIdentity):
        tokens.authenticate_password(cfg, "ci-agent", token, database="app")


def test_authenticate_password_database_checks(cfg, tmp_path, monkeypatch):
    # identity allows every database, token only "app"
    token, _ = tokens.issue(cfg, "ci-agent", databases=["app"])
    with pytest.raises(DatabaseNotAllowed):
        tokens.authenticate_password(cfg, "ci-agent", token, database="other")
    # token allows all, identity only "app"
    token, _ = tokens.issue(cfg, "alice")
    tokens.authenticate_password(cfg, "alice", token, database="app")
    with pytest.raises(DatabaseNotAllowed):
        tokens.authenticate_password(cfg, "alice", token, database="other")
    # upstream allow-list
    listed = make_cfg(tmp_path, extra='[upstream]\ndatabases = ["app"]\n')
    token, _ = tokens.issue(listed, "ci-agent")
    with pytest.raises(DatabaseNotAllowed):
        tokens.authenticate_password(listed, "ci-agent", token, database="other")


def test_authenticate_password_identity_gone(cfg, tmp_path):
    token, _ = tokens.issue(cfg, "alice")
    f = tmp_path / "gone.toml"
    f.write_text("[identities.ci-agent]\n")
    with pytest.raises(UnknownIdentity) as e:
        tokens.authenticate_password(config.load(f), "alice", token, database="app")
    assert e.value.sqlstate == "28000"


@pytest.mark.parametrize("pw", ["hunter2", b"\xff\xfe", "eyJhbGciOi.x.y"])
def test_authenticate_password_not_a_token(cfg, pw):
    with pytest.raises(TokenMalformed) as e:
        tokens.authenticate_password(cfg, "ci-agent", pw, database="app")
    assert e.value.message == 'password authentication failed for user "ci-agent"'


def test_verify_is_fast(cfg):
    token, _ = tokens.issue(cfg, "ci-agent")
    t0 = time.perf_counter()
    for _ in range(2000):
        tokens.verify(cfg, token, identity="ci-agent", database="app")
    per = (time.perf_counter() - t0) / 2000
    assert per < 200e-6, f"verify takes {per * 1e6:.0f} us"


def test_session_ended_errors():
    e = tokens.TokenSessionEnded.expired("ci-agent")
    assert e.sqlstate == "28P01" and e.severity == "FATAL" and e.why == "expired"
    assert "expired" in e.message and "ci-agent" in e.message
    assert tokens.TokenSessionEnded.revoked("x").why == "revoked"
