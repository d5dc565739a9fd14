"""Redis key names of the cluster (one place; see docs/cluster.rst, "Key layout").

Every key of one node carries the hashtag ``{n:<node id>}`` and every key of
one session ``{c:<client id>}``, so each Lua script touches one Redis Cluster
slot.  Cluster-wide keys (the node set, the route feed) are single keys of
low traffic.
"""
from __future__ import annotations

import attrs


@attrs.frozen
class Keys:
    """Key names under ``prefix`` (default ``mqttd:``)."""

    prefix: str = "mqttd:"

    # --- nodes (mqttd.cluster.node) ---
    def nodes(self) -> str:
        """SET of the node ids that joined and were not reaped."""
        return f"{self.prefix}nodes"

    def alive(self, node: str) -> str:
        """STRING boot id, PX = the node TTL: the node's heartbeat."""
        return f"{self.prefix}{{n:{node}}}:alive"

    def info(self, node: str) -> str:
        """HASH boot, started (unix s), host, pid, version: what a node says about itself."""
        return f"{self.prefix}{{n:{node}}}:info"

    def reaper(self, node: str) -> str:
        """STRING the id of the node reaping ``node`` (``SET NX PX``; see the reaper)."""
        return f"{self.prefix}{{n:{node}}}:reaper"

    def stats(self, node: str) -> str:
        """HASH of the node's counters for the cluster-wide $SYS sums (PX = node TTL)."""
        return f"{self.prefix}{{n:{node}}}:stats"

    # --- routes (mqttd.cluster.routes) ---
    def routes(self, node: str) -> str:
        """SET of the node's routes: topic filters with local subscribers, shared
        subscriptions as ``$share/<group>/<filter>``."""
        return f"{self.prefix}{{n:{node}}}:routes"

    def route_version(self, node: str) -> str:
        """STRING integer, incremented by every change of the node's route set."""
        return f"{self.prefix}{{n:{node}}}:rver"

    def route_applied(self, node: str) -> str:
        """STRING: the id of the last route feed entry the node's route cache
        applied (its acknowledgement; a SUBACK elsewhere waits for it)."""
        return f"{self.prefix}{{n:{node}}}:rfpos"

    def route_feed(self) -> str:
        """STREAM of route changes of all nodes: node, version, op (+/-/reset), filter."""
        return f"{self.prefix}routefeed"

    # --- bus (mqttd.cluster.bus) ---
    def inbox(self, node: str) -> str:
        """STREAM of envelopes for the node (consumer group ``mqttd``)."""
        return f"{self.prefix}{{n:{node}}}:inbox"

    def qos2_seen(self, node: str) -> str:
        """ZSET of the QoS 2 instances the node took (``client\\0packet id\\0instance``
        -> Redis time in ms), for ``qos2_window``: each is added to its inbox once."""
        return f"{self.prefix}{{n:{node}}}:q2seen"

    def control(self, node: str) -> str:
        """STREAM of control messages for the node (kicks, ...)."""
        return f"{self.prefix}{{n:{node}}}:ctl"
