"""DESIGN 5.1 presence translation, both ways, row by row and as round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from component.presence.translate import (
    SIPXMPP_NS,
    XmppPresence,
    XmppPresenceSet,
    pidf_for_xmpp,
    xmpp_for_pidf,
)
from sipside import pidf
from sipside.pidf import Activity, Basic, Extension, Note, Person, PresenceDocument, PresenceTuple
from sipside.xmlsafe import xml_safe_text
from tests.test_pidf import KAMAILIO_AGGREGATED, PJSIP_AWAY, PJSIP_BUSY, PJSIP_OFFLINE, PJSIP_ONLINE

URI = "sip:bob*xmpp.test@jabber.sip.test"
CT = pidf.PIDF_CONTENT_TYPE


def _wire(doc: PresenceDocument) -> PresenceDocument:
    """Through the bytes a watcher would receive, so that the tests cover encode/decode too."""
    return pidf.decode(pidf.encode(doc), CT)


# One row per line of the DESIGN 5.1 table: the XMPP presence, then what the PIDF must show:
# basic, RPID activities of the person (None: no person), user-input, a note somewhere.


def P(available: bool, show: str | None = None, status: str | None = None) -> XmppPresence:
    return XmppPresence("pc", available, show, status)


OPEN, CLOSED = Basic.OPEN, Basic.CLOSED
AWAY, BUSY = (Activity.AWAY,), (Activity.BUSY,)
ROWS = [
    ("available", P(True), OPEN, None, None, None),
    ("chat", P(True, "chat"), OPEN, (), None, "Free for chat"),
    ("away", P(True, "away"), OPEN, AWAY, None, None),
    ("xa", P(True, "xa"), OPEN, AWAY, "idle", "Extended away"),
    ("dnd", P(True, "dnd"), OPEN, BUSY, None, None),
    ("unavailable", P(False), CLOSED, None, None, None),
    ("status", P(True, None, "at lunch"), OPEN, (), None, "at lunch"),
    ("away+status", P(True, "away", "brb"), OPEN, AWAY, None, "brb"),
    ("dnd+status", P(True, "dnd", "call"), OPEN, BUSY, None, "call"),
    ("chat+status", P(True, "chat", "hi"), OPEN, (), None, "hi"),
    ("xa+status", P(True, "xa", "gone"), OPEN, AWAY, "idle", "gone"),
    ("offline+status", P(False, None, "bye"), CLOSED, None, None, "bye"),
    ("empty status", P(True, "away", ""), OPEN, AWAY, None, ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "presence", "basic", "activities", "user_input", "note"),
    ROWS,
    ids=[r[0] for r in ROWS],
)
def test_xmpp_to_pidf_rows(
    name: str,
    presence: XmppPresence,
    basic: Basic,
    activities: tuple[Activity, ...] | None,
    user_input: str | None,
    note: str | None,
) -> None:
    doc = _wire(pidf_for_xmpp(URI, [presence]))
    assert doc.entity == URI
    assert len(doc.tuples) == 1
    assert doc.tuples[0].basic is basic
    if activities is None:
        assert doc.persons == ()
    else:
        assert doc.persons[0].activities == activities
        assert doc.persons[0].user_input == user_input
    notes = [n.text for n in doc.tuples[0].notes] + [n.text for p in doc.persons for n in p.notes]
    if note is None:
        assert notes == []
    else:
        assert note in notes
    if presence.status is not None:
        # The status goes into the tuple note, which every PIDF reader shows.
        assert doc.tuples[0].notes == (Note(presence.status),)


@pytest.mark.parametrize("presence", [r[1] for r in ROWS], ids=[r[0] for r in ROWS])
def test_round_trip_every_row(presence: XmppPresence) -> None:
    back = xmpp_for_pidf(_wire(pidf_for_xmpp(URI, [presence])), priority=5, resource="sip")
    assert (back.available, back.show, back.status) == (
        presence.available,
        presence.show if presence.available else None,
        presence.status,
    )
    assert (back.priority, back.resource) == (5, "sip")


def test_several_resources_one_tuple_each_best_first() -> None:
    phone = XmppPresence("phone", True, "away", "on the move", priority=-1)
    laptop = XmppPresence("laptop", True, "dnd", "coding", priority=10)
    old = XmppPresence("old", False)
    doc = _wire(pidf_for_xmpp(URI, [phone, old, laptop]))
    assert [t.basic for t in doc.tuples] == [Basic.OPEN, Basic.OPEN, Basic.CLOSED]
    assert [t.notes for t in doc.tuples[:2]] == [(Note("coding"),), (Note("on the move"),)]
    assert len({t.id for t in doc.tuples}) == 3
    assert doc.tuples[0].priority is not None and doc.tuples[1].priority is not None
    assert doc.tuples[0].priority > doc.tuples[1].priority
    # The person describes the best resource; PJSIP reads it and the first tuple only.
    assert doc.persons[0].activities == (Activity.BUSY,)
    back = xmpp_for_pidf(doc)
    assert (back.show, back.status) == ("dnd", "coding")


def test_tuple_ids_are_stable_and_valid() -> None:
    one = pidf_for_xmpp(URI, [XmppPresence("res/with spaces", True)])
    two = pidf_for_xmpp(URI, [XmppPresence("res/with spaces", True, "away")])
    assert one.tuples[0].id == two.tuples[0].id
    assert one.tuples[0].id[0].isalpha() and one.tuples[0].id.isalnum()


def test_no_resources_is_closed() -> None:
    doc = _wire(pidf_for_xmpp(URI, XmppPresenceSet()))
    assert [t.basic for t in doc.tuples] == [Basic.CLOSED]
    assert xmpp_for_pidf(doc).available is False


def test_presence_set_updates() -> None:
    s = XmppPresenceSet()
    s = s.updated(XmppPresence("a", True, priority=1))
    s = s.updated(XmppPresence("b", True, "away", priority=5))
    s = s.updated(XmppPresence("a", True, "dnd", priority=1))
    assert len(s) == 2 and [p.show for p in s] == ["away", "dnd"]
    assert s.best() == XmppPresence("b", True, "away", priority=5)
    s = s.updated(XmppPresence("b", False))
    assert [p.resource for p in s] == ["a"]
    assert XmppPresenceSet().best() is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"show": "busy"}, "show"), ({"priority": 128}, "priority"), ({"priority": -129}, "priority")],
)
def test_invalid_xmpp_presence(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        XmppPresence("r", True, **kwargs)  # type: ignore[arg-type]


# --- PIDF from SIP clients -> XMPP -------------------------------------------------------------


def _person(*activities: Activity, user_input: str | None = None) -> PresenceDocument:
    return PresenceDocument(
        "sip:alice@sip.test",
        (PresenceTuple("t", Basic.OPEN),),
        (Person("p", activities, user_input=user_input),),
    )


SIP_CASES = [
    ("pjsip-online", pidf.decode(PJSIP_ONLINE, CT), True, None, None),
    ("pjsip-away", pidf.decode(PJSIP_AWAY, CT), True, "away", "Gone for coffee"),
    ("pjsip-busy", pidf.decode(PJSIP_BUSY, CT), True, "dnd", "In a call"),
    ("pjsip-offline", pidf.decode(PJSIP_OFFLINE, CT), False, None, None),
    ("kamailio-two-publications", pidf.decode(KAMAILIO_AGGREGATED, CT), True, "dnd", None),
    ("on-the-phone", _person(Activity.ON_THE_PHONE), True, "dnd", None),
    ("meeting", _person(Activity.MEETING), True, "dnd", None),
    ("vacation", _person(Activity.VACATION), True, "xa", None),
    ("sleeping", _person(Activity.SLEEPING), True, "xa", None),
    ("lunch", _person(Activity.LUNCH), True, "away", None),
    ("away+idle", _person(Activity.AWAY, user_input="idle"), True, "xa", None),
    ("idle only", _person(user_input="idle"), True, "away", None),
    ("away+busy", _person(Activity.AWAY, Activity.BUSY), True, "dnd", None),
    ("unknown (PJSIP online with note)", _person(Activity.UNKNOWN), True, None, None),
    ("no tuples", PresenceDocument("sip:a@b"), False, None, None),
    (
        "person note only",
        PresenceDocument(
            "sip:a@b", (PresenceTuple("t", Basic.OPEN),), (Person("p", notes=(Note("hi"),)),)
        ),
        True,
        None,
        "hi",
    ),
    (
        "document note only",
        PresenceDocument("sip:a@b", (PresenceTuple("t", Basic.OPEN),), (), (Note("doc"),)),
        True,
        None,
        "doc",
    ),
    (
        "open beats higher-priority closed",
        PresenceDocument(
            "sip:a@b",
            (
                PresenceTuple("c", Basic.CLOSED, "sip:a@c", 1.0, (Note("closed"),)),
                PresenceTuple("o", Basic.OPEN, "sip:a@o", 0.1, (Note("open"),)),
            ),
        ),
        True,
        None,
        "open",
    ),
    (
        "priority decides between open tuples",
        PresenceDocument(
            "sip:a@b",
            (
                PresenceTuple("lo", Basic.OPEN, "sip:a@l", 0.2, (Note("low"),)),
                PresenceTuple("hi", Basic.OPEN, "sip:a@h", 0.9, (Note("high"),)),
            ),
        ),
        True,
        None,
        "high",
    ),
    (
        "foreign show marker ignored",
        PresenceDocument(
            "sip:a@b",
            (PresenceTuple("t", Basic.OPEN),),
            (Person("p", extensions=(Extension("urn:other", "show", "chat"),)),),
        ),
        True,
        None,
        None,
    ),
    (
        "our marker with a bad value ignored",
        PresenceDocument(
            "sip:a@b",
            (PresenceTuple("t", Basic.OPEN),),
            (Person("p", (Activity.BUSY,), extensions=(Extension(SIPXMPP_NS, "show", "zzz"),)),),
        ),
        True,
        "dnd",
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "doc", "available", "show", "status"), SIP_CASES, ids=[c[0] for c in SIP_CASES]
)
def test_pidf_to_xmpp(
    name: str, doc: PresenceDocument, available: bool, show: str | None, status: str | None
) -> None:
    presence = xmpp_for_pidf(doc, priority=3)
    assert (presence.available, presence.show, presence.status) == (available, show, status)
    assert presence.priority == 3


# --- Property: any resource set survives the trip to PIDF and back as its best resource --------

# Statuses as an XMPP stanza can carry them (XML 1.0 characters, CR and LF included).
_status = st.none() | st.text(st.characters(codec="utf-8"), max_size=20).map(xml_safe_text)
_presences = st.builds(
    XmppPresence,
    st.none() | st.text(max_size=10),
    st.booleans(),
    st.none() | st.sampled_from(["chat", "away", "xa", "dnd"]),
    _status,
    st.integers(-128, 127),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_presences, max_size=4, unique_by=lambda p: p.resource))
def test_round_trip_best_resource(presences: list[XmppPresence]) -> None:
    # XML cannot carry a lone CR: a parser turns it into LF unless it is escaped, which
    # text_escape does, so the status comes back byte for byte.
    best = XmppPresenceSet(tuple(presences)).best()
    back = xmpp_for_pidf(_wire(pidf_for_xmpp(URI, presences)))
    if best is None:
        assert back == XmppPresence(None, False)
        return
    expected_show = best.show if best.available else None
    assert (back.available, back.show, back.status) == (best.available, expected_show, best.status)
