"""Bridges: connect this broker to other MQTT brokers (mosquitto-compatible).

- :mod:`mqttd.bridge.config` -- ``[[bridge]]`` tables / mosquitto directives as
  validated :class:`BridgeConfig` values;
- :mod:`mqttd.bridge.mosquitto` -- ``mqttd bridge import mosquitto.conf``;
- :mod:`mqttd.bridge.runtime` -- one bridge: the persistent local session and
  the reconnecting client to the remote;
- :mod:`mqttd.bridge.mesh` -- the loop/duplicate guard for meshes;
- :mod:`mqttd.bridge.service` -- all bridges of a broker, stats, reload.

See docs/bridge.rst.
"""
from mqttd.bridge.config import BridgeConfig, BridgeConfigError, TopicMap

__all__ = ["BridgeConfig", "BridgeConfigError", "TopicMap"]
