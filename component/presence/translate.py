"""Presence translation between XMPP and PIDF/RPID, both ways (DESIGN 5.1).

XMPP -> PIDF (a SIP user watches an XMPP user, DESIGN 5.2): one tuple per resource, best first
because PJSIP reads only the first tuple; the person element describes the best resource with
one RPID activity (PJSIP reads only the first). XMPP ``chat`` and ``xa`` have no RPID activity
of their own, so they are written as open (chat) or away plus ``<rpid:user-input>idle``
(xa), with a note for humans and a ``<sx:show>`` extension element that lets us read our own
documents back exactly; other PIDF readers ignore it, as RFC 3863 requires.

PIDF -> XMPP (an XMPP user watches a SIP user, DESIGN 5.3 and 5.4): the best tuple decides
availability (open beats closed, then contact priority), RPID activities decide ``show``, and
notes give the status text. ``priority`` is the seed parameter of that name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from sipside.pidf import (
    Activity,
    Basic,
    Extension,
    Note,
    Person,
    PresenceDocument,
    PresenceTuple,
)

__all__ = [
    "SHOW_VALUES",
    "SIPXMPP_NS",
    "XmppPresence",
    "XmppPresenceSet",
    "pidf_for_xmpp",
    "xmpp_for_pidf",
]

SHOW_VALUES = frozenset({"chat", "away", "xa", "dnd"})
SIPXMPP_NS = "urn:x-sipxmpp:presence:0"

# RFC 6121 4.7.2.1 lists the show values; this order breaks priority ties between resources,
# most reachable first.
_SHOW_RANK = {"chat": 0, None: 1, "away": 2, "xa": 3, "dnd": 4}

# Notes for humans when XMPP gives a show without status text (DESIGN 5.1: chat -> note).
_SHOW_NOTES = {"chat": "Free for chat", "xa": "Extended away"}

# RFC 4480 3.2 activities, read as the XMPP show they most resemble. The person cannot be
# disturbed (dnd), is gone for long (xa), or is briefly away (away).
_DND = frozenset(
    {
        Activity.BUSY,
        Activity.ON_THE_PHONE,
        Activity.MEETING,
        Activity.APPOINTMENT,
        Activity.PERFORMANCE,
        Activity.PRESENTATION,
        Activity.STEERING,
        Activity.WORSHIP,
    }
)
_XA = frozenset(
    {
        Activity.VACATION,
        Activity.HOLIDAY,
        Activity.PERMANENT_ABSENCE,
        Activity.SLEEPING,
        Activity.TRAVEL,
    }
)
_AWAY = frozenset(
    {
        Activity.AWAY,
        Activity.BREAKFAST,
        Activity.DINNER,
        Activity.LUNCH,
        Activity.MEAL,
        Activity.SHOPPING,
        Activity.IN_TRANSIT,
        Activity.SPECTATOR,
        Activity.TV,
        Activity.PLAYING,
        Activity.LOOKING_FOR_WORK,
    }
)


@dataclass(frozen=True, slots=True)
class XmppPresence:
    """One resource's presence as XMPP sees it (RFC 6121 4.7): ``show`` is chat/away/xa/dnd."""

    resource: str | None
    available: bool
    show: str | None = None
    status: str | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if self.show is not None and self.show not in SHOW_VALUES:
            raise ValueError(f"not an XMPP show value: {self.show!r}")
        if not -128 <= self.priority <= 127:
            raise ValueError(f"XMPP priority out of range: {self.priority}")


def _rank(presence: XmppPresence) -> tuple[bool, int, int]:
    """Sort key, smallest best: available, then priority, then show."""
    show_rank = _SHOW_RANK[presence.show] if presence.available else 9
    return (not presence.available, -presence.priority, show_rank)


@dataclass(frozen=True, slots=True)
class XmppPresenceSet:
    """The presences of a bare JID's resources, one per resource."""

    presences: tuple[XmppPresence, ...] = ()

    def __iter__(self) -> Iterator[XmppPresence]:
        return iter(self.presences)

    def __len__(self) -> int:
        return len(self.presences)

    def updated(self, presence: XmppPresence) -> XmppPresenceSet:
        """The set after ``presence`` arrived: it replaces its resource; unavailable removes it."""
        others = tuple(p for p in self.presences if p.resource != presence.resource)
        return XmppPresenceSet((*others, presence) if presence.available else others)

    def best(self) -> XmppPresence | None:
        """The resource a watcher should see first (available, highest priority), if any."""
        return min(self.presences, key=_rank, default=None)


# ---------------------------------------------------------------------------------------------
# XMPP -> PIDF


def _tuple_id(resource: str | None, used: set[str]) -> str:
    # xs:ID must be an NCName; a hash keeps the id stable across NOTIFYs for the same resource
    # without leaking the resource name itself.
    base = "xmpp" if resource is None else "r" + hashlib.blake2s(resource.encode()).hexdigest()[:12]
    tuple_id, n = base, 1
    while tuple_id in used:
        tuple_id, n = f"{base}-{n}", n + 1
    used.add(tuple_id)
    return tuple_id


