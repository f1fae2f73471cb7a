"""Dialog snapshots as the store keeps them (DESIGN 8): one JSON codec, one CSeq reserve, and one
rule for when a snapshot is worth a store write.

The notifiers of ``watch_dialogs`` and the subscribers of ``presence_subscriptions`` are saved
the same way: the stored local CSeq runs ``CSEQ_RESERVE`` ahead of the one in use, so a request
costs a write only once per reserve, and after a crash the dialog continues above every CSeq it
used (RFC 3261 12.2.2: a UAS must accept a CSeq more than one higher than the last).
"""

from __future__ import annotations

import base64
import sys
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypeVar

from component.addresses import AddressBook
from component.ports import PresenceEvents
from component.sip.transactions import Sends
from component.store import JsonObject, StorePort
from sipside.notifier import NotifierSnapshot
from sipside.subscription import SubscriberSnapshot

__all__ = [
    "CSEQ_RESERVE",
    "TIME_SLACK",
    "DialogParts",
    "fresh",
    "needs_saving",
    "reserved",
    "shared",
    "snapshot_from_json",
    "snapshot_json",
]

CSEQ_RESERVE = 64
# Times that move by less than this are not worth a write (a NOTIFY's "expires" counts down in
# whole seconds, moving the refresh time a little each time; the refresh leaves well before).
TIME_SLACK = 5.0


@dataclass(frozen=True, slots=True)
class DialogParts:
    """What each presence dialog module works with: addresses, presence, sending, the store."""

    book: AddressBook
    events: PresenceEvents
    transactions: Sends
    store: StorePort


Snapshot = TypeVar("Snapshot", NotifierSnapshot, SubscriberSnapshot)

_FIELD_NAMES: dict[type[Any], tuple[str, ...]] = {
    kind: tuple(field.name for field in fields(kind))
    for kind in (NotifierSnapshot, SubscriberSnapshot)
}


# The fields whose values repeat across the dialogs of one process: our Contact, the event
# package, the state, the content type, and our own end's URI (the watched XMPP entity's SIP
# address for a notifier, the watching XMPP user's for a subscriber). Each is kept as one
# string object however many dialogs hold it (``shared``).
_SHARED_FIELDS: dict[type[Any], tuple[str, ...]] = {
    NotifierSnapshot: ("local_uri", "contact", "event", "state", "content_type"),
    SubscriberSnapshot: ("local_uri", "contact", "event", "state"),
}
# The Accept tuples of subscribers (our own few values): one tuple object per value.
_TUPLES: dict[tuple[str, ...], tuple[str, ...]] = {}
_MAX_TUPLES = 16


def _one_tuple(value: tuple[str, ...]) -> tuple[str, ...]:
    kept = _TUPLES.get(value)
    if kept is not None:
        return kept
    if len(_TUPLES) < _MAX_TUPLES:
        _TUPLES[value] = value = tuple(sys.intern(item) for item in value)
    return value


def shared(snap: Snapshot) -> Snapshot:
    """``snap`` with the values many dialogs repeat as one shared object each (``sys.intern``).

    Thousands of dialogs restored from the store, or saved, would otherwise each keep their own
    copy of the same Contact, event, state and URI strings (tracemalloc: about 300 bytes per
    subscription).
    """
    changes: dict[str, Any] = {}
    for name in _SHARED_FIELDS[type(snap)]:
        value = getattr(snap, name)
        if isinstance(value, str) and value is not (one := sys.intern(value)):
            changes[name] = one
    if isinstance(snap, SubscriberSnapshot) and snap.accept is not (
        accept := _one_tuple(snap.accept)
    ):
        changes["accept"] = accept
    return replace(snap, **changes) if changes else snap


def snapshot_json(snap: NotifierSnapshot | SubscriberSnapshot) -> JsonObject:
    """A snapshot as the store keeps it: bytes as base64, tuples as lists."""
    data: dict[str, Any] = asdict(snap)
    for name, value in data.items():
        if isinstance(value, bytes):
            data[name] = base64.b64encode(value).decode("ascii")
        elif isinstance(value, tuple):
            data[name] = list(value)
    return data


def fresh(text: str) -> str:
    """A copy of ``text`` in a new string object (CPython never copies a str otherwise).

    What a restart rebuilds from thousands of stored rows keeps copies, never the strings the
    rows were decoded into: the rows, their JSON and their columns are then freed whole, and
    the allocator gives their memory back to the system. Holding one string of each row
    instead pinned all of it (bench.presence resume of 13,000 rows in process: 3.3 KB of RSS
    per subscription with the rows' strings kept, 2.9 KB with copies).
    """
    return (text + " ")[:-1]


def snapshot_from_json(kind: type[Snapshot], data: JsonObject) -> Snapshot:
    """The snapshot ``snapshot_json`` wrote, holding none of ``data``'s own strings (``fresh``)
    and sharing the values dialogs repeat (``shared``); KeyError, TypeError or ValueError if
    unreadable."""
    values = dict(data)
    for field in fields(kind):
        value = values.get(field.name)
        if isinstance(value, list):
            values[field.name] = tuple(fresh(v) if isinstance(v, str) else v for v in value)
        elif field.name == "body" and isinstance(value, str):
            values[field.name] = base64.b64decode(value)
        elif isinstance(value, str):
            values[field.name] = fresh(value)
        elif isinstance(value, float):
            values[field.name] = value * 1.0  # a new float object, as for strings
    return shared(kind(**values))


def reserved(snap: Snapshot) -> Snapshot:
    """``snap`` as stored: its local CSeq ``CSEQ_RESERVE`` ahead, repeated values ``shared``."""
    return shared(replace(snap, local_cseq=snap.local_cseq + CSEQ_RESERVE))


def _moved(saved: float | None, now: float | None) -> bool:
    if saved is None or now is None:
        return saved is not now
    return abs(saved - now) > TIME_SLACK


def needs_saving(
    saved: Snapshot | None,
    snap: Snapshot,
    *,
    ignore: tuple[str, ...] = (),
    slack: tuple[str, ...] = (),
) -> bool:
    """True when ``snap`` differs from the stored ``saved`` in a field a restart needs.

    The local CSeq counts once it passes the stored reserve; fields in ``ignore`` never count
    (a restart rebuilds them), times in ``slack`` only once they move by more than TIME_SLACK.
    """
    if saved is None or snap.local_cseq > saved.local_cseq:
        return True
    if any(_moved(getattr(saved, name), getattr(snap, name)) for name in slack):
        return True
    skipped = ("local_cseq", *ignore, *slack)
    # Field by field, without building a copy: this runs for every NOTIFY sent.
    return any(
        getattr(saved, name) != getattr(snap, name)
        for name in _FIELD_NAMES[type(snap)]
        if name not in skipped
    )
