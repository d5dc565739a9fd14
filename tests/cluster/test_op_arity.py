"""The session-batch op table is one protocol in two languages: Python walks the op lists
it sends (store._marked, _only_forwards) with the same arities the Lua script reads them
with.  A new op added on one side only broke the walk (KeyError 'T' when two branches that
each added ops were merged)."""
from __future__ import annotations

import re

from mqttd.cluster import session_lua, store


def _lua_arity() -> dict:
    match = re.search(r"local arity = \{([^}]*)\}", session_lua.APPLY)
    assert match, "session_lua.APPLY has no arity table"
    return {name: int(count) for name, count in re.findall(r"(\w+)=(\d+)", match.group(1))}


def test_python_and_lua_agree_on_every_ops_arity():
    """Every op the Lua script knows, Python walks with the same number of arguments."""
    assert store._ARITY == _lua_arity()


def test_every_op_the_store_writes_can_be_walked():
    """An op list with every op (delta ops included) is walked to its end; the marks found."""
    items = []
    for op, count in store._ARITY.items():
        args = ["7/abc" if op == "I" else b"x"] * count
        items.extend([op] + args)
    assert store._marked(items) == [store.parse_inbound("7/abc")]
    assert store._only_forwards(items)
