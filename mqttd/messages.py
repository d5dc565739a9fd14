"""The application message as the broker routes and stores it (layer L1)."""
from __future__ import annotations

from typing import Optional

import attrs

from mqttd.codec.packets import NO_PROPERTIES, Properties

#: ``Message.origin`` of the broker's own ``$SYS`` publications: not counted in
#: the message and byte statistics.  Client ids cannot contain U+0000
#: [MQTT-1.5.4-2], so no client can be mistaken for it.
SYS_ORIGIN = "\x00$SYS"


@attrs.frozen(slots=True)
class Message:
    """One application message, independent of any connection.

    ``properties`` holds what is forwarded to subscribers unchanged (payload
    format indicator, content type, response topic, correlation data, user
    properties, message expiry); per-connection properties such as a topic
    alias or subscription identifiers are never stored here.
    """

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPERTIES
    #: client id of the publisher (for no-local); ``None`` for internal messages
    origin: Optional[str] = None
    #: absolute time (the broker clock's ``seconds()``) after which the message
    #: is no longer delivered; ``None`` means it never expires
    expires_at: Optional[float] = None
