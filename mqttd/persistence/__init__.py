"""Durable state: plain records (``records``) and the store backends."""
from __future__ import annotations


def store_from_spec(spec: str, reactor, **options):
    """Build the store named by ``spec``: ``memory``, ``file:PATH`` or ``dbm:PATH``.

    ``options`` go to the store's constructor (``fsync="always"|"never"|
    "interval:N"``, ``compact_bytes``...); the memory store ignores them.
    The store is returned unopened.  Raises ValueError for an unknown spec.
    """
    kind, sep, path = spec.partition(":")
    if kind == "memory" and not sep:
        from mqttd.persistence.memory import MemoryStore
        return MemoryStore(reactor, **options)
    if kind in ("file", "dbm") and sep and path:
        if kind == "file":
            from mqttd.persistence.filestore import FileStore as store_class
        else:
            from mqttd.persistence.dbmstore import DbmStore as store_class
        return store_class(path, reactor, **options)
    raise ValueError(
        f"unknown persistence spec {spec!r}: expected 'memory', 'file:PATH' or 'dbm:PATH'")
