"""PIDF/RPID documents and the safe XML parser under them: samples, round trips, hostile input."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipside import pidf, xmlsafe
from sipside.errors import PeerError
from sipside.pidf import (
    Activity,
    Basic,
    Extension,
    Note,
    Person,
    PresenceDocument,
    PresenceTuple,
)

CT = pidf.PIDF_CONTENT_TYPE

# --- Real-world samples ------------------------------------------------------------------------
# Written after PJSIP 2.x conventions (pjsip-simple pidf.c/rpid.c: default PIDF namespace,
# dm/rpid prefixes declared on <presence>, tuple note plus person with one activity and a
# dm:note, person after the tuple, millisecond UTC timestamps).

PJSIP_ONLINE = b"""<?xml version="1.0" encoding="UTF-8"?>
<presence entity="sip:alice@sip.test" xmlns="urn:ietf:params:xml:ns:pidf">
 <tuple id="pj2d31e8a27cbe4b1c8c5b6d8f0e0a4f19">
  <status>
   <basic>open</basic>
  </status>
  <timestamp>2024-03-01T10:15:30.123Z</timestamp>
 </tuple>
</presence>
"""

PJSIP_AWAY = b"""<?xml version="1.0" encoding="UTF-8"?>
<presence entity="sip:alice@sip.test" xmlns="urn:ietf:params:xml:ns:pidf"
  xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model"
  xmlns:rpid="urn:ietf:params:xml:ns:pidf:rpid">
 <tuple id="pj2d31e8a27cbe4b1c8c5b6d8f0e0a4f19">
  <status>
   <basic>open</basic>
  </status>
  <timestamp>2024-03-01T10:16:02.001Z</timestamp>
  <note>Gone for coffee</note>
 </tuple>
 <dm:person id="pj7b3e2c0d1f5a4e6b9c8d7e6f5a4b3c2d">
  <rpid:activities>
   <rpid:away />
  </rpid:activities>
  <dm:note>Gone for coffee</dm:note>
 </dm:person>
</presence>
"""

PJSIP_BUSY = PJSIP_AWAY.replace(b"<rpid:away />", b"<rpid:busy />").replace(
    b"Gone for coffee", b"In a call"
)

PJSIP_OFFLINE = PJSIP_ONLINE.replace(b"<basic>open</basic>", b"<basic>closed</basic>")

# RFC 3863 section 3.4 style: explicit prefix for PIDF, contact with priority, no person.
RFC3863_PREFIXED = b"""<?xml version="1.0" encoding="UTF-8"?>
<impp:presence xmlns:impp="urn:ietf:params:xml:ns:pidf" entity="pres:someone@example.com">
  <impp:tuple id="sg89ae">
    <impp:status><impp:basic>open</impp:basic></impp:status>
    <impp:contact priority="0.8">tel:+09012345678</impp:contact>
  </impp:tuple>
</impp:presence>
"""

# What Kamailio presence_xml hands a watcher after two publications without SIP-If-Match: the
# tuples and persons of both, the copied person redeclaring its namespaces locally.
KAMAILIO_AGGREGATED = b"""<?xml version="1.0"?>
<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:bob@sip.test">
 <tuple id="desk"><status><basic>closed</basic></status><note>desk phone off</note></tuple>
 <tuple id="mobile"><status><basic>open</basic></status>
  <contact priority="0.9">sip:bob@10.0.0.7:5060</contact></tuple>
 <dm:person xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model"
   xmlns:rpid="urn:ietf:params:xml:ns:pidf:rpid" id="b1">
  <rpid:activities><rpid:on-the-phone/></rpid:activities>
  <rpid:user-input>active</rpid:user-input>
  <dm:timestamp>2024-03-01T10:00:00+01:00</dm:timestamp>
 </dm:person>
