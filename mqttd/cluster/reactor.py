"""The asyncio reactor that ``--cluster`` needs (``redis.asyncio`` runs on it)."""
from __future__ import annotations

import sys

ASYNCIO_HINT = ("--cluster needs Twisted's asyncio reactor, but another reactor is already "
                "installed; use twistd --reactor=asyncio")


def asyncio_reactor_installed() -> bool:
    """True if the installed reactor is Twisted's ``AsyncioSelectorReactor``."""
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None:
        return False
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor
    return isinstance(reactor, AsyncioSelectorReactor)


def require_asyncio_reactor(exit_status: int = 2) -> None:
    """Install the asyncio reactor if no reactor is installed yet.

    :raises SystemExit: ``exit_status`` after one line on stderr when another
        reactor is already installed (``twistd --reactor=asyncio`` fixes it).
    """
    if "twisted.internet.reactor" in sys.modules:
        if asyncio_reactor_installed():
            return
        print(f"mqttd: error: {ASYNCIO_HINT}", file=sys.stderr)
        raise SystemExit(exit_status)
    import asyncio

    from twisted.internet import asyncioreactor
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
