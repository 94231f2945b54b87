# OIDC: JWTs signed by a test key set (RSA, EC) accepted or refused; claim mapping; JWKS sources.
from __future__ import annotations

import asyncio
import base64
import http.server
import json
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pgguard import config
from pgguard.auth import oidc, tokens
from pgguard.auth.oidc import OidcVerifier, TokenWrongAudience, TokenWrongIssuer
from pgguard.auth.tokens import (
    TokenBadSignature,
    TokenExpired,
    TokenInvalid,
    TokenMalformed,
    TokenRevoked,
    TokenUnknownKey,
    TokenWrongIdentity,
    UnknownIdentity,
)

ISSUER = "https://idp.example/realms/acme"
AUDIENCE = "pgguard"


def _rsa():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


RSA_KEY = _rsa()
RSA_OTHER = _rsa()
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC384_KEY = ec.generate_private_key(ec.SECP384R1())


def jwk(private, kid, **extra):
    pub = private.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        d = jwt.algorithms.RSAAlgorithm.to_jwk(pub, as_dict=True)
    else:
        d = jwt.algorithms.ECAlgorithm.to_jwk(pub, as_dict=True)
    return {**d, "kid": kid, "use": "sig", **extra}


def jwks(*keys):
    return json.dumps({"keys": list(keys)})


DEFAULT_JWKS = jwks(jwk(RSA_KEY, "r1"), jwk(EC_KEY, "e1"), jwk(EC384_KEY, "e384"))


def make_token(private=RSA_KEY, kid="r1", alg="RS256", **claims):
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "agent-7", "iat": now, "exp": now + 300,
            "jti": "jwt-id-1"}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(body, private, algorithm=alg, headers=headers)


def make_cfg(tmp_path, oidc_extra="", identities="", jwks_text=DEFAULT_JWKS):
    (tmp_path / "jwks.json").write_text(jwks_text)
    f = tmp_path / "pgguard.toml"
    f.write_text(f"""
[auth.oidc]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = "jwks.json"
{oidc_extra}
{identities}
""")
    return config.load(f)


@pytest.fixture
def verifier(tmp_path):
    return OidcVerifier(make_cfg(tmp_path))


def test_rs256_accepted(verifier):
    p = verifier.verify(make_token(groups=["agents", "ops"]), username="agent-7")
    assert (p.identity, p.kind, p.method, p.scope) == ("agent-7", "agent", "oidc", "readwrite")
    assert p.groups == ("agents", "ops") and p.token_id == "jwt-id-1"
    assert p.identity_config.kind == "agent" and p.databases is None
    assert abs(p.expires_at - (time.time() + 300)) < 5


def test_es256_accepted(verifier):
    assert verifier.verify(make_token(EC_KEY, "e1", "ES256")).identity == "agent-7"


def test_bad_issuer(verifier):
    with pytest.raises(TokenWrongIssuer):
        verifier.verify(make_token(iss="https://evil.example"))


def test_bad_audience(verifier):
    with pytest.raises(TokenWrongAudience):
        verifier.verify(make_token(aud="someone-else"))
    assert verifier.verify(make_token(aud=["x", AUDIENCE])).identity == "agent-7"


def test_expired_and_not_yet_valid(verifier):
    now = int(time.time())
    with pytest.raises(TokenExpired):
        verifier.verify(make_token(iat=now - 1000, exp=now - 100))
    with pytest.raises(TokenExpired):
        verifier.verify(make_token(nbf=now + 600))
    # an explicit clock
    t = make_token()
    verifier.verify(t, now=now + 100)
    with pytest.raises(TokenExpired):
        verifier.verify(t, now=now + 300 + 31)        # leeway 30 s


def test_missing_claims(verifier):
    with pytest.raises(TokenMalformed):
        verifier.verify(make_token(exp=None))
    with pytest.raises(TokenMalformed):
        verifier.verify(make_token(aud=None))


def test_unknown_kid(verifier):
    with pytest.raises(TokenUnknownKey):
        verifier.verify(make_token(kid="nope"))
    with pytest.raises(TokenUnknownKey):        # no kid, several keys: ambiguous
        verifier.verify(make_token(kid=None))


def test_no_kid_with_a_single_key(tmp_path):
    v = OidcVerifier(make_cfg(tmp_path, jwks_text=jwks(jwk(RSA_KEY, "only"))))
    assert v.verify(make_token(kid=None)).identity == "agent-7"


def test_signed_by_another_key(verifier):
    with pytest.raises(TokenBadSignature):
        verifier.verify(make_token(RSA_OTHER, "r1"))


def _b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_alg_none_refused(verifier):
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "agent-7", "exp": now + 300}
    for header in ({"alg": "none", "kid": "r1"}, {"alg": "None"}, {"kid": "r1"}):
        with pytest.raises(TokenMalformed):
            verifier.verify(f"{_b64(header)}.{_b64(body)}.")


