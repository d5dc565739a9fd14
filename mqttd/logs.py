"""``--log-format text|json`` and ``--log-level``: the log observer of ``twistd mqttd``.

:func:`make_observer` builds one ``twisted.logger`` observer: text lines
(``textFileLogObserver``) or one JSON object per line (``jsonFileLogObserver``,
readable back with ``twisted.logger.eventsFromJSONLogFile``), behind a level
filter whose level :class:`LogSettings` can change at run time (SIGHUP reload).
``--log-level debug`` also switches on the per-message debug lines
(:mod:`mqttd.debuglog`), which cost nothing otherwise.

Every field of a line is bounded (:func:`bound_fields`): client ids, user
names, topics, details... are what clients send, up to 64 KiB each, and the
log rate limiter bounds lines, not bytes; a text field over
:data:`FIELD_LIMIT` characters is cut there and says how long it was
(``000123XXXX...(60000 chars)``), in text and JSON alike.  In text lines (a
file, stdout, syslog) a field's control characters are escaped too
(:func:`escape_controls`: ``\r``, ``\n``, ``\x1b``...): MQTT allows them in
client ids and topics (MQTT 5.0 §1.5.4: a SHOULD NOT, so a broker cannot
refuse them), so a client could otherwise forge a log line or move an
operator's terminal cursor; JSON escapes them by construction.

Every observer mqttd installs goes through :class:`BoundedObserver`: the
file/stdout observer (:func:`make_observer`) and, under ``twistd --syslog``,
the syslog observer (:func:`make_syslog_observer`) that replaces twistd's own.
"""
from __future__ import annotations

import re
from typing import IO

from twisted.logger import (
    FileLogObserver, FilteringLogObserver, LegacyLogObserverWrapper, LogLevel,
    LogLevelFilterPredicate, formatEventAsClassicLogText, formatTime, jsonFileLogObserver)

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


#: the most characters a text field of a log line shows (REVIEW-SEC2 N12)
FIELD_LIMIT = 256


def bound(value, limit: int = FIELD_LIMIT):
    """``value`` cut to ``limit`` characters plus ``...(N chars)`` if it is a
    longer ``str``; anything else unchanged."""
    if value.__class__ is str and len(value) > limit:
        return f"{value[:limit]}...({len(value)} chars)"
    return value


#: C0 controls, DEL and C1 controls: what a text line shows escaped
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match) -> str:
    char = match.group()
    return _ESCAPES.get(char) or f"\\x{ord(char):02x}"


def escape_controls(value: str) -> str:
    """``value`` with its C0/C1 control characters and DEL written as escapes
    (``\\r``, ``\\n``, ``\\t``, ``\\x1b``...), as ``repr`` shows them; printable
    text (the common case) is returned as it is, after one C-speed check."""
    if value.isprintable():
        return value
    return _CONTROLS.sub(_escape, value)


def bound_fields(event: dict, escape: bool = False) -> dict:
    """``event`` with every text field longer than :data:`FIELD_LIMIT` cut by
    :func:`bound` and, with ``escape`` (text lines), its control characters
    escaped by :func:`escape_controls` (a copy; the same dict when no field
    needs either).  Twisted's own ``log_*`` keys are left alone."""
    bounded = None
    for key, value in event.items():
        if value.__class__ is not str:
            continue
        if len(value) > FIELD_LIMIT:
            if key.startswith("log_"):
                continue
            value = bound(value)
        elif not escape or value.isprintable() or key.startswith("log_"):
            continue
        if escape:
            value = escape_controls(value)
        if bounded is None:
            bounded = dict(event)
        bounded[key] = value
    return event if bounded is None else bounded


class BoundedObserver:
    """An ``ILogObserver`` passing each event through :func:`bound_fields` to
    ``observer`` (embedders wrap their own observer in it); ``escape=True`` for
    an observer that writes text lines (the fields' control characters escaped)."""

    def __init__(self, observer, escape: bool = False):
        self.observer = observer
        self.escape = escape

    def __call__(self, event: dict) -> None:
        self.observer(bound_fields(event, self.escape))


