"""Certificates for a fleet's private CA, made with the ``cryptography`` package (no crypto of our own).

EC P-256 keys: small, fast to make on a Pi, and accepted by Mosquitto, paho and the native client's OpenSSL.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: lifetime of certificates and of the CRL (OpenSSL refuses every connection once the CRL's next update passed,
#: so the CRL is valid as long as the certificates; revoke-device writes a new one)
VALIDITY = dt.timedelta(days=3650)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate a device clock slightly behind


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (0600), never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_ca(fleet: str, ca_dir: Path) -> None:
    """A self-signed CA for one fleet: ``ca.crt`` and ``ca.key`` (0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgemole {fleet} CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now())
            .not_valid_after(_now() + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    ca_dir.mkdir(parents=True, exist_ok=True)
    write_private(ca_dir / "ca.key", _key_pem(key))
    (ca_dir / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def issue(ca_dir: Path, common_name: str, cert_path: Path, key_path: Path, *, server_names: Iterable[str] = ()) -> int:
    """Sign a key pair for ``common_name``: a server certificate when ``server_names`` (DNS names or IP addresses
    for the subject alternative name) are given, else a client certificate. Returns its serial number."""
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    names = list(dict.fromkeys(server_names))
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(serial)
               .not_valid_before(_now()).not_valid_after(_now() + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if names
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if names:
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return serial


def write_crl(ca_dir: Path, revoked_serials: Iterable[int], path: Path) -> None:
    """The CA's certificate revocation list (possibly empty: Mosquitto's ``crlfile`` needs one to exist)."""
    ca_cert, ca_key = _load_ca(ca_dir)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(_now()).next_update(_now() + VALIDITY))
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_now()).build())
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
