"""Transports: TLS listeners with client certificates, MQTT over WebSocket, PROXY protocol.

Everything here plugs into Twisted's endpoint strings (``mqtts:``, ``ws:``,
``wss:``; ``haproxy:`` is Twisted's own), so it works wherever an endpoint
string is accepted.  The broker core never imports this package; see
``docs/transports.rst``.
"""
from mqttd.transports.endpoints import MQTTServerEndpoint, tls_options_in
from mqttd.transports.tls import TLSConfigError, TLSServerOptions, certificate_identity

__all__ = ["MQTTServerEndpoint", "TLSConfigError", "TLSServerOptions",
           "certificate_identity", "tls_options_in"]
