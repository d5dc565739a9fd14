"""mqttd: an MQTT 3.1 / 3.1.1 / 5.0 broker on Twisted.

The public API (pinned by ``tests/test_public_api.py``):

- :class:`Broker`, :class:`BrokerConfig`, :class:`ClientInfo`, :data:`EVENTS` —
  the broker core, its limits, and the mosca-named events;
- :class:`ClientSummary`, :class:`SubscriptionSummary` — what ``Broker.clients()``
  lists (a copy of each session's state);
- :func:`store_from_spec` — a store from ``memory``, ``file:PATH`` or ``dbm:PATH``;
- :class:`Message` — an application message;
- :class:`MQTTFactory` — listen with it on any Twisted server endpoint;
- :class:`BrokerService`, :func:`make_broker_service` — the broker with its
  store and listeners as a Twisted service (what ``twistd mqttd`` runs);
- :class:`Properties`, :class:`ReasonCode`, :class:`MQTTError`.
"""

__version__ = "0.1.0"

from mqttd.broker import EVENTS, Broker, BrokerConfig, ClientInfo  # noqa: E402
from mqttd.clients import ClientSummary, SubscriptionSummary  # noqa: E402
from mqttd.codec.errors import MQTTError, ReasonCode  # noqa: E402
from mqttd.codec.packets import Properties  # noqa: E402
from mqttd.messages import Message  # noqa: E402
from mqttd.protocol import MQTTFactory  # noqa: E402
from mqttd.persistence import store_from_spec  # noqa: E402
from mqttd.service import BrokerService, make_broker_service  # noqa: E402

__all__ = [
    "EVENTS", "Broker", "BrokerConfig", "BrokerService", "ClientInfo", "ClientSummary",
    "MQTTError", "SubscriptionSummary", "store_from_spec",
    "MQTTFactory", "Message", "Properties", "ReasonCode", "make_broker_service",
    "__version__",
]
