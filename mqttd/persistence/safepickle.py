"""Pickling of store records with an allow-list on the way back in.

``loads`` refuses every global that is not one of the plain record classes
(:mod:`mqttd.persistence.records`, :class:`mqttd.messages.Message`,
:class:`mqttd.codec.packets.Properties`) or a harmless builtin container, so a
tampered or foreign pickle in a data directory cannot run code
(``os.system`` and friends raise :class:`pickle.UnpicklingError`).

``dumps`` writes protocol 5 and reduces the frozen attrs records to
``(cls, positional_args)`` with trailing default arguments left out.  That is
about a quarter of the size of attrs' default ``{name: value}`` state (a
``Message`` with default ``Properties`` is stored as ``Message(topic,
payload, qos)``) and loads about twice as fast.  Consequence for the format:
record fields may only be *appended* (with a default); any other change to a
record's shape bumps :data:`~mqttd.persistence.records.FORMAT_VERSION`.

Layer L3 (stdlib, attrs and the L0/L1 record classes only).
"""
from __future__ import annotations

import copyreg
import io
import operator
import pickle

import attrs

from mqttd.codec.packets import Properties
from mqttd.messages import Message
from mqttd.persistence import records

PROTOCOL = 5

#: classes rebuilt by calling them with their positional fields
_RECORD_CLASSES = (
    Message,
    Properties,
    records.SubscriptionRecord,
    records.SessionRecord,
    records.OutboundRecord,
    records.OutboundRef,
    records.WillRecord,
    records.StoredSession,
    records.StoredState,
) + tuple(records.OPERATION_TYPES)

_ALLOWED = {(cls.__module__, cls.__qualname__): cls for cls in _RECORD_CLASSES}
_ALLOWED[(records.OutboundStage.__module__, "OutboundStage")] = records.OutboundStage
for _builtin in (set, frozenset, bytearray):
    _ALLOWED[("builtins", _builtin.__name__)] = _builtin


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that only finds the allow-listed record classes."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: not an allowed record class"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _make_reducer(cls):
    # the constructor's arguments: a field the constructor does not take (a
    # cache such as Message's size) is not written
    fields = [f for f in attrs.fields(cls) if f.init]
    getter = operator.attrgetter(*(f.name for f in fields))
    # a trailing field may be left out when it equals a plain default
    defaults = [
        f.default if f.default is not attrs.NOTHING
        and not isinstance(f.default, attrs.Factory) else _NO_DEFAULT
        for f in fields
    ]
    count = len(fields)

    if count == 1:
        def reduce(obj):
            return cls, (getter(obj),)
        return reduce

    def reduce(obj):
        values = getter(obj)
        end = count
        while end:
            default = defaults[end - 1]
            value = values[end - 1]
            if default is _NO_DEFAULT or not (
                    value is default or (type(value) is type(default) and value == default)):
                break
            end -= 1
        return cls, values[:end]
    return reduce


_NO_DEFAULT = object()

_DISPATCH = dict(copyreg.dispatch_table)
for _cls in _RECORD_CLASSES:
    _DISPATCH[_cls] = _make_reducer(_cls)


def _reduce_stored_session(stored):
    # its public fields (``record`` built from the subscription deltas applied),
    # not the private ones
    return records.StoredSession, (stored.record, stored.outbound, stored.inbound_qos2)


_DISPATCH[records.StoredSession] = _reduce_stored_session


class _Pickler(pickle.Pickler):
    dispatch_table = _DISPATCH


def dumps(obj) -> bytes:
    """Pickle ``obj`` (records, ops, a StoredState, or containers of them)."""
    buffer = io.BytesIO()
    _Pickler(buffer, PROTOCOL).dump(obj)
    return buffer.getvalue()


def loads(data) -> object:
    """Unpickle ``data`` through the allow-list.

    Every failure (bad opcode, truncated data, refused class, a record
    constructor rejecting its arguments) is raised as
    :class:`pickle.UnpicklingError`.
    """
    try:
        return SafeUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError:
        raise
    except Exception as e:  # EOFError, ValueError, TypeError, IndexError, ...
        raise pickle.UnpicklingError(f"{type(e).__name__}: {e}") from e