def _q_for_priority(priority: int) -> float:
    # RFC 6121 priority -128..127 onto a contact q-value 0..1 (RFC 3863 4.1.5), keeping order:
    # neighbours differ by 1/255, more than the 0.001 a qvalue can express.
    return round((priority + 128) / 255, 3)


def _person_for(best: XmppPresence, person_id: str) -> Person | None:
    show = best.show
    if show is None and best.status is None:
        return None
    activities: tuple[Activity, ...] = ()
    user_input: str | None = None
    if show in ("away", "xa"):
        activities = (Activity.AWAY,)
        # RFC 4480 3.12: idle says "not using the device", the nearest RPID gets to "for long".
        user_input = "idle" if show == "xa" else None
    elif show == "dnd":
        activities = (Activity.BUSY,)
    note_text = best.status if best.status is not None else _SHOW_NOTES.get(show or "")
    notes = (Note(note_text),) if note_text is not None else ()
    extensions = (Extension(SIPXMPP_NS, "show", show),) if show is not None else ()
    return Person(person_id, activities, None, user_input, notes, extensions)


def pidf_for_xmpp(entity_sip_uri: str, presences: Iterable[XmppPresence]) -> PresenceDocument:
    """The PIDF document for an XMPP entity's resources, as SIP watchers get it (DESIGN 5.1)."""
    ordered = sorted(presences, key=_rank)
    used: set[str] = set()
    tuples: list[PresenceTuple] = []
    for presence in ordered:
        tuples.append(
            PresenceTuple(
                id=_tuple_id(presence.resource, used),
                basic=Basic.OPEN if presence.available else Basic.CLOSED,
                contact=entity_sip_uri,
                priority=_q_for_priority(presence.priority) if presence.available else None,
                notes=(Note(presence.status),) if presence.status is not None else (),
            )
        )
    if not tuples:
        # No resource at all: still one tuple, so the watcher sees "closed", not "unknown".
        tuples.append(PresenceTuple(id="xmpp", basic=Basic.CLOSED, contact=entity_sip_uri))
    best = ordered[0] if ordered else None
    person = _person_for(best, "p" + tuples[0].id) if best is not None and best.available else None
    return PresenceDocument(entity_sip_uri, tuple(tuples), (person,) if person else ())


# ---------------------------------------------------------------------------------------------
# PIDF -> XMPP


def _best_tuple(doc: PresenceDocument) -> PresenceTuple | None:
    # Open beats closed (and closed beats a tuple without basic), then the contact priority;
    # document order breaks ties, as it did when we wrote the document.
    def key(tup: PresenceTuple) -> tuple[int, float]:
        basic_rank = {Basic.OPEN: 0, Basic.CLOSED: 1, None: 2}[tup.basic]
        return (basic_rank, -(tup.priority if tup.priority is not None else 0.5))

    return min(doc.tuples, key=key, default=None)


def _marked_show(person: Person) -> str | None:
    for ext in person.extensions:
        if ext.namespace == SIPXMPP_NS and ext.name == "show" and ext.text in SHOW_VALUES:
            return ext.text
    return None


def _show_for_person(person: Person) -> str | None:
    acts = set(person.activities)
    if acts & _DND:
        return "dnd"
    if acts & _XA:
        return "xa"
    if acts & _AWAY:
        return "xa" if person.user_input == "idle" and Activity.AWAY in acts else "away"
    if person.user_input == "idle":
        return "away"
    return None


def _first_text(*note_lists: tuple[Note, ...]) -> str | None:
    """The first note of the first non-empty list: an empty note is still a status ("")."""
    for notes in note_lists:
        if notes:
            return notes[0].text
    return None


def xmpp_for_pidf(
    doc: PresenceDocument, priority: int = 0, resource: str | None = None
) -> XmppPresence:
    """The one presence the gateway sends for a SIP user whose PIDF is ``doc`` (DESIGN 5.1)."""
    best = _best_tuple(doc)
    if best is None or best.basic is not Basic.OPEN:
        status = _first_text(best.notes if best is not None else (), doc.notes)
        return XmppPresence(resource, False, None, status, priority)
    # Persons describe the presentity as a whole; an aggregating server (Kamailio with two
    # publications) may hand us several, and the first one that says anything wins.
    person = next(
        (p for p in doc.persons if p.activities or p.user_input or p.notes or p.extensions), None
    )
    show: str | None = None
    person_notes: tuple[Note, ...] = ()
    if person is not None:
        marked = _marked_show(person)
        if marked is not None:
            # Our own document: the person note is only a note for humans, never the status.
            show = marked
        else:
            show = _show_for_person(person)
            person_notes = person.notes
    status = _first_text(best.notes, person_notes, doc.notes)
    return XmppPresence(resource, True, show, status, priority)
