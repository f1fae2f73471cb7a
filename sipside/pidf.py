"""PIDF presence documents (RFC 3863) with RPID (RFC 4480) and the data model (RFC 4479).

The model is what SIP clients actually exchange: tuples with ``<basic>`` open/closed, contact,
notes and timestamp, and ``<dm:person>`` elements carrying RPID activities and ``<dm:note>``, as
PJSIP publishes them (person after the tuples, one activity, note in both places). Unknown
elements are ignored, as PIDF asks; simple leaf elements of foreign namespaces inside a person
are kept as :class:`Extension` so that a user of this module can carry its own hints.

:func:`encode` writes the conventional prefixes (default namespace for PIDF, ``dm:`` and
``rpid:``): baresip recognises busy only as ``<rpid:busy/>``. :func:`decode` parses through
:mod:`sipside.xmlsafe` and raises only :class:`~sipside.errors.PeerError`: 400 for malformed or
hostile bodies, 413 for oversized ones, 415 for another content type.
"""

from __future__ import annotations

import enum
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime

from sipside.errors import bad_body
from sipside.xmlsafe import (
    DEFAULT_LIMITS,
    XmlLimits,
    attr_escape,
    parse_document,
    qnames,
    split_tag,
    text_escape,
)

__all__ = [
    "DM_NS",
    "PIDF_CONTENT_TYPE",
    "PIDF_NS",
    "RPID_NS",
    "Activity",
    "Basic",
    "Extension",
    "Note",
    "Person",
    "PresenceDocument",
    "PresenceTuple",
    "decode",
    "encode",
]

PIDF_CONTENT_TYPE = "application/pidf+xml"
PIDF_NS = "urn:ietf:params:xml:ns:pidf"
DM_NS = "urn:ietf:params:xml:ns:pidf:data-model"
RPID_NS = "urn:ietf:params:xml:ns:pidf:rpid"
_XML_NS = "http://www.w3.org/XML/1998/namespace"
_ACCEPTED = frozenset({PIDF_CONTENT_TYPE})
_NCNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


class Basic(enum.Enum):
    """RFC 3863 4.1.4: the one mandatory status value of a tuple."""

    OPEN = "open"
    CLOSED = "closed"


class Activity(enum.Enum):
    """RFC 4480 3.2: what the person is doing; the value is the element name."""

    APPOINTMENT = "appointment"
    AWAY = "away"
    BREAKFAST = "breakfast"
    BUSY = "busy"
    DINNER = "dinner"
    HOLIDAY = "holiday"
    IN_TRANSIT = "in-transit"
    LOOKING_FOR_WORK = "looking-for-work"
    LUNCH = "lunch"
    MEAL = "meal"
    MEETING = "meeting"
    ON_THE_PHONE = "on-the-phone"
    PERFORMANCE = "performance"
    PERMANENT_ABSENCE = "permanent-absence"
    PLAYING = "playing"
    PRESENTATION = "presentation"
    SHOPPING = "shopping"
    SLEEPING = "sleeping"
    SPECTATOR = "spectator"
    STEERING = "steering"
    TRAVEL = "travel"
    TV = "tv"
    UNKNOWN = "unknown"
    VACATION = "vacation"
    WORKING = "working"
    WORSHIP = "worship"


_ACTIVITY_BY_TAG = {f"{{{RPID_NS}}}{a.value}": a for a in Activity}


@dataclass(frozen=True, slots=True)
class Note:
    """A human-readable note (RFC 3863 4.1.6), optionally tagged with ``xml:lang``."""

    text: str
    lang: str | None = None


@dataclass(frozen=True, slots=True)
class Extension:
    """A leaf element of a foreign namespace kept from a person: ``{namespace}name`` = text."""

    namespace: str
    name: str
    text: str = ""


@dataclass(frozen=True, slots=True)
class PresenceTuple:
    """RFC 3863 4.1.2: one presence tuple; ``priority`` is the contact's q-value (0 to 1)."""

    id: str
    basic: Basic | None
    contact: str | None = None
    priority: float | None = None
    notes: tuple[Note, ...] = ()
    timestamp: datetime | None = None


@dataclass(frozen=True, slots=True)
class Person:
    """RFC 4479 ``<dm:person>`` with its RPID content (RFC 4480 3.2, 3.12) and notes.

    ``other_activity`` is the text of ``<rpid:other>``; ``user_input`` is "active" or "idle".
    """

    id: str
    activities: tuple[Activity, ...] = ()
    other_activity: str | None = None
    user_input: str | None = None
    notes: tuple[Note, ...] = ()
    extensions: tuple[Extension, ...] = ()
    timestamp: datetime | None = None