def make_observer(stream: IO[str], fmt: str = "text", settings: LogSettings = None):
    """An ``ILogObserver`` writing to ``stream`` in ``fmt``, filtered by
    ``settings``, every field bounded (:class:`BoundedObserver`; text lines
    also escape the fields' control characters)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    settings = settings or LogSettings()
    if fmt == "json":
        inner = BoundedObserver(jsonFileLogObserver(stream))
    else:
        inner = BoundedObserver(text_observer(stream), escape=True)
    return FilteringLogObserver(inner, [settings.predicate])


def make_syslog_observer(prefix: str = "mqttd", settings: LogSettings = None,
                         syslog_observer=None):
    """The ``ILogObserver`` for ``twistd --syslog``: twistd's own syslog
    observer (``twisted.python.syslog.SyslogObserver(prefix)``, one syslog
    message per line of text) behind the same level filter and field bound as
    :func:`make_observer`, fields' control characters escaped (a client id with
    a newline would otherwise be two syslog messages), each line
    ``[namespace] message``.  ``syslog_observer``: a
    legacy observer to use instead (tests)."""
    settings = settings or LogSettings()
    if syslog_observer is None:
        from twisted.python.syslog import SyslogObserver
        syslog_observer = SyslogObserver(prefix).emit
    legacy = LegacyLogObserverWrapper(syslog_observer)

    def with_namespace(event: dict) -> None:
        # a syslog line shows ``[system]``: the namespace, as text lines show it
        # (twistd's own syslog lines said ``[-]``)
        if "log_system" not in event:
            event = dict(event, log_system=event.get("log_namespace", "-"))
        legacy(event)
    return FilteringLogObserver(BoundedObserver(with_namespace, escape=True),
                                [settings.predicate])


class _SecondClock:
    """``formatTime`` for whole-second timestamps, formatted once per second.

    Twisted's ``formatTime`` works out the local UTC offset through two
    ``datetime`` conversions per line: with a line per connect and disconnect
    that was half the time of a connection on PyPy (bench/run connect_storm)."""

    def __init__(self):
        self.second = self.text = None

    def __call__(self, when) -> str:
        second = None if when is None else int(when // 1)
        if second != self.second or self.text is None:
            self.text = formatTime(second)
            self.second = second
        return self.text


def _text_line(event, clock: _SecondClock):
    """``formatEventAsClassicLogText(event)``, the common case made cheap: a plain
    ``log_format`` of named fields is filled by ``str.format_map`` (C) instead
    of ``string.Formatter`` (Python); anything else (a failure, a flattened event,
    ``{f()}`` calls, a missing field, ``log_system``) takes Twisted's own path."""
    fmt = event.get("log_format")
    if (fmt.__class__ is not str or "log_failure" in event or "log_flattened" in event
            or "log_system" in event):
        return formatEventAsClassicLogText(event, formatTime=clock)
    try:
        text = fmt.format_map(event)
    except Exception:
        return formatEventAsClassicLogText(event, formatTime=clock)
    if not text:
        return None
    level = event.get("log_level")
    line = (f"{clock(event.get('log_time'))} [{event.get('log_namespace', '-')}"
            f"#{'-' if level is None else level.name}] {text}")
    return line.replace("\n", "\n\t") + "\n"


def text_observer(stream: IO[str]) -> FileLogObserver:
    """Twisted's ``textFileLogObserver(stream)`` (same lines, byte for byte:
    RFC 3339 time to the second, ``[namespace#level]``, the message), made
    cheaper for a line per connect and per disconnect: the timestamp formatted
    once per second, plain messages filled by ``str.format_map``."""
    clock = _SecondClock()
    return FileLogObserver(stream, lambda event: _text_line(event, clock))
