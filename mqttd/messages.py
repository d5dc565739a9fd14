"""The application message as the broker routes and stores it (layer L1)."""
from __future__ import annotations

from typing import Optional

import attrs

from mqttd.codec.packets import NO_PROPERTIES, Properties


@attrs.frozen(slots=True)
class Message:
    """One application message, independent of any connection.

    ``properties`` holds what is forwarded to subscribers unchanged (payload
    format indicator, content type, response topic, correlation data, user
    properties, message expiry).  A topic alias is per connection and never
    stored here; subscription identifiers are per subscriber: only the copy
    made for one subscriber (and queued or stored for it) carries them.
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