</presence>
"""

SAMPLES = [
    # (name, body, first basic, activities of first person, tuple notes, person notes)
    ("pjsip-online", PJSIP_ONLINE, Basic.OPEN, None, (), None),
    ("pjsip-away", PJSIP_AWAY, Basic.OPEN, (Activity.AWAY,), ("Gone for coffee",),
     ("Gone for coffee",)),
    ("pjsip-busy", PJSIP_BUSY, Basic.OPEN, (Activity.BUSY,), ("In a call",), ("In a call",)),
    ("pjsip-offline", PJSIP_OFFLINE, Basic.CLOSED, None, (), None),
    ("rfc3863-prefixed", RFC3863_PREFIXED, Basic.OPEN, None, (), None),
    ("kamailio-aggregated", KAMAILIO_AGGREGATED, Basic.CLOSED, (Activity.ON_THE_PHONE,),
     ("desk phone off",), ()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "body", "basic", "activities", "tuple_notes", "person_notes"),
    SAMPLES,
    ids=[s[0] for s in SAMPLES],
)
def test_real_world_samples(
    name: str,
    body: bytes,
    basic: Basic,
    activities: tuple[Activity, ...] | None,
    tuple_notes: tuple[str, ...],
    person_notes: tuple[str, ...] | None,
) -> None:
    doc = pidf.decode(body, CT)
    assert doc.tuples[0].basic is basic
    assert tuple(n.text for n in doc.tuples[0].notes) == tuple_notes
    if activities is None:
        assert doc.persons == ()
    else:
        assert doc.persons[0].activities == activities
        assert tuple(n.text for n in doc.persons[0].notes) == person_notes


def test_sample_details() -> None:
    pj = pidf.decode(PJSIP_AWAY, CT)
    assert pj.entity == "sip:alice@sip.test"
    assert pj.tuples[0].id == "pj2d31e8a27cbe4b1c8c5b6d8f0e0a4f19"
    assert pj.tuples[0].timestamp == datetime(2024, 3, 1, 10, 16, 2, 1000, tzinfo=UTC)
    assert pj.persons[0].id == "pj7b3e2c0d1f5a4e6b9c8d7e6f5a4b3c2d"
    rfc = pidf.decode(RFC3863_PREFIXED, CT)
    assert (rfc.tuples[0].contact, rfc.tuples[0].priority) == ("tel:+09012345678", 0.8)
    kam = pidf.decode(KAMAILIO_AGGREGATED, CT)
    assert [t.id for t in kam.tuples] == ["desk", "mobile"]
    assert kam.tuples[1].priority == 0.9
    assert kam.persons[0].user_input == "active"
    assert kam.persons[0].timestamp == datetime(2024, 3, 1, 10, tzinfo=timezone(timedelta(hours=1)))


def test_encode_uses_conventional_prefixes_and_reads_back() -> None:
    doc = PresenceDocument(
        "sip:bob*xmpp.test@jabber.sip.test",
        (PresenceTuple("t1", Basic.OPEN, notes=(Note("on a call"),)),),
        (Person("p1", (Activity.BUSY,), notes=(Note("on a call", "en"),)),),
    )
    body = pidf.encode(doc)
    # baresip only recognises busy as <rpid:busy/> with exactly that prefix.
    assert b"<rpid:busy/>" in body
    assert b'xmlns:rpid="urn:ietf:params:xml:ns:pidf:rpid"' in body
    assert b'<presence xmlns="urn:ietf:params:xml:ns:pidf"' in body
    assert b"<dm:person" in body and b'<dm:note xml:lang="en">' in body
    # PJSIP finds the person by name suffix and reads the tuple first: tuple before person.
    assert body.index(b"<tuple") < body.index(b"<dm:person")
    assert pidf.decode(body, CT) == doc


def test_unknown_extensions_are_ignored_and_foreign_leaves_kept() -> None:
    body = b"""<presence xmlns="urn:ietf:params:xml:ns:pidf" xmlns:x="urn:example:x"
      xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model" entity="sip:a@b">
      <tuple id="t"><status><basic>open</basic><x:location>home</x:location></status>
        <x:whatever><x:deep/></x:whatever></tuple>
      <dm:person id="p"><x:mood>happy</x:mood><x:tree><x:leaf/></x:tree></dm:person>
      <dm:device id="d"><dm:deviceID>urn:x</dm:deviceID></dm:device>
      <x:top/></presence>"""
    doc = pidf.decode(body, CT)
    assert doc.tuples[0].basic is Basic.OPEN
    assert doc.persons[0].extensions == (Extension("urn:example:x", "mood", "happy"),)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'<presence xmlns="urn:ietf:params:xml:ns:pidf"/>', "entity"),
        (b'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="s"><tuple/></presence>', "id"),
        (
            b'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="s"><tuple id="t"/></presence>',
            "status",
        ),
        (
            b'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="s"><tuple id="t">'
            b"<status><basic>ajar</basic></status></tuple></presence>",
            "basic",
        ),
        (b'<presence xmlns="urn:ietf:params:xml:ns:pidf-wrong" entity="s"/>', "root"),
        (b'<presence entity="s"/>', "root"),
        (b'<x:presence xmlns:x="urn:ietf:params:xml:ns:cpim-pidf" entity="s"/>', "root"),
        (
            b'<presence xmlns="urn:ietf:params:xml:ns:pidf" xmlns:e="urn:e" entity="s">'
            b'<e:secret mustUnderstand="true"/></presence>',
            None,  # mustUnderstand without the PIDF namespace on the attribute: ignored
        ),
        (
            b'<presence xmlns="urn:ietf:params:xml:ns:pidf" xmlns:e="urn:e" '
            b'xmlns:p="urn:ietf:params:xml:ns:pidf" entity="s">'
            b'<e:secret p:mustUnderstand="true"/></presence>',
            "mustUnderstand",
        ),
    ],
)
def test_structural_errors(body: bytes, fragment: str | None) -> None:
    if fragment is None:
        pidf.decode(body, CT)
        return
    with pytest.raises(PeerError) as info:
        pidf.decode(body, CT)
    assert info.value.status == 400
    assert fragment in (info.value.warning or "")


def test_lenient_optional_fields() -> None:
    body = b"""<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:a@b">
      <tuple id="t"><status><basic> open </basic></status>
      <contact priority="7">sip:a@b</contact><timestamp>yesterday</timestamp></tuple></presence>"""
    tup = pidf.decode(body, CT).tuples[0]
    assert (tup.basic, tup.contact, tup.priority, tup.timestamp) == (
        Basic.OPEN,
        "sip:a@b",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/pidf+xml", None),
        ("Application/PIDF+XML", None),
        ("application/pidf+xml; charset=UTF-8", None),
        ('application/pidf+xml;charset="utf-8"', None),
        ("application/pidf+xml; charset=ISO-8859-1", 415),
        ("application/xpidf+xml", 415),
        ("application/cpim-pidf+xml", 415),
        ("text/plain", 415),
        (None, 415),
        ("garbage", 400),
    ],
)
def test_content_types(content_type: str | None, status: int | None) -> None:
    if status is None:
        assert pidf.decode(PJSIP_ONLINE, content_type).entity == "sip:alice@sip.test"
        return
    with pytest.raises(PeerError) as info:
        pidf.decode(PJSIP_ONLINE, content_type)
    assert info.value.status == status


# --- Hostile input ------------------------------------------------------------------------------

_BILLION_LAUGHS = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + b"".join(
        b' <!ENTITY lol%d "%s">\n' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b']>\n<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="&lol9;"/>'
)
_XXE = (
    b'<?xml version="1.0"?>\n<!DOCTYPE presence [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
    b'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:a@b"><note>&xxe;</note></presence>'
)
_EXTERNAL_DTD = (
    b'<?xml version="1.0"?><!DOCTYPE presence SYSTEM "http://127.0.0.1:9/evil.dtd">'
    b'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:a@b"/>'
)
_PARAM_ENTITY = (
    b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY % x SYSTEM "file:///etc/passwd"> %x;]>'
    b'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="s"/>'
)
_ROOT = b'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:a@b">'


def _deep(levels: int) -> bytes:
    return _ROOT + b"<x>" * levels + b"</x>" * levels + b"</presence>"


HOSTILE = [
    ("billion-laughs", _BILLION_LAUGHS, 400),
    ("external-entity", _XXE, 400),
    ("external-dtd", _EXTERNAL_DTD, 400),
    ("parameter-entity", _PARAM_ENTITY, 400),
    ("undefined-entity", _ROOT + b"<note>&nbsp;</note></presence>", 400),
    ("deep-5000-fits-size", _deep(5000), 400),
    ("deep-10000", _deep(10000), 413),
    ("10MB", _ROOT + b"<note>" + b"A" * 10_000_000 + b"</note></presence>", 413),
    ("invalid-utf8", _ROOT + b"<note>\xc3\x28\xff</note></presence>", 400),
    ("utf16-declared", '<?xml version="1.0" encoding="UTF-16"?><a/>'.encode("utf-16"), 400),
    ("garbage-after-root", PJSIP_ONLINE + b"<presence/>", 400),
    ("text-after-root", PJSIP_ONLINE + b"trailing", 400),
    ("truncated", PJSIP_AWAY[:200], 400),
    ("empty", b"", 400),
    ("not-xml", b"SIP/2.0 200 OK\r\n\r\n", 400),
    ("nul-byte", _ROOT + b"<note>\x00</note></presence>", 400),
    ("unbound-prefix", b'<rpid:presence entity="s"/>', 400),
    ("wrong-namespace", b'<presence xmlns="urn:ietf:params:xml:ns:xpidf" entity="s"/>', 400),
    ("many-elements", _ROOT + b"<x/>" * 5000 + b"</presence>", 400),
]


# An entity expansion or a quadratic path would hang: the timeout guards against that without
# asserting on wall time.
@pytest.mark.timeout(30)
@pytest.mark.parametrize(("name", "body", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_refused(name: str, body: bytes, status: int) -> None:
    with pytest.raises(PeerError) as info:
        pidf.decode(body, CT)
    assert info.value.status == status, info.value


def test_depth_limit_is_exact() -> None:
    limits = xmlsafe.XmlLimits(max_depth=5)
    ok = b"<a><b><c><d><e/></d></c></b></a>"
    assert xmlsafe.parse_xml(ok, limits).tag == "a"
    with pytest.raises(PeerError) as info:
        xmlsafe.parse_xml(b"<a>" + ok + b"</a>", limits)
    assert info.value.status == 400 and "deeper" in (info.value.warning or "")


def test_10000_deep_within_a_larger_size_limit_still_refused_by_depth() -> None:
    limits = xmlsafe.XmlLimits(max_bytes=1 << 20)
    with pytest.raises(PeerError) as info:
        pidf.decode(_deep(10000), CT, limits)
    assert info.value.status == 400 and "deeper" in (info.value.warning or "")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_ever_peer_error(body: bytes) -> None:
    try:
        pidf.decode(body, CT)
    except PeerError as exc:
        assert exc.status in (400, 413)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_samples_only_ever_peer_error(data: st.DataObject) -> None:
    body = bytearray(data.draw(st.sampled_from([s[1] for s in SAMPLES])))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(body) - 1))
        body[pos] = data.draw(st.integers(0, 255))
    try:
        pidf.decode(bytes(body), CT)
    except PeerError as exc:
        assert exc.status in (400, 413)


# --- Round trips --------------------------------------------------------------------------------

# Any text XML can carry: encode() drops what it cannot (controls, U+FFFE), so compare with that.
_text = st.text(st.characters(codec="utf-8"), max_size=30).map(xmlsafe.xml_safe_text)
_ident = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,15}", fullmatch=True)
_notes = st.lists(
    st.builds(Note, _text, st.none() | st.sampled_from(["en", "de", "fr-CA"])), max_size=2
).map(tuple)
_times = st.none() | st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
_tuples = st.builds(
    PresenceTuple,
    _ident,
    st.none() | st.sampled_from(Basic),
    st.none() | _text.filter(lambda s: s == s.strip()),
    st.none() | st.integers(0, 1000).map(lambda n: n / 1000),
    _notes,
    _times,
)
_persons = st.builds(
    Person,
    _ident,
    st.lists(st.sampled_from(Activity), unique=True, max_size=3).map(tuple),
    st.none() | _text,
    st.none() | st.sampled_from(["active", "idle"]),
    _notes,
    st.lists(
        st.builds(Extension, st.sampled_from(["urn:a", "urn:b:c"]), _ident, _text), max_size=2
    ).map(tuple),
    _times,
)
_docs = st.builds(
    PresenceDocument,
    _text.filter(bool),
    st.lists(_tuples, max_size=3).map(tuple),
    st.lists(_persons, max_size=2).map(tuple),
    _notes,
)


@settings(max_examples=200, deadline=None)
@given(_docs)
def test_encode_decode_round_trip(doc: PresenceDocument) -> None:
    # Contact and priority travel together in PIDF: a priority without contact has no place.
    tuples = tuple(t if t.contact is not None else replace(t, priority=None) for t in doc.tuples)
    doc = replace(doc, tuples=tuples)
    assert pidf.decode(pidf.encode(doc), CT) == doc


@pytest.mark.parametrize("ext", [Extension("urn:a", "bad name"), Extension("", "ok")])
def test_encode_refuses_unwritable_extensions(ext: Extension) -> None:
    doc = PresenceDocument("sip:a@b", (), (Person("p", extensions=(ext,)),))
    with pytest.raises(ValueError):
        pidf.encode(doc)
