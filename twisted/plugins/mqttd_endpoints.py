# Endpoint-string parsers for mqttd's listeners: mqtts:, ws:, wss:.
# Lazy: mqttd.transports (and autobahn, pyOpenSSL) load only when one is used.
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _Parser:
    def __init__(self, prefix, function):
        self.prefix = prefix
        self._function = function

    def parseStreamServer(self, reactor, *args, **kwargs):
        from mqttd.transports import endpoints
        return getattr(endpoints, self._function)(reactor, *args, **kwargs)


mqtts = _Parser("mqtts", "parse_mqtts")
ws = _Parser("ws", "parse_ws")
wss = _Parser("wss", "parse_wss")
