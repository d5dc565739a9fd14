"""Minimal amqtt broker for bench/run (runs in bench/.peers/amqtt-venv).

usage: python amqtt-server.py --port P [--host 127.0.0.1] [--ready-file PATH]

Configuration: one TCP listener, anonymous auth only. The default config's packet/event
logging plugins and $SYS publisher are left out so that they do not cost throughput.
Persistence: amqtt keeps sessions in memory.
"""
import argparse
import asyncio
import json
import logging
import os
import signal

from amqtt.broker import Broker


async def main(args):
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{args.host}:{args.port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "listeners": [{"host": args.host, "port": args.port}]}, f)
        os.replace(tmp, args.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ready-file")
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(p.parse_args()))
