"""`fedcybgd certs`: a private CA, a server certificate and one client certificate per site.

Enough for a federation to run with mutual TLS out of the box. Keys are EC P-256, written with
mode 0600; the CA key stays with the operator (never copy it to a site). Client certificates
carry the site name as their common name: with mutual TLS the coordinator registers a client
under the name in its certificate, whatever name the client asks for. A certificate whose common
name is "operator" may make operator calls.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcybgd.common.transport import OPERATOR_NAME

VALID_DAYS = 825


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcybgd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _save(out: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    _write(out / f"{stem}.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), private=True)
    _write(out / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)


def _issue(subject: str, issuer_key, issuer_name: x509.Name | None, *, ca: bool = False, server_names=(),
           client: bool = False) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name or _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server_names:
        alt = [x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n) for n in server_names]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    signing_key = key if issuer_name is None else issuer_key
    return key, builder.sign(signing_key, hashes.SHA256())


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def make_certs(out_dir: str | Path, server_names: list[str], clients: list[str], operator: bool = True) -> Path:
    """ca.pem/ca.key, server.pem/server.key (valid for `server_names` plus localhost), and
    <site>.pem/<site>.key per client (plus operator.pem/.key). Reuses an existing CA in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ca.pem").is_file() and (out / "ca.key").is_file():
        ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    else:
        ca_key, ca_cert = _issue("fedcybgd CA", None, None, ca=True)
        _save(out, "ca", ca_key, ca_cert)
    names = list(dict.fromkeys([*server_names, "localhost", "127.0.0.1"]))
    _save(out, "server", *_issue(names[0], ca_key, ca_cert.subject, server_names=names))
    for site in [*clients, *([OPERATOR_NAME] if operator else [])]:
        if not site or any(c in site for c in "/\\\0") or site.startswith(".") or site in ("ca", "server"):
            raise ValueError(f"bad site name {site!r}")
        _save(out, site, *_issue(site, ca_key, ca_cert.subject, client=True))
    return out


def revoke_site(out_dir: str | Path, name: str) -> Path:
    """Add site `name` to the revocation list ``revoked.json`` in `out_dir` (with its certificate's fingerprint when
    ``<name>.pem`` is there) and return the list's path. The coordinator reloads the list when it changes and
    refuses the site at its next call; the site's certificate and key stay where they are (a new certificate for
    the same name is refused too: the name is revoked)."""
    from fedcybgd.server.revocation import REVOCATION_FILE, add_revocation

    out = Path(out_dir)
    if not name or any(c in name for c in "/\\\0") or name.startswith(".") or name in ("ca", "server"):
        raise ValueError(f"bad site name {name!r}")
    if not out.is_dir():
        raise ValueError(f"no certificates folder {out}")
    pem = out / f"{name}.pem"
    path = out / REVOCATION_FILE
    add_revocation(path, name, pem.read_bytes() if pem.is_file() else None)
    return path
