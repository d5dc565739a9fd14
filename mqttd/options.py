"""Typed, validated option definitions for ``twistd mqttd`` (layer L6 helper).

Every option of the broker is ONE :class:`Option` entry in
:data:`mqttd.tap.OPTIONS`: its name (also the TOML key, ``-`` or ``_``), how
a value is parsed and checked (:func:`integer`, :func:`number`,
:func:`choice`, :func:`text`, :func:`endpoint`, :func:`flag`), the
documented default (checked against the README options table by
``tests/test_tap.py``) and, for the broker core's limits, the
:class:`~mqttd.broker.BrokerConfig` field it sets (whose attrs validators
check the range once more, so an embedder gets the same errors).

A bad value raises :class:`ConfigError` whose message is one line naming the
option: ``--max-inflight: must be at least 1, got 0``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import attrs
from twisted.python import usage


class ConfigError(usage.UsageError):
    """An option or config-file value is wrong; the message is one line."""


#: a parser takes the raw value (a str from the command line, or any TOML
#: value) and returns the checked value or raises ValueError(one line)
Parser = Callable[[Any], Any]


def _describe(value) -> str:
    return repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def integer(minimum: Optional[int] = None, maximum: Optional[int] = None) -> Parser:
    """An integer in ``[minimum, maximum]``; a float or a bool is refused, not rounded."""
    def parse(value):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"expected an integer, got {_describe(value)}")
        if isinstance(value, str):
            try:
                value = int(value.strip().replace("_", ""), 10)
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
        _check_range(value, minimum, maximum)
        return value
    parse.kind = "integer"
    return parse


def number(minimum: Optional[float] = None, maximum: Optional[float] = None,
           above: Optional[float] = None) -> Parser:
    """A finite number (int or float) in range; ``above`` is an exclusive minimum."""
    def parse(value):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected a number, got {_describe(value)}")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        if above is not None and value <= above:
            raise ValueError(f"must be greater than {above:g}, got {value:g}")
        _check_range(value, minimum, maximum)
        return value
    parse.kind = "number"
    return parse


def _check_range(value, minimum, maximum) -> None:
    if minimum is not None and value < minimum:
        raise ValueError(f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be at most {maximum}, got {value}")


def choice(*values: str) -> Parser:
    """One of ``values`` (case-sensitive)."""
    def parse(value):
        if value not in values:
            raise ValueError(f"must be one of {', '.join(values)}; got {_describe(value)}")
        return value
    parse.kind = "choice"
    parse.values = values
    return parse


def text(check: Optional[Callable[[str], None]] = None) -> Parser:
    """A non-empty string; ``check(value)`` may raise ValueError for more rules."""
    def parse(value):
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {_describe(value)}")
        if not value:
            raise ValueError("must not be empty")
        if check is not None:
            check(value)
        return value
    parse.kind = "text"
    return parse


def endpoint_keys(description: str) -> list:
    """The ``key=value`` keys of an endpoint string in order, repeats included
    (Twisted's own tokenizer: ``\\:`` escapes a colon)."""
    from twisted.internet.endpoints import _STRING, _tokenize
    keys, sofar = [], ()
    for kind, token in _tokenize(description):
        if kind is _STRING:
            sofar += (token,)
        elif token == ":":
            if len(sofar) > 1:
                keys.append(sofar[0])
            sofar = ()
    if len(sofar) > 1:
        keys.append(sofar[0])
    return keys


def endpoint_parts(description: str):
    """``(args, options)`` of an endpoint string exactly as ``serverFromString``
    reads it -- for a repeated ``key=`` the *last* value.  Every decision
    about a listener (loopback or not, its interface) must be made on this,
    never on a first match in the text (REVIEW-SEC S3)."""
    from twisted.internet.endpoints import _parse
    return _parse(description)


def endpoint(value):
    """A Twisted server endpoint string, parsed (not listened on) to check it.

    A repeated option (``tcp:1883:interface=127.0.0.1:interface=0.0.0.0``) is
    refused: Twisted silently takes the last value, which an operator who
    appended one to a template does not expect."""
    value = text()(value)
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor
    keys = endpoint_keys(value)
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"{value!r} gives {', '.join(k + '=' for k in repeated)} more than "
                         "once (Twisted would use the last one); give each option once")
    try:
        serverFromString(MemoryReactor(), value)
    except Exception as error:  # ValueError, KeyError, OSError (TLS files)...
        raise ValueError(f"not a valid server endpoint {value!r}: "
                         f"{error.__class__.__name__}: {error}") from None
    return value


