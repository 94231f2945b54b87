# Throwaway test PKI: a CA, a server cert for localhost/127.0.0.1 and an optional client cert.
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, issuer: x509.Name, signer, *, ca: bool, sans=(), usage=None):
    """Return (key, cert) for `subject`; self-signed when `signer` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(_name(subject)).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca,
                                      content_commitment=False, key_encipherment=not ca,
                                      data_encipherment=False, key_agreement=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if signer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                            critical=False)
    return key, b.sign(signer or key, hashes.SHA256())


def _write(path: Path, key=None, cert=None) -> str:
    if key is not None:
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        path.write_bytes(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def make_test_pki(directory, client_user: str | None = None) -> dict[str, str]:
    """Write ca.crt, server.crt, server.key (and client.crt/.key with CN=client_user) into
    `directory`; return their paths under keys ca_cert, server_cert, server_key, client_*."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _issue("pgguard test CA", _name("pgguard test CA"), None, ca=True)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    srv_key, srv_cert = _issue("localhost", ca_cert.subject, ca_key, ca=False, sans=sans,
                               usage=ExtendedKeyUsageOID.SERVER_AUTH)
    out = {"ca_cert": _write(d / "ca.crt", cert=ca_cert),
           "server_cert": _write(d / "server.crt", cert=srv_cert),
           "server_key": _write(d / "server.key", key=srv_key)}
    if client_user:
        cl_key, cl_cert = _issue(client_user, ca_cert.subject, ca_key, ca=False,
                                 usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        out["client_cert"] = _write(d / "client.crt", cert=cl_cert)
        out["client_key"] = _write(d / "client.key", key=cl_key)
    return out
