import pytest

from .certs import PKI


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA, a second untrusted CA, server and client certificates (made once per run)."""
    return PKI(tmp_path_factory.mktemp("pki"))