@dataclass(frozen=True, slots=True)
class PresenceDocument:
    """RFC 3863 4.1: a presentity's presence: its tuples, persons and document-level notes."""

    entity: str
    tuples: tuple[PresenceTuple, ...] = ()
    persons: tuple[Person, ...] = ()
    notes: tuple[Note, ...] = ()


# ---------------------------------------------------------------------------------------------
# Encoding


def _format_time(value: datetime) -> str:
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _format_q(value: float) -> str:
    # RFC 3261 25.1 qvalue: at most three decimals, 0 to 1.
    text = f"{min(max(value, 0.0), 1.0):.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _notes(out: list[str], notes: tuple[Note, ...], tag: str, indent: str) -> None:
    for note in notes:
        lang = f' xml:lang="{attr_escape(note.lang)}"' if note.lang else ""
        out.append(f"{indent}<{tag}{lang}>{text_escape(note.text)}</{tag}>\n")


def _encode_tuple(out: list[str], tup: PresenceTuple) -> None:
    out.append(f' <tuple id="{attr_escape(tup.id)}">\n  <status>')
    if tup.basic is not None:
        out.append(f"<basic>{tup.basic.value}</basic>")
    out.append("</status>\n")
    if tup.contact is not None:
        prio = f' priority="{_format_q(tup.priority)}"' if tup.priority is not None else ""
        out.append(f"  <contact{prio}>{text_escape(tup.contact)}</contact>\n")
    _notes(out, tup.notes, "note", "  ")
    if tup.timestamp is not None:
        out.append(f"  <timestamp>{_format_time(tup.timestamp)}</timestamp>\n")
    out.append(" </tuple>\n")


def _encode_person(out: list[str], person: Person, ext_prefixes: dict[str, str]) -> None:
    out.append(f' <dm:person id="{attr_escape(person.id)}">\n')
    if person.activities or person.other_activity is not None:
        # PJSIP reads only the first activity child (rpid.c), so the caller's order matters.
        out.append("  <rpid:activities>")
        out.extend(f"<rpid:{a.value}/>" for a in person.activities)
        if person.other_activity is not None:
            out.append(f"<rpid:other>{text_escape(person.other_activity)}</rpid:other>")
        out.append("</rpid:activities>\n")
    if person.user_input is not None:
        out.append(f"  <rpid:user-input>{text_escape(person.user_input)}</rpid:user-input>\n")
    _notes(out, person.notes, "dm:note", "  ")
    for ext in person.extensions:
        tag = f"{ext_prefixes[ext.namespace]}:{ext.name}"
        out.append(f"  <{tag}>{text_escape(ext.text)}</{tag}>\n")
    if person.timestamp is not None:
        out.append(f"  <dm:timestamp>{_format_time(person.timestamp)}</dm:timestamp>\n")
    out.append(" </dm:person>\n")


def encode(doc: PresenceDocument) -> bytes:
    """Serialise ``doc`` as an ``application/pidf+xml`` body with the conventional prefixes."""
    ext_prefixes: dict[str, str] = {}
    for person in doc.persons:
        for ext in person.extensions:
            if not _NCNAME.fullmatch(ext.name) or not ext.namespace:
                raise ValueError(f"cannot write extension {{{ext.namespace}}}{ext.name}")
            ext_prefixes.setdefault(ext.namespace, f"x{len(ext_prefixes)}")
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>\n',
        f'<presence xmlns="{PIDF_NS}"',
    ]
    if doc.persons:
        out.append(f' xmlns:dm="{DM_NS}" xmlns:rpid="{RPID_NS}"')
    out.extend(f' xmlns:{p}="{attr_escape(ns)}"' for ns, p in ext_prefixes.items())
    out.append(f' entity="{attr_escape(doc.entity)}">\n')
    # RFC 3863 4.1.1 content order: tuples, notes, then extensions (persons).
    for tup in doc.tuples:
        _encode_tuple(out, tup)
    _notes(out, doc.notes, "note", " ")
    for person in doc.persons:
        _encode_person(out, person, ext_prefixes)
    out.append("</presence>\n")
    return "".join(out).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Decoding

_TUPLE, _STATUS, _BASIC, _CONTACT, _NOTE, _TIMESTAMP, _PRESENCE, _MUST_UNDERSTAND = qnames(
    PIDF_NS,
    "tuple",
    "status",
    "basic",
    "contact",
    "note",
    "timestamp",
    "presence",
    "mustUnderstand",
)
_PERSON, _DM_NOTE, _DM_TIMESTAMP = qnames(DM_NS, "person", "note", "timestamp")
_ACTIVITIES, _USER_INPUT, _OTHER = qnames(RPID_NS, "activities", "user-input", "other")
(_LANG,) = qnames(_XML_NS, "lang")
_KNOWN_NS = frozenset({PIDF_NS, DM_NS, RPID_NS})