endpoint.kind = "endpoint"


#: mosquitto's duration units (``persistent_client_expiration``): hour, day,
#: week, month (30 days), year (365 days); ``s`` (seconds) is our addition
DURATION_UNITS = {"s": 1, "h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400,
                  "y": 365 * 86400}


def duration(value) -> float:
    """Seconds in a mosquitto duration such as ``1h``, ``2d``, ``3w``, ``1m``, ``1y``.

    A positive integer followed by one unit of :data:`DURATION_UNITS`;
    anything else raises ValueError.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as 2d, got {_describe(value)}")
    text_value = value.strip()
    number_part, unit = text_value[:-1], text_value[-1:].lower()
    if unit not in DURATION_UNITS or not number_part.isdigit() or int(number_part) <= 0:
        raise ValueError(f"{value!r} is not a duration: a positive integer followed by "
                         f"one of {', '.join(DURATION_UNITS)} (e.g. 1h, 2d, 3w, 1m, 1y)")
    return float(int(number_part) * DURATION_UNITS[unit])


duration.kind = "duration"


def flag(value):
    """A switch: only ``true``/``false`` in a file (present/absent on the command line)."""
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


flag.kind = "flag"


def boolean(value):
    """An option with a true/false value (mosquitto style ``retain_available false``):
    ``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0``, or a TOML boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0"):
            return False
    raise ValueError(f"expected true or false, got {_describe(value)}")


boolean.kind = "boolean"


def hide_all(value) -> str:
    """Redaction for a value that is a secret as a whole (a token)."""
    return "***"


def hide_after_kind(value) -> str:
    """Redaction for ``KIND:ARGS`` values whose arguments may hold passwords
    (``memory:USER:PASS``): the kind stays readable, the rest is ``***``."""
    kind, sep, _rest = str(value).partition(":")
    return f"{kind}:***" if sep else kind


@attrs.frozen
class Option:
    """One option of ``twistd mqttd``: command line, TOML key and validation.

    :param name: long option name and TOML key (``max-inflight`` /
        ``max_inflight``).
    :param parse: checks and converts a value (see the parsers above).
    :param help: the ``--help`` text (one sentence, no default in it).
    :param default: the effective default, shown in ``--help`` and the README
        table; ``None`` means unset (``doc_default`` says what that means).
    :param field: the :class:`~mqttd.broker.BrokerConfig` field it sets.
    :param repeatable: may be given several times (a list in TOML).
    :param redact: for an option whose value holds a secret, how
        ``--check-config`` shows one value (e.g. :func:`hide_all`); None: as is.
    """

    name: str
    parse: Parser
    help: str
    default: Any = None
    short: Optional[str] = None
    field: Optional[str] = None
    repeatable: bool = False
    doc_default: Optional[str] = None
    metavar: Optional[str] = None
    redact: Optional[Callable[[Any], str]] = None

    def shown(self, value):
        """``value`` as ``--check-config`` may print it: secrets replaced by ``***``."""
        if self.redact is None or value is None:
            return value
        if isinstance(value, list):
            return [self.redact(v) for v in value]
        return self.redact(value)

    @property
    def is_flag(self) -> bool:
        return self.parse is flag

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    def documented_default(self) -> str:
        """The README table's default cell for this option."""
        if self.doc_default is not None:
            return self.doc_default
        if self.is_flag:
            return "off"
        if self.default is None:
            return ".."
        value = self.default
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        return f"``{value}``"

    def check(self, value):
        """The checked value; ConfigError(``--name: why``) if it is wrong."""
        try:
            if self.repeatable:
                values = value if isinstance(value, list) else [value]
                return [self.parse(v) for v in values]
            return self.parse(value)
        except ValueError as error:
            raise ConfigError(f"--{self.name}: {error}") from None
