"""Whether debug-level log lines are produced at all (``--log-level debug``).

``twistd`` writes every level it is given, so lines that would run once per
message (``published`` events, each dropped message) are only produced when
this switch is on; by default they cost nothing.
"""

enabled = False
#: callables run with the new value when it changes (e.g. the event log adds
#: or removes its per-message observers on a SIGHUP log-level reload)
_listeners: list = []


def set_enabled(flag: bool) -> None:
    global enabled
    flag = bool(flag)
    changed = flag != enabled
    enabled = flag
    if changed:
        for listener in list(_listeners):
            listener(flag)


def on_change(listener) -> callable:
    """Call ``listener(enabled)`` whenever the switch changes; returns an unregister."""
    _listeners.append(listener)

    def unregister():
        if listener in _listeners:
            _listeners.remove(listener)
    return unregister
