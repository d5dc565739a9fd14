"""Many mqttd nodes acting as one broker, with Redis as the shared engine.

The core (``broker``, ``connection``, ``session``) never imports this
package: the cluster plugs into the core's seams (the remote router, the
session claim, the store, the retained store).  Layout:

- :mod:`mqttd.cluster.backend` — the only module that talks to Redis
  (``redis.asyncio`` on Twisted's asyncio reactor; coroutines become
  Deferreds); URL parsing for standalone Redis, Sentinel and Redis Cluster.
- :mod:`mqttd.cluster.node` — node identity, heartbeat, liveness of the
  others, self-fencing when Redis is out of reach.
- :mod:`mqttd.cluster.routes` — each node's route set, the route feed and
  the in-memory cache of filter -> nodes.
- :mod:`mqttd.cluster.bus` — envelopes, per-node inbox streams, delivery
  into the local broker.
- :mod:`mqttd.cluster.service` — ``ClusterService``, wiring under
  ``twistd mqttd --cluster URL``.
- :mod:`mqttd.cluster.retained` — retained messages in Redis with a
  per-level index (wildcard SUBSCRIBE costs O(matching retained)).
- :mod:`mqttd.cluster.workers` — ``--workers N``: N cluster nodes on one
  machine sharing the listening ports, under one supervisor.

See docs/cluster.rst.
"""
