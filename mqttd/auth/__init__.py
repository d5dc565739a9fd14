"""Security for mqttd: authentication, authorization, enhanced authentication.

- :mod:`mqttd.auth.passwd` -- mosquitto password files and ``mqttd passwd``
- :mod:`mqttd.auth.checkers` -- ``twisted.cred`` checker for them, and the
  :class:`Authenticator` (anonymous policy + ``Portal``)
- :mod:`mqttd.auth.gate` -- bounded password hashing (:class:`VerificationGate`)
- :mod:`mqttd.auth.acl` -- mosquitto ACL files and :class:`ACLAuthorizer`
- :mod:`mqttd.auth.scram` -- MQTT 5 enhanced authentication, SCRAM-SHA-256
- :mod:`mqttd.auth.setup` -- composing them from options (``twistd mqttd``)

The broker core knows none of this: it calls the hooks of
:mod:`mqttd.interfaces` (``IAuthenticator``, ``IAuthorizer``,
``IEnhancedAuthenticator``).  See docs/security.rst.
"""
from mqttd.auth.acl import ACL, ACLAuthorizer, ACLFileError, parse_acl, read_acl_file
from mqttd.auth.checkers import Authenticator, PasswordFileChecker, make_portal
from mqttd.auth.gate import VerificationBusy, VerificationGate
from mqttd.auth.passwd import PasswordFileError, read_password_file
from mqttd.auth.scram import EnhancedAuthenticator, scram_mechanism
from mqttd.auth.setup import Security, anonymous_policy, configure

__all__ = [
    "ACL", "ACLAuthorizer", "ACLFileError", "Authenticator", "EnhancedAuthenticator",
    "PasswordFileChecker", "PasswordFileError", "Security", "anonymous_policy",
    "configure", "make_portal", "parse_acl", "read_acl_file", "read_password_file",
    "scram_mechanism", "VerificationBusy", "VerificationGate",
]