def _parse_time(text: str | None) -> datetime | None:
    # A garbled timestamp is not worth refusing someone's presence over: drop it.
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        return None


def _parse_q(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


def _note(elem: ET.Element) -> Note:
    return Note(elem.text or "", elem.get(_LANG))


def _check_extension(elem: ET.Element) -> None:
    # RFC 3863 4.3.2 (mustUnderstand): an extension we do not know but must understand makes
    # the whole document unusable to us.
    if elem.get(_MUST_UNDERSTAND) in ("true", "1"):
        raise bad_body("PIDF", f"mustUnderstand extension {elem.tag!r} not supported")


def _decode_tuple(elem: ET.Element) -> PresenceTuple:
    tuple_id = elem.get("id")
    if not tuple_id:
        raise bad_body("PIDF", "tuple without id")
    basic: Basic | None = None
    contact: str | None = None
    priority: float | None = None
    notes: list[Note] = []
    timestamp: datetime | None = None
    seen_status = False
    for child in elem:
        tag = child.tag
        if tag == _STATUS:
            seen_status = True
            for sub in child:
                if sub.tag == _BASIC:
                    value = (sub.text or "").strip()
                    try:
                        basic = Basic(value)
                    except ValueError:
                        raise bad_body("PIDF", f"basic status {value[:20]!r}") from None
                elif split_tag(sub.tag)[0] not in _KNOWN_NS:
                    _check_extension(sub)
        elif tag == _CONTACT:
            contact = (child.text or "").strip()
            priority = _parse_q(child.get("priority"))
        elif tag == _NOTE:
            notes.append(_note(child))
        elif tag == _TIMESTAMP:
            timestamp = _parse_time(child.text)
        elif split_tag(tag)[0] not in _KNOWN_NS:
            _check_extension(child)
    if not seen_status:
        # RFC 3863 4.1.2: <status> is the one mandatory child of <tuple>.
        raise bad_body("PIDF", f"tuple {tuple_id[:40]!r} without status")
    return PresenceTuple(tuple_id, basic, contact, priority, tuple(notes), timestamp)


def _decode_person(elem: ET.Element) -> Person:
    activities: list[Activity] = []
    other: str | None = None
    user_input: str | None = None
    notes: list[Note] = []
    extensions: list[Extension] = []
    timestamp: datetime | None = None
    for child in elem:
        tag = child.tag
        if tag == _ACTIVITIES:
            for act in child:
                # RFC 4480 3.2 allows activities of other namespaces; we cannot map those.
                activity = _ACTIVITY_BY_TAG.get(act.tag)
                if activity is not None:
                    if activity not in activities:
                        activities.append(activity)
                elif act.tag == _OTHER:
                    other = act.text or ""
        elif tag == _DM_NOTE:
            notes.append(_note(child))
        elif tag == _USER_INPUT:
            user_input = (child.text or "").strip()
        elif tag == _DM_TIMESTAMP:
            timestamp = _parse_time(child.text)
        else:
            ns, name = split_tag(tag)
            if ns in _KNOWN_NS:
                continue
            _check_extension(child)
            if ns and len(child) == 0:
                extensions.append(Extension(ns, name, child.text or ""))
    return Person(
        elem.get("id", ""),
        tuple(activities),
        other,
        user_input,
        tuple(notes),
        tuple(extensions),
        timestamp,
    )


def decode(
    body: bytes, content_type: str | None, limits: XmlLimits = DEFAULT_LIMITS
) -> PresenceDocument:
    """Parse a PIDF body; PeerError(415) for another content type, 400/413 for a bad body."""
    root = parse_document(body, content_type, _ACCEPTED, _PRESENCE, "PIDF", limits)
    entity = root.get("entity")
    if not entity:
        raise bad_body("PIDF", "presence without entity")
    tuples: list[PresenceTuple] = []
    persons: list[Person] = []
    notes: list[Note] = []
    for child in root:
        tag = child.tag
        if tag == _TUPLE:
            tuples.append(_decode_tuple(child))
        elif tag == _PERSON:
            persons.append(_decode_person(child))
        elif tag == _NOTE:
            notes.append(_note(child))
        elif split_tag(tag)[0] not in _KNOWN_NS:
            _check_extension(child)
    return PresenceDocument(entity, tuple(tuples), tuple(persons), tuple(notes))
