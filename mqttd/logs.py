"""``--log-format text|json`` and ``--log-level``: the log observer of ``twistd mqttd``.

:func:`make_observer` builds one ``twisted.logger`` observer: text lines
(``textFileLogObserver``) or one JSON object per line (``jsonFileLogObserver``,
readable back with ``twisted.logger.eventsFromJSONLogFile``), behind a level
filter whose level :class:`LogSettings` can change at run time (SIGHUP reload).
``--log-level debug`` also switches on the per-message debug lines
(:mod:`mqttd.debuglog`), which cost nothing otherwise.
"""
from __future__ import annotations

from typing import IO

from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate, jsonFileLogObserver,
    textFileLogObserver)

from mqttd import debuglog

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error}
FORMATS = ("text", "json")


class LogSettings:
    """The level filter of mqttd's observer; :meth:`set_level` applies at once."""

    def __init__(self, level: str = "info"):
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
        self.level = level
        self.set_level(level)

    def set_level(self, level: str) -> None:
        """Log ``level`` and above from now on (``debug``, ``info``, ``warn``, ``error``).

        Raises ValueError for another name."""
        if level not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
        self.level = level
        self.predicate.setLogLevelForNamespace("", LEVELS[level])
        debuglog.set_enabled(level == "debug")


def make_observer(stream: IO[str], fmt: str = "text", settings: LogSettings = None):
    """An ``ILogObserver`` writing to ``stream`` in ``fmt``, filtered by ``settings``."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    settings = settings or LogSettings()
    inner = jsonFileLogObserver(stream) if fmt == "json" else textFileLogObserver(stream)
    return FilteringLogObserver(inner, [settings.predicate])
