"""Membership decisions are never answered by a replica.

After a Sentinel failover a connection can be left on the demoted primary, now
a replica with a stale data set.  The heartbeat script's "my key is gone" branch
only reads: run there, it answered 0 and the node gave up its membership
although it was alive on the new primary (the Sentinel test failed 1 run in 4).
The membership scripts and the reaper's lock carry a ``#!lua`` shebang: a replica
refuses them (READONLY) before running them, so the call fails and is retried.
"""
from __future__ import annotations

import time

import pytest

from mqttd.cluster.backend import Backend, BackendError
from mqttd.cluster.keys import Keys
from mqttd.cluster.node import BEAT, JOIN, LEAVE
from mqttd.cluster.reaper import LOCK

from .conftest import wait
from .redisproc import RedisServer

pytestmark = pytest.mark.slow


def test_membership_scripts_are_refused_by_a_replica(redis_server, tmp_path, aio):
    """Heartbeat, join, leave and the reaper's lock fail on a replica instead of
    answering from its data; on the primary they work."""
    replica = RedisServer(tmp_path / "replica", extra_args=[
        "--replicaof", "127.0.0.1", str(redis_server.port)]).start()
    try:
        deadline = time.monotonic() + 20
        while "master_link_status:up" not in replica.cli("INFO", "replication"):
            assert time.monotonic() < deadline, "replica not in sync"
            time.sleep(0.05)
        keys = Keys()

        async def run():
            on_replica = Backend(replica.url)
            on_primary = Backend(redis_server.url)
            for backend in (on_replica, on_primary):
                for name, source in (("beat", BEAT), ("join", JOIN), ("leave", LEAVE),
                                     ("lock", LOCK)):
                    backend.register(name, source)
            calls = [("beat", [keys.alive("r1")], ["boot", 5000]),
                     ("join", [keys.alive("r1"), keys.info("r1"), keys.reaper("r1")],
                      ["boot", 5000, 0, "h", 1]),
                     ("leave", [keys.alive("r1")], ["boot"]),
                     ("lock", [keys.reaper("r2"), keys.alive("r2")], ["me", 5000])]
            for name, k, a in calls:
                with pytest.raises(BackendError, match="(?i)read.?only|slave|replica"):
                    await wait(on_replica.run(name, k, a))
            # the same calls on the primary: a missing key is a real answer there
            assert await wait(on_primary.run("beat", [keys.alive("r1")], ["boot", 5000])) == 0
            assert (await wait(on_primary.run("lock", [keys.reaper("r2"), keys.alive("r2")],
                                              ["me", 5000])))[0] == 1
            await wait(on_replica.close())
            await wait(on_primary.close())
        aio(run)
    finally:
        replica.stop()
