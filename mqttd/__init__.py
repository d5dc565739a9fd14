"""mqttd: an MQTT broker on Twisted."""

__version__ = "0.1.0"
