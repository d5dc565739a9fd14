"""Run ``twistd`` with mqttd imported from another checkout (bench/run --baseline REV).

    python mqttd-base.py DIR TWISTD-ARGS...

DIR holds the files of mqttd at REV (``git archive``); it goes first on sys.path, so
``mqttd`` and its twistd plugin come from there while Twisted and every other dependency
come from the running interpreter's environment.
"""
import sys

base = sys.argv[1]
sys.path.insert(0, base)
sys.argv = ["twistd"] + sys.argv[2:]

from twisted.scripts.twistd import run  # noqa: E402

import mqttd  # noqa: E402

if not mqttd.__file__.startswith(base):
    raise SystemExit(f"mqttd-base: mqttd imported from {mqttd.__file__}, not from {base}")
run()
