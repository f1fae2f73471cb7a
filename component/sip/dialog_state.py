"""Dialog snapshots as the store keeps them (DESIGN 8): one JSON codec, one CSeq reserve, and one
rule for when a snapshot is worth a store write.

The notifiers of ``watch_dialogs`` and the subscribers of ``presence_subscriptions`` are saved
the same way: the stored local CSeq runs ``CSEQ_RESERVE`` ahead of the one in use, so a request
costs a write only once per reserve, and after a crash the dialog continues above every CSeq it
used (RFC 3261 12.2.2: a UAS must accept a CSeq more than one higher than the last).
"""

from __future__ import annotations

import base64
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
    "needs_saving",
    "reserved",
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


def snapshot_json(snap: NotifierSnapshot | SubscriberSnapshot) -> JsonObject:
    """A snapshot as the store keeps it: bytes as base64, tuples as lists."""
    data: dict[str, Any] = asdict(snap)
    for name, value in data.items():
        if isinstance(value, bytes):
            data[name] = base64.b64encode(value).decode("ascii")
        elif isinstance(value, tuple):
            data[name] = list(value)
    return data


def snapshot_from_json(kind: type[Snapshot], data: JsonObject) -> Snapshot:
    """The snapshot ``snapshot_json`` wrote; KeyError, TypeError or ValueError if unreadable."""
    values = dict(data)
    for field in fields(kind):
        value = values.get(field.name)
        if isinstance(value, list):
            values[field.name] = tuple(value)
        elif field.name == "body" and isinstance(value, str):
            values[field.name] = base64.b64decode(value)
    return kind(**values)


def reserved(snap: Snapshot) -> Snapshot:
    """``snap`` as stored: its local CSeq ``CSEQ_RESERVE`` ahead."""
    return replace(snap, local_cseq=snap.local_cseq + CSEQ_RESERVE)


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
