#!/usr/bin/env python
"""Embedding mqttd in an existing Twisted program.

The program below is an ordinary Twisted application that already has its own
work (here: a clock that ticks every second).  It adds an MQTT broker by
listening with ``MQTTFactory`` on an endpoint of its choice, publishes its
ticks in-process, and reacts in-process to messages that MQTT clients send.

Run it, then talk to it with any client::

    python examples/embed.py --listen tcp:1883
    mosquitto_sub -t 'example/ticks'
    mosquitto_pub -t 'example/commands' -m 'hello'
"""
import argparse
import sys

from twisted.internet import defer, task
from twisted.internet.endpoints import serverFromString

from mqttd import Broker, BrokerConfig, MQTTFactory


async def main(reactor, listen: str, duration: float):
    # 1. one broker core for the whole process (memory store: nothing on disk)
    broker = Broker(reactor, config=BrokerConfig(broker_id="embedded"))

    # 2. listen wherever the application wants, with Twisted endpoints
    port = await serverFromString(reactor, listen).listen(MQTTFactory(broker))
    print(f"listening on {port.getHost().port}", flush=True)

    # 3. in-process subscriber: the application reacts to MQTT clients
    def on_command(message):
        print(f"command received: {message.payload.decode()}", flush=True)
    broker.subscribe_local("example/commands", on_command)

    # 4. the application's own work publishes in-process
    ticks = iter(range(1, 10 ** 9))
    loop = task.LoopingCall(
        lambda: broker.publish_message("example/ticks", str(next(ticks)).encode()))
    loop.clock = reactor
    loop.start(1.0)

    await task.deferLater(reactor, duration)
    loop.stop()
    broker.shutdown()
    await port.stopListening()


def run(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="tcp:1883:interface=127.0.0.1")
    parser.add_argument("--duration", type=float, default=3600.0)
    args = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(
        main(reactor, args.listen, args.duration)))


if __name__ == "__main__":
    run(sys.argv[1:])
