"""Whether debug-level log lines are produced at all (``--log-level debug``).

``twistd`` writes every level it is given, so lines that would run once per
message (``published`` events, each dropped message) are only produced when
this switch is on; by default they cost nothing.
"""

enabled = False


def set_enabled(flag: bool) -> None:
    global enabled
    enabled = bool(flag)
