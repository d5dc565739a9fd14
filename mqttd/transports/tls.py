"""TLS for listeners: reloadable server options, client certificates, identity (layer L4).

:class:`TLSServerOptions` is an ``IOpenSSLServerConnectionCreator`` that every
new connection asks for its ``OpenSSL.SSL.Connection``; :meth:`~TLSServerOptions.reload`
reads the files again and swaps the context, so new connections use the new
certificate while established ones keep theirs (their TLS session was made
from the old context and stays up).

Defaults a production listener wants: TLS 1.2 at least (1.3 preferred by
OpenSSL), Twisted's vetted cipher list, no client certificate unless a CA file
is given.  With ``ca_certs`` a client certificate is asked for and verified
against those CAs (``require_certificate=False``: optional, verified if sent;
``True``: a client without one fails the handshake).
"""
from __future__ import annotations

import os
from typing import Optional

from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="mqttd.transports.tls")

#: ``tlsMinimum=`` values -> Twisted's TLSVersion; nothing below 1.2 is offered
TLS_VERSIONS = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


class TLSConfigError(ValueError):
    """A TLS listener's files or options are unusable (message says which and why)."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise TLSConfigError(f"cannot read {what} {path!r}: {error.strerror or error}") from None


def load_certificates(path: str, what: str = "certificate file") -> list:
    """Every PEM certificate in ``path``, in file order, as ``cryptography.x509.Certificate``.

    These are what pyOpenSSL >= 24.3 wants for the listener's own certificate
    and chain (it deprecates its ``X509`` there); the CA store still takes
    ``X509`` (see :func:`as_pyopenssl`).

    :raises TLSConfigError: unreadable file, or no certificate in it.
    """
    from cryptography import x509

    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise TLSConfigError(f"no PEM certificate in {what} {path!r}: {error}") from None


def as_pyopenssl(certificates: list) -> list:
    """``cryptography`` certificates as ``OpenSSL.crypto.X509``, for the CA store only.

    ``X509Store.add_cert`` (what Twisted's ``caCerts`` feed) accepts nothing
    else and does not deprecate it; everything else gets the cryptography
    objects themselves.
    """
    from OpenSSL.crypto import X509

    return [X509.from_cryptography(c) for c in certificates]


def load_private_key(path: str):
    """The PEM private key (unencrypted) in ``path`` as a ``cryptography`` private key.

    :raises TLSConfigError: unreadable, encrypted or not a private key.
    """
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read(path, "private key")
    try:
        return load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise TLSConfigError(f"cannot load private key {path!r} (PEM, unencrypted): "
                             f"{error}") from None


@implementer(IOpenSSLServerConnectionCreator)
class TLSServerOptions:
    """The TLS settings of one listener, reloadable from their files.

    :param private_key: PEM file of the server's private key (unencrypted).
    :param certificate: PEM file of the server certificate, optionally followed
        by its intermediate CA certificates (a "fullchain" file); defaults to
        ``private_key`` (one file holding both).
    :param extra_chain: PEM file of more intermediate certificates to send.
    :param ca_certs: PEM file of the CAs that client certificates must chain
        to; without it no client certificate is asked for.
    :param require_certificate: refuse clients without a valid certificate
        (needs ``ca_certs``).
    :param minimum: lowest TLS version, ``"1.2"`` (default) or ``"1.3"``.
    :raises TLSConfigError: at construction if a file cannot be used, the key
        does not match the certificate, or options contradict each other.
    """

    def __init__(self, private_key: str, certificate: Optional[str] = None,
                 extra_chain: Optional[str] = None, ca_certs: Optional[str] = None,
                 require_certificate: bool = False, minimum: str = "1.2"):
        if minimum not in TLS_VERSIONS:
            raise TLSConfigError(f"tlsMinimum must be one of {sorted(TLS_VERSIONS)}, "
                                 f"not {minimum!r}")
        if require_certificate and not ca_certs:
            raise TLSConfigError("requireCert=yes needs caCerts=FILE (the CAs that "
                                 "client certificates must chain to)")
        self.private_key = private_key
        self.certificate = certificate or private_key
        self.extra_chain = extra_chain
        self.ca_certs = ca_certs
        self.require_certificate = require_certificate
        self.minimum = minimum
        #: number of successful loads (1 after construction)
        self.generation = 0
        self._options = None
        self._context = None
        self.reload()

    @property
    def client_certificates(self) -> str:
        """``"none"``, ``"optional"`` or ``"required"``."""
        if not self.ca_certs:
            return "none"
        return "required" if self.require_certificate else "optional"

    def _build(self) -> ssl.CertificateOptions:
        chain = load_certificates(self.certificate, "certificate file")
        if self.extra_chain:
            chain += load_certificates(self.extra_chain, "extraCertChain file")
        kwargs = {}
        if self.ca_certs:
            kwargs.update(verify=True,
                          caCerts=as_pyopenssl(load_certificates(self.ca_certs, "caCerts file")),
                          requireCertificate=self.require_certificate)
        options = ssl.CertificateOptions(
            privateKey=load_private_key(self.private_key), certificate=chain[0],
            extraCertChain=chain[1:], raiseMinimumTo=TLS_VERSIONS[self.minimum],
            enableSessions=False, **kwargs)
        try:
            options.getContext()  # checks that the key matches the certificate
        except Exception as error:
            raise TLSConfigError(f"private key {self.private_key!r} does not fit "
                                 f"certificate {self.certificate!r}: {error}") from None
        return options

    def reload(self) -> None:
        """Read every file again and use them for new connections.

        Established connections are not touched.  On any error the previous
        settings stay in force and :class:`TLSConfigError` is raised.
        """
        options = self._build()
        self._options, self._context = options, options.getContext()
        self.generation += 1
        if self.generation > 1:
            log.info("TLS certificate {certificate} reloaded (generation {generation})",
                     certificate=os.path.abspath(self.certificate),
                     generation=self.generation)

    # IOpenSSLServerConnectionCreator
    def serverConnectionForTLS(self, tlsProtocol):
        # what Twisted does for a context factory (CertificateOptions only has
        # serverConnectionForTLS itself since Twisted 26); the context is made
        # once per load and shared by the connections made from it
        from OpenSSL.SSL import Connection
        return Connection(self._context, None)


def certificate_identity(transport) -> Optional[str]:
    """The Common Name of the verified client certificate on ``transport``, or None.

    This is mosquitto's ``use_identity_as_username`` identity.  ``transport``
    is anything with ``getPeerCertificate()`` (a TLS transport, or the
    WebSocket adapter over one); no certificate, no Common Name, or a
    transport without TLS gives None.
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        certificate = get()
    except Exception:
        return None
    if certificate is None:
        return None
    from cryptography.x509.oid import NameOID

    if hasattr(certificate, "to_cryptography"):
        certificate = certificate.to_cryptography()
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) and value else None