def test_hs256_with_the_public_key_as_secret_refused(verifier):
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "agent-7", "exp": now + 300}
    header = {"alg": "HS256", "kid": "r1", "typ": "JWT"}
    import hashlib
    import hmac
    signing_input = f"{_b64(header)}.{_b64(body)}"
    sig = base64.urlsafe_b64encode(hmac.new(pem, signing_input.encode(), hashlib.sha256)
                                   .digest()).rstrip(b"=").decode()
    with pytest.raises(TokenMalformed):
        verifier.verify(f"{signing_input}.{sig}")


def test_key_type_must_fit_the_algorithm(verifier):
    # RS256 header pointing at the EC key, ES256 at the P-384 key
    with pytest.raises(TokenUnknownKey):
        verifier.verify(make_token(RSA_KEY, "e1", "RS256"))
    with pytest.raises(TokenUnknownKey):
        verifier.verify(make_token(EC_KEY, "e384", "ES256"))


def test_algorithm_not_in_the_allowed_list(tmp_path):
    v = OidcVerifier(make_cfg(tmp_path, 'algorithms = ["ES256"]'))
    with pytest.raises(TokenMalformed):
        v.verify(make_token())
    v.verify(make_token(EC_KEY, "e1", "ES256"))


def test_garbage(verifier):
    for bad in ["", "a.b.c", "eyJ.eyJ.x", "not-a-jwt"]:
        with pytest.raises(TokenInvalid):
            verifier.verify(bad)


def test_username_must_match(verifier):
    with pytest.raises(TokenWrongIdentity) as e:
        verifier.verify(make_token(), username="alice")
    assert e.value.message == 'password authentication failed for user "alice"'
    assert e.value.sqlstate == "28P01"


def test_keycloak_mapping(tmp_path):
    v = OidcVerifier(make_cfg(tmp_path, 'identity_claim = "preferred_username"\n'
                                        'groups_claim = "realm_access.roles"\nkind = "human"'))
    p = v.verify(make_token(preferred_username="carol",
                            realm_access={"roles": ["dba", "offline_access"]}),
                 username="carol")
    assert p.identity == "carol" and p.groups == ("dba", "offline_access")
    assert p.kind == "human"


def test_azure_mapping_with_group_map(tmp_path):
    v = OidcVerifier(make_cfg(tmp_path, 'identity_claim = ["upn", "preferred_username", "sub"]\n'
                                        'groups_claim = ["roles", "groups"]\n'
                                        'group_map = { "5f1c-guid" = "dba" }'))
    p = v.verify(make_token(upn="dave@corp.example", roles=["Reader"],
                            groups=["5f1c-guid", "other-guid"]))
    assert p.identity == "dave@corp.example"
    assert p.groups == ("Reader", "dba", "other-guid")
    # first present claim wins
    p = v.verify(make_token(preferred_username="erin"))
    assert p.identity == "erin"


def test_okta_single_string_group_and_missing_identity(tmp_path):
    v = OidcVerifier(make_cfg(tmp_path, 'identity_claim = "email"'))
    assert v.verify(make_token(email="f@x.io", groups="Everyone")).groups == ("Everyone",)
    with pytest.raises(TokenWrongIdentity):
        v.verify(make_token())          # no email claim


def test_known_identity_keeps_its_kind_and_groups(tmp_path):
    cfg = make_cfg(tmp_path, identities='[identities.agent-7]\nkind = "human"\n'
                                        'groups = ["dba"]\ndatabases = ["app"]')
    p = OidcVerifier(cfg).verify(make_token(groups=["ops", "dba"]))
    assert p.kind == "human" and p.groups == ("dba", "ops")
    assert p.identity_config.databases == ["app"]
    assert cfg.identities["agent-7"].groups == ["dba"]       # config untouched
    with pytest.raises(tokens.DatabaseNotAllowed):
        tokens.authenticate_password(cfg, "agent-7", make_token(), database="other",
                                     oidc=OidcVerifier(cfg))


def test_require_known_identity(tmp_path):
    v = OidcVerifier(make_cfg(tmp_path, "require_known_identity = true"))
    with pytest.raises(UnknownIdentity) as e:
        v.verify(make_token())
    assert e.value.sqlstate == "28000"


def test_jwks_file_reloads_on_change(tmp_path):
    cfg = make_cfg(tmp_path, jwks_text=jwks(jwk(RSA_KEY, "r1")))
    v = OidcVerifier(cfg)
    with pytest.raises(TokenUnknownKey):
        v.verify(make_token(RSA_OTHER, "r2"))
    (tmp_path / "jwks.json").write_text(jwks(jwk(RSA_KEY, "r1"), jwk(RSA_OTHER, "r2")))
    assert v.verify(make_token(RSA_OTHER, "r2")).identity == "agent-7"


