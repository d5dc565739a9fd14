"""Test PKI made at test time with ``cryptography``: CAs, server and client certificates.

Nothing is checked in: every test session makes fresh keys (EC P-256, fast).
"""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: Optional[str], org: str = "mqttd tests") -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CA:
    """A certificate authority that writes PEM files into ``directory``."""

    def __init__(self, directory: Path, name: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = _name(name)
        self.certificate = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(self.key, hashes.SHA256()))
        self.cert_path = self.directory / f"{name}.crt"
        self.cert_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, file_stem: str, common_name: Optional[str], server: bool = False):
        """Write ``<stem>.crt`` and ``<stem>.key``; returns ``(cert_path, key_path)``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(self.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        cert_path = self.directory / f"{file_stem}.crt"
        key_path = self.directory / f"{file_stem}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return cert_path, key_path


class PKI:
    """Two unrelated CAs and the certificates the transport tests use.

    ``server``: CN=localhost, SAN localhost + 127.0.0.1, from ``ca``;
    ``alice``: client CN=alice from ``ca``; ``mallory``: client CN=mallory from
    ``other_ca`` (a CA the broker does not trust); ``nocn``: client without a
    Common Name from ``ca``.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.ca = CA(self.directory, "ca")
        self.other_ca = CA(self.directory, "other-ca")
        self.server_cert, self.server_key = self.ca.issue("server", "localhost", server=True)
        self.alice_cert, self.alice_key = self.ca.issue("alice", "alice")
        self.mallory_cert, self.mallory_key = self.other_ca.issue("mallory", "mallory")
        self.nocn_cert, self.nocn_key = self.ca.issue("nocn", None)

    def mqtts(self, port="0", **options) -> str:
        """An ``mqtts:`` endpoint string on 127.0.0.1 with the server certificate."""
        parts = [f"mqtts:{port}", "interface=127.0.0.1", f"privateKey={self.server_key}",
                 f"certKey={self.server_cert}"]
        parts += [f"{k}={v}" for k, v in options.items()]
        return ":".join(parts)
