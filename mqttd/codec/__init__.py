"""The sans-IO MQTT codec (layer L0): bytes in, packet values out, and back.

No Twisted here.  ``PacketReader(level).feed(data) -> [packets]`` frames and
decodes; ``encode(packet, level) -> bytes`` writes; ``publish_template(...)``
encodes one PUBLISH once for many receivers.
"""
from .encoder import PublishTemplate, encode, publish_template
from .errors import (
    V5_TO_V3_CONNACK, ConnackV3, MalformedPacket, MQTTError, PacketTooLarge,
    ProtocolError, ReasonCode, TooManyTopicFilters, TooManyUserProperties,
    UnsupportedProtocolVersion,
)
from .packets import (
    AUTH, CONNACK, CONNECT, DISCONNECT, MQTT_3_1, MQTT_3_1_1, MQTT_5,
    NO_PROPERTIES, PACKET_CLASSES, PINGREQ, PINGRESP, PROTOCOL_NAMES, PUBACK,
    PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE,
    Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Properties, Puback,
    Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, Subscription, Unsuback,
    Unsubscribe, Will,
)
from .reader import MAX_PACKET_SIZE, PacketReader

__all__ = [
    # packets
    "Auth", "Connack", "Connect", "Disconnect", "Pingreq", "Pingresp",
    "Properties", "Puback", "Pubcomp", "Publish", "Pubrec", "Pubrel", "Suback",
    "Subscribe", "Subscription", "Unsuback", "Unsubscribe", "Will",
    "NO_PROPERTIES", "PACKET_CLASSES", "PROTOCOL_NAMES",
    "MQTT_3_1", "MQTT_3_1_1", "MQTT_5",
    "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
    "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP",
    "DISCONNECT", "AUTH",
    # errors
    "MQTTError", "MalformedPacket", "ProtocolError", "PacketTooLarge",
    "UnsupportedProtocolVersion", "TooManyTopicFilters", "TooManyUserProperties", "ReasonCode", "ConnackV3", "V5_TO_V3_CONNACK",
    # codec
    "PacketReader", "MAX_PACKET_SIZE", "encode", "publish_template", "PublishTemplate",
]