def test_private_keys_and_enc_keys_are_ignored(tmp_path):
    priv = jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY, as_dict=True)
    v = OidcVerifier(make_cfg(tmp_path, jwks_text=jwks({**priv, "kid": "p"},
                                                       jwk(RSA_OTHER, "enc", use="enc"))))
    for kid, key in (("p", RSA_KEY), ("enc", RSA_OTHER)):
        with pytest.raises(TokenUnknownKey):
            v.verify(make_token(key, kid))


def test_authenticate_password_dispatches_jwt_and_honours_revocation(tmp_path):
    cfg = make_cfg(tmp_path)
    v = OidcVerifier(cfg)

    class Revoked:
        ids = {"jwt-id-1"}

        def is_revoked(self, jti):
            return jti in self.ids

    t = make_token()
    p = tokens.authenticate_password(cfg, "agent-7", t, database="app", oidc=v)
    assert p.method == "oidc"
    with pytest.raises(TokenRevoked):
        tokens.authenticate_password(cfg, "agent-7", t, database="app", oidc=v,
                                     revocations=Revoked())
    with pytest.raises(TokenMalformed):             # no [auth.oidc] verifier passed
        tokens.authenticate_password(cfg, "agent-7", t, database="app")


def test_jwt_token_id_without_jti():
    t = make_token(jti=None)
    tid = oidc.jwt_token_id(t, oidc.peek_jwt(t))
    assert tid.startswith("jwt-") and len(tid) == 36
    assert oidc.jwt_token_id(t) == tid


# ---- jwks_url ------------------------------------------------------------------------

class _JwksServer:
    def __init__(self) -> None:
        self.body = DEFAULT_JWKS.encode()
        self.hits = 0
        self.delay = 0.0
        self.status = 200
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                time.sleep(outer.delay)
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *a) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/keys"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _JwksServer()
    yield s
    s.close()


def url_cfg(tmp_path, url, extra=""):
    f = tmp_path / "url.toml"
    f.write_text(f'[auth.oidc]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n'
                 f'jwks_url = "{url}"\n{extra}\n')
    return config.load(f)


def test_jwks_url_fetched_once_and_cached(tmp_path, server):
    v = OidcVerifier(url_cfg(tmp_path, server.url))
    for _ in range(5):
        v.verify(make_token())
    assert server.hits == 1


def test_jwks_url_unknown_kid_refetches_rate_limited(tmp_path, server, monkeypatch):
    v = OidcVerifier(url_cfg(tmp_path, server.url))
    v.verify(make_token())
    server.body = jwks(jwk(RSA_KEY, "r1"), jwk(RSA_OTHER, "r2")).encode()
    with pytest.raises(TokenUnknownKey):        # refetch only once a minute
        v.verify(make_token(RSA_OTHER, "r2"))
    assert server.hits == 1
    monkeypatch.setattr(oidc, "_REFETCH_AFTER", 0.0)
    assert v.verify(make_token(RSA_OTHER, "r2")).identity == "agent-7"
    assert server.hits == 2


def test_jwks_url_timeout_and_failure_keep_old_keys(tmp_path, server):
    v = OidcVerifier(url_cfg(tmp_path, server.url, 'jwks_timeout = "200ms"\njwks_cache = "0s"'))
    v.verify(make_token())
    server.delay = 1.0
    t0 = time.monotonic()
    # cache stale, fetch times out: the previous keys still verify
    v._attempted_at = float("-inf")
    assert v.verify(make_token()).identity == "agent-7"
    assert time.monotonic() - t0 < 0.9


def test_jwks_url_unreachable_without_keys(tmp_path, server):
    server.status = 500
    server.body = b"oops"
    v = OidcVerifier(url_cfg(tmp_path, server.url))
    with pytest.raises(TokenUnknownKey):
        v.verify(make_token())


def test_verify_async_fetches_in_a_thread(tmp_path, server):
    v = OidcVerifier(url_cfg(tmp_path, server.url))

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)
        server.delay = 0.3
        task = asyncio.ensure_future(ticker())
        p = await v.verify_async(make_token(), username="agent-7")
        task.cancel()
        return p, ticks
    p, ticks = asyncio.run(main())
    assert p.identity == "agent-7" and ticks >= 10      # the loop kept running


def test_config_validation(tmp_path):
    for extra, msg in [
        ('', "exactly one of jwks_file and jwks_url"),
        ('jwks_url = "http://idp.example/keys"', "https"),
        ('jwks_file = "j.json"\nalgorithms = ["HS256"]', "algorithms"),
        ('jwks_file = "j.json"\nalgorithms = []', "cannot be empty"),
    ]:
        f = tmp_path / "bad.toml"
        f.write_text(f'[auth.oidc]\nissuer = "i"\naudience = "a"\n{extra}\n')
        with pytest.raises(config.ConfigError, match=msg) as e:
            config.load(f)
        assert "auth.oidc" in e.value.message
