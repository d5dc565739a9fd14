"""Operating mqttd: Prometheus metrics, the admin HTTP API, the "why" explainer,
the live dashboard (layer L4 feature package; see docs/admin.rst).

- :mod:`mqttd.admin.ring`: per-client ring of recent drops and refusals;
- :mod:`mqttd.admin.why`: "why didn't my message arrive?" from live state;
- :mod:`mqttd.admin.metrics`: a lazy Prometheus collector over broker state;
- :mod:`mqttd.admin.api`: the JSON API and the dashboard (``twisted.web``);
- :mod:`mqttd.admin.service`: ``--metrics-listen``/``--admin-listen`` wiring;
- :mod:`mqttd.admin.cli`: ``mqttd why CLIENT TOPIC``.

The broker core never imports this package: it reads broker state (read-only
views) and plugs into ``Broker.on_incident`` and ``Broker.observe``.
"""
