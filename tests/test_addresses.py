"""Address mapping (DESIGN 3): the spec's examples, refusals, and hypothesis round trips."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slixmpp.jid import JID
from slixmpp.stringprep import StringprepError, nodeprep, resourceprep

from component.addresses import (
    AddressBook,
    AddressError,
    HomeUser,
    Registrar,
    Target,
    XmppTarget,
    bare_jid,
    parse_jid,
)
from component.errors import Refusal
from component.settings import Settings
from component.sip.answers import refusal_headers
from sipside.errors import PeerError
from sipside.validate import check_sip_uri

BOOK = AddressBook.from_settings(Settings())
COMPONENT, HOME, JDOMAIN, ALIAS = "sip.xmpp.test", "sip.test", "jabber.sip.test", "irc.xmpp.test"


def test_book_from_settings() -> None:
    assert (BOOK.component, BOOK.sip_domain, BOOK.jdomain, BOOK.delimiter) == (
        COMPONENT,
        HOME,
        JDOMAIN,
        "*",
    )
    assert BOOK.aliases == ((ALIAS, "%"),)
    assert BOOK.registrar == "sip:jabber_gateway@sip.test"


# --- DESIGN 3 examples --------------------------------------------------------------------------

SIP_TO_JID = [
    ("sip:alice@sip.test", "alice@sip.xmpp.test"),
    ("sip:alice@other.org", "alice%other.org@sip.xmpp.test"),
    ("sips:alice@sip.test;transport=tls", "alice@sip.xmpp.test"),
    ("<sip:alice@sip.test>", "alice@sip.xmpp.test"),
    ('"Alice A." <sip:alice@sip.test;transport=tcp>;tag=9f2', "alice@sip.xmpp.test"),
    ("sip:alice:pw@sip.test:5061;lr?subject=x", "alice@sip.xmpp.test"),
    ("SIP:Alice@SIP.TEST", "alice@sip.xmpp.test"),
    ("sip:+4930123@sip.test", "+4930123@sip.xmpp.test"),
    ("sip:alice@192.0.2.1", "alice%192.0.2.1@sip.xmpp.test"),
    ("sip:a%25b@sip.test", "a%b%sip.test@sip.xmpp.test"),
    ("sip:j%C3%BCrgen@sip.test", "jürgen@sip.xmpp.test"),
    ("sip:a*b@sip.test", "a*b@sip.xmpp.test"),
]


@pytest.mark.parametrize(("uri", "jid"), SIP_TO_JID)
def test_jid_for_sip_uri(uri: str, jid: str) -> None:
    assert BOOK.jid_for_sip_uri(uri) == jid


COMPONENT_JID_TO_SIP = [
    ("alice@sip.xmpp.test", "sip:alice@sip.test"),
    ("alice@sip.xmpp.test/sip", "sip:alice@sip.test"),
    ("alice%other.org@sip.xmpp.test", "sip:alice@other.org"),
    ("alice\\40other.org@sip.xmpp.test", "sip:alice@other.org"),
    ("alice%sip.test@sip.xmpp.test", "sip:alice@sip.test"),
    ("a%b%sip.test@sip.xmpp.test", "sip:a%25b@sip.test"),
    ("jürgen@sip.xmpp.test", "sip:j%C3%BCrgen@sip.test"),
    ("Alice@SIP.xmpp.test", "sip:alice@sip.test"),
]


@pytest.mark.parametrize(("jid", "uri"), COMPONENT_JID_TO_SIP)
def test_sip_uri_for_component_jid(jid: str, uri: str) -> None:
    assert BOOK.sip_uri_for_component_jid(jid) == uri


JID_TO_SIP = [
    ("bob@xmpp.test", False, "sip:bob*xmpp.test@jabber.sip.test"),
    ("bob@xmpp.test/phone", False, "sip:bob*xmpp.test@jabber.sip.test"),
    ("room@conference.xmpp.test", False, "sip:room*conference.xmpp.test@jabber.sip.test"),
    (
        "room@conference.xmpp.test/nick",
        True,
        "sip:nick*room*conference.xmpp.test@jabber.sip.test",
    ),
    (
        "room@conference.xmpp.test/big nick",
        True,
        "sip:big%20nick*room*conference.xmpp.test@jabber.sip.test",
    ),
    ("room@conference.xmpp.test/a*b", True, "sip:a*b*room*conference.xmpp.test@jabber.sip.test"),
    # "#" is not a SIP user character (RFC 3261 25.1): escaped on output.
    ("#chan%irc.example.net@irc.xmpp.test", False, "sip:%23chan*irc.example.net@irc.xmpp.test"),
    ("12345@irc.xmpp.test", False, "sip:12345@irc.xmpp.test"),
    # No alias form (empty piece): the jdomain form still reaches it.
    ("x%%y@irc.xmpp.test", False, "sip:x%25%25y*irc.xmpp.test@jabber.sip.test"),
    ("xmpp.test", False, "sip:xmpp.test@jabber.sip.test"),
    ("alice@sip.xmpp.test/sip", False, "sip:alice@sip.test"),
    ("BOB@Xmpp.Test", False, "sip:bob*xmpp.test@jabber.sip.test"),
]


@pytest.mark.parametrize(("jid", "occupant", "uri"), JID_TO_SIP)
def test_sip_uri_for_jid(jid: str, occupant: bool, uri: str) -> None:
    assert BOOK.sip_uri_for_jid(jid, occupant=occupant) == uri


TARGETS = [
    ("sip:bob*xmpp.test@jabber.sip.test", XmppTarget("bob@xmpp.test")),
    ("sip:Bob*XMPP.test@JABBER.sip.test;transport=tcp", XmppTarget("bob@xmpp.test")),
    # RFC 3261 19.1.4: an escaped unreserved character is the same character.
    ("sip:bob%2Axmpp.test@jabber.sip.test", XmppTarget("bob@xmpp.test")),
    ("sip:xmpp.test@jabber.sip.test", XmppTarget("xmpp.test")),
    (
        "sip:nick*room*conference.xmpp.test@jabber.sip.test",
        XmppTarget("room@conference.xmpp.test", nick="nick"),
    ),
    (
        "sip:a*b*room*conference.xmpp.test@jabber.sip.test",
        XmppTarget("room@conference.xmpp.test", nick="a*b"),
    ),
    (
        "sip:*room*conference.xmpp.test@jabber.sip.test",
        XmppTarget("room@conference.xmpp.test", nick=""),
    ),
    (
        "sip:#chan*irc.example.net@irc.xmpp.test",
        XmppTarget("#chan%irc.example.net@irc.xmpp.test", transport=ALIAS),
    ),
    (
        "sip:%23chan*irc.example.net@irc.xmpp.test",
        XmppTarget("#chan%irc.example.net@irc.xmpp.test", transport=ALIAS),
    ),
    ("sip:12345@irc.xmpp.test", XmppTarget("12345@irc.xmpp.test", transport=ALIAS)),
]


@pytest.mark.parametrize(("uri", "target"), TARGETS)
def test_xmpp_target_for_sip_uri(uri: str, target: XmppTarget) -> None:
    assert BOOK.xmpp_target_for_sip_uri(uri) == target
    assert BOOK.classify_request_uri(uri) == target


def test_occupant_full_jid() -> None:
    target = BOOK.xmpp_target_for_sip_uri("sip:nick*room*conf.test@jabber.sip.test")
    assert target.full_jid == "room@conf.test/nick"
    assert XmppTarget("bob@xmpp.test").full_jid == "bob@xmpp.test"


CLASSIFY = [
    ("sip:jabber_gateway@sip.test", Registrar("sip:jabber_gateway@sip.test")),
    ("sip:jabber_gateway@SIP.test;transport=udp", Registrar("sip:jabber_gateway@sip.test")),
    ("sip:alice@sip.test", HomeUser("sip:alice@sip.test", "alice@sip.xmpp.test")),
    ("sip:Alice@sip.test:5060", HomeUser("sip:alice@sip.test", "alice@sip.xmpp.test")),
    ("sip:bob*xmpp.test@jabber.sip.test", XmppTarget("bob@xmpp.test")),
]


@pytest.mark.parametrize(("uri", "target"), CLASSIFY)
def test_classify_request_uri(uri: str, target: Target) -> None:
    assert BOOK.classify_request_uri(uri) == target


def test_seed_example_with_other_delimiters() -> None:
    # Seed 1.5.5: jdomain 'jabber.x.com=*', alias 'msn.x.com=%'.
    seed = Settings.model_validate(
        {
            "xmpp": {"component": "sip.x.com"},
            "sip": {"domain": "x.com", "jdomain": "jabber.x.com=*", "aliases": "1;msn.x.com=%"},
        }
    )
    book = AddressBook.from_settings(seed)
    target = book.xmpp_target_for_sip_uri("sip:username*hotmail.com@msn.x.com")
    assert target.jid == "username%hotmail.com@msn.x.com"
    bang = AddressBook("c.test", "s.test", "j.test", "!", (("irc.test", "%"),))
    assert bang.sip_uri_for_jid("a*b@x.test") == "sip:a*b!x.test@j.test"
    assert bang.xmpp_target_for_sip_uri("sip:#c!irc.net@irc.test").jid == "#c%irc.net@irc.test"


# --- refusals -----------------------------------------------------------------------------------

LONG = "a" * 1024
ERRORS: list[tuple[str, str, int, str]] = [
    ("jid", "tel:+4930123", 416, "jid-malformed"),
    ("jid", "mailto:alice@sip.test", 416, "jid-malformed"),
    ("jid", "", 400, "jid-malformed"),
    ("jid", "alice@sip.test", 400, "jid-malformed"),
    ("jid", "sip:sip.test", 400, "jid-malformed"),
    ("jid", "sip:@sip.test", 400, "jid-malformed"),
    ("jid", "sip:a%00b@sip.test", 400, "jid-malformed"),
    ("jid", "sip:a%zzb@sip.test", 400, "jid-malformed"),
    ("jid", "sip:a%C3@sip.test", 400, "jid-malformed"),
    ("jid", "sip:a%0Ab@sip.test", 400, "jid-malformed"),
    ("jid", "sip:a%20b@sip.test", 400, "jid-malformed"),
    ("jid", "sip:a%22b@sip.test", 400, "jid-malformed"),
    ("jid", "sip:o'brien@sip.test", 400, "jid-malformed"),
    ("jid", "sip:a%5Cb@sip.test", 400, "jid-malformed"),
    ("jid", f"sip:{LONG}@sip.test", 400, "jid-malformed"),
    ("jid", "sip:alice@[2001:db8::1]", 400, "jid-malformed"),
    ("jid", "sip:alice@bad_host", 400, "jid-malformed"),
    ("jid", "sip:bob*xmpp.test@jabber.sip.test", 403, "forbidden"),
    ("jid", "sip:x@irc.xmpp.test", 403, "forbidden"),
    ("target", "sip:bob@sip.test", 404, "item-not-found"),
    ("target", "sip:jabber.sip.test", 404, "item-not-found"),
    ("target", "sip:*xmpp.test@jabber.sip.test", 400, "jid-malformed"),
    ("target", "sip:bob*@jabber.sip.test", 400, "jid-malformed"),
    ("target", "sip:nick**conf.test@jabber.sip.test", 400, "jid-malformed"),
    ("target", "sip:nick*room*@jabber.sip.test", 400, "jid-malformed"),
    ("target", "sip:a%40b*xmpp.test@jabber.sip.test", 400, "jid-malformed"),
    ("target", "sip:a%00*xmpp.test@jabber.sip.test", 400, "jid-malformed"),
    ("target", f"sip:{LONG}*xmpp.test@jabber.sip.test", 400, "jid-malformed"),
    ("target", f"sip:{LONG}*room*conf.test@jabber.sip.test", 400, "jid-malformed"),
    ("target", "sip:bob*bad..domain@jabber.sip.test", 400, "jid-malformed"),
    ("target", "sip:a**b@irc.xmpp.test", 400, "jid-malformed"),
    ("target", "sip:*chan@irc.xmpp.test", 400, "jid-malformed"),
    ("target", "sip:a%25b@irc.xmpp.test", 400, "jid-malformed"),
    ("target", "sip:a%2Fb@jabber.sip.test", 400, "jid-malformed"),
    ("target", "sip:bob*sip.xmpp.test@jabber.sip.test", 403, "forbidden"),
    ("classify", "sip:alice@evil.test", 403, "forbidden"),
    ("classify", "sip:sip.test", 404, "item-not-found"),
    ("classify", "tel:+4930123", 416, "jid-malformed"),
    ("jid->sip", "not@a@jid", 400, "jid-malformed"),
    ("jid->sip", "a*b@xmpp.test", 400, "jid-malformed"),
    ("jid->sip", "a*b%c@irc.xmpp.test", 400, "jid-malformed"),
    ("occupant->sip", "room@conf.test", 400, "jid-malformed"),
    ("occupant->sip", "conf.test/nick", 400, "jid-malformed"),
    ("occupant->sip", "a*b@conf.test/nick", 400, "jid-malformed"),
    ("component->sip", "alice@other.test", 404, "item-not-found"),
    ("component->sip", "sip.xmpp.test", 404, "item-not-found"),
    ("component->sip", "%other.org@sip.xmpp.test", 400, "jid-malformed"),
    ("component->sip", "alice%bad_host@sip.xmpp.test", 404, "item-not-found"),
    ("component->sip", "alice%jabber.sip.test@sip.xmpp.test", 403, "forbidden"),
    ("component->sip", "a\\20b\\40other.org@sip.xmpp.test", 400, "jid-malformed"),
]

CALLS: dict[str, Callable[[str], object]] = {
    "jid": BOOK.jid_for_sip_uri,
    "target": BOOK.xmpp_target_for_sip_uri,
    "classify": BOOK.classify_request_uri,
    "jid->sip": BOOK.sip_uri_for_jid,
    "occupant->sip": lambda jid: BOOK.sip_uri_for_jid(jid, occupant=True),
    "component->sip": BOOK.sip_uri_for_component_jid,
}


@pytest.mark.parametrize(("call", "value", "status", "condition"), ERRORS)
def test_refusals(call: str, value: str, status: int, condition: str) -> None:
    with pytest.raises(AddressError) as caught:
        CALLS[call](value)
    error = caught.value
    assert (error.sip_status, error.xmpp_condition) == (status, condition)
    assert error.sip_reason and error.text
    # Both edges answer any Refusal: no special case for addresses.
    assert isinstance(error, Refusal) and not isinstance(error, PeerError)
    assert error.xmpp_type == "modify"
    sip_status, _, headers = refusal_headers(error)
    assert sip_status == status and headers[0][0] == "Warning"


# --- round trips (DESIGN 3.4) -------------------------------------------------------------------

# Letters, digits, JID-legal punctuation, a few JID-illegal ones, non-ASCII and the delimiters.
_CHARS = st.sampled_from(
    list("abcxyz019") + list("+-_.!~()=,;?$#%*[]{}^|") + list(" @:/&'\"<>\\") + list("éüßÅ中ω")
)
_TEXT = st.text(_CHARS, min_size=1, max_size=12)
_DOMAINS = st.sampled_from(["xmpp.test", "example.org", "conference.xmpp.test", "bücher.example"])


def _nodeprep_stable(text: str) -> bool:
    try:
        return bool(nodeprep(text) == text)  # type: ignore[no-untyped-call]
    except StringprepError:
        return False


def _resourceprep_stable(text: str) -> bool:
    try:
        return bool(resourceprep(text) == text)  # type: ignore[no-untyped-call]
    except StringprepError:
        return False


def _user_of(uri: str) -> str:
    return urllib.parse.unquote(uri.partition(":")[2].rpartition("@")[0])


_RFC3261_USER = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,;?/]|%[0-9A-Fa-f]{2})+")  # 25.1


def _assert_sip_layer_keeps(uri: str) -> None:
    # Our URIs pass the SIP side's own checks, and their user part is RFC 3261 grammar.
    check_sip_uri(uri, request_uri=True)
    assert _RFC3261_USER.fullmatch(uri.partition(":")[2].rpartition("@")[0])


@settings(deadline=None)  # shared CI cores: timing is not the property
@given(user=_TEXT, host=st.sampled_from([HOME, "other.org", "192.0.2.7", "x-1.example"]))
def test_sip_user_round_trip(user: str, host: str) -> None:
    uri = f"sip:{urllib.parse.quote(user, safe='')}@{host}"
    representable = _nodeprep_stable(user) and "\\" not in user
    try:
        jid = BOOK.jid_for_sip_uri(uri)
    except AddressError:
        assert not representable
        return
    assert JID(jid).domain == COMPONENT
    back = BOOK.sip_uri_for_component_jid(jid)
    assert BOOK.jid_for_sip_uri(back) == jid
    _assert_sip_layer_keeps(back)
    if representable:
        assert (_user_of(back), back.rpartition("@")[2]) == (user, host)
        if host != HOME and "%" not in user:
            # XEP-0106 form of the same address (DESIGN 3.1).
            escaped = f"{user}\\40{host}@{COMPONENT}"
            assert BOOK.sip_uri_for_component_jid(escaped) == back


@settings(deadline=None)  # shared CI cores: timing is not the property
@given(local=_TEXT, domain=_DOMAINS)
def test_xmpp_entity_round_trip(local: str, domain: str) -> None:
    jid = f"{local}@{domain}"
    representable = _nodeprep_stable(local) and "*" not in local
    try:
        uri = BOOK.sip_uri_for_jid(jid)
    except AddressError:
        assert not representable
        return
    _assert_sip_layer_keeps(uri)
    target = BOOK.xmpp_target_for_sip_uri(uri)
    assert target == XmppTarget(str(JID(jid).bare))
    assert BOOK.sip_uri_for_jid(target.jid) == uri
    if representable:
        assert target.jid == jid


@settings(deadline=None)  # shared CI cores: timing is not the property
@given(room=_TEXT, nick=_TEXT, service=_DOMAINS)
def test_occupant_round_trip(room: str, nick: str, service: str) -> None:
    occupant = f"{room}@{service}/{nick}"
    representable = _nodeprep_stable(room) and "*" not in room and _resourceprep_stable(nick)
    try:
        uri = BOOK.sip_uri_for_jid(occupant, occupant=True)
    except AddressError:
        assert not representable
        return
    _assert_sip_layer_keeps(uri)
    target = BOOK.xmpp_target_for_sip_uri(uri)
    assert target.full_jid == str(JID(occupant).full)
    assert BOOK.sip_uri_for_jid(target.full_jid, occupant=True) == uri
    if representable:
        assert (target.jid, target.nick) == (f"{room}@{service}", nick)


@settings(deadline=None)  # shared CI cores: timing is not the property
@given(pieces=st.lists(_TEXT, min_size=1, max_size=3))
def test_alias_transport_round_trip(pieces: list[str]) -> None:
    local = "%".join(pieces)
    jid = f"{local}@{ALIAS}"
    representable = _nodeprep_stable(local) and "*" not in local and "" not in local.split("%")
    try:
        uri = BOOK.sip_uri_for_jid(jid)
    except AddressError:
        assert not representable
        return
    _assert_sip_layer_keeps(uri)
    target = BOOK.xmpp_target_for_sip_uri(uri)
    assert target.full_jid == str(JID(jid).bare)
    assert BOOK.sip_uri_for_jid(target.jid) == uri  # replies come back to the same URI
    if representable:
        assert uri.endswith(f"@{ALIAS}")
        assert target == XmppTarget(jid, transport=ALIAS)


_NOISE = st.lists(
    st.sampled_from([*"ab*%0AF9@:;?#[]<>/\\ .-\x00é", "%00", "%zz", "%C3", "%2A", "%40"]),
    max_size=20,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=_NOISE | st.text(max_size=30))
def test_mapping_is_total(text: str) -> None:
    """Any input gives a result or an AddressError, never another exception or a bad JID."""
    sip_inputs = [
        text,
        f"sip:{text}",
        f"sip:{text}@{JDOMAIN}",
        f"sip:{text}@{ALIAS}",
        f"sip:{text}@{HOME}",
        f"sip:a@{text}",
    ]
    for uri in sip_inputs:
        for call in ("jid", "target", "classify"):
            try:
                result = CALLS[call](uri)
            except AddressError:
                continue
            # Whatever is accepted maps back: replies reach the original (DESIGN 3.4).
            if isinstance(result, str):
                assert JID(result).domain == COMPONENT
                back = BOOK.sip_uri_for_component_jid(result)
                assert BOOK.jid_for_sip_uri(back) == result
            elif isinstance(result, XmppTarget) and result.nick != "":
                assert JID(result.full_jid).full == result.full_jid
                reply = BOOK.sip_uri_for_jid(result.full_jid, occupant=bool(result.nick))
                assert BOOK.xmpp_target_for_sip_uri(reply).full_jid == result.full_jid
    jid_inputs = [
        text,
        f"{text}@{COMPONENT}",
        f"{text}@xmpp.test",
        f"room@conf.test/{text}",
        f"{text}@{ALIAS}",
    ]
    for jid in jid_inputs:
        for call in ("jid->sip", "occupant->sip", "component->sip"):
            try:
                mapped = CALLS[call](jid)
            except AddressError:
                continue
            assert isinstance(mapped, str)
            _assert_sip_layer_keeps(mapped)  # every URI we hand out is valid SIP


def test_mapping_is_cached() -> None:
    # These run per message; a repeated address must not be parsed again.
    from component import addresses

    BOOK.jid_for_sip_uri("sip:carol@sip.test")
    hits = addresses._jid_for_sip_uri.cache_info().hits
    BOOK.jid_for_sip_uri("sip:carol@sip.test")
    assert addresses._jid_for_sip_uri.cache_info().hits == hits + 1


# --- the one JID validator and bare-JID helper ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "full", "bare"),
    [
        ("Alice@SIP.xmpp.test/sip", "alice@sip.xmpp.test/sip", "alice@sip.xmpp.test"),
        ("sip.xmpp.test", "sip.xmpp.test", "sip.xmpp.test"),
        ("room@conf.xmpp.test/a/b", "room@conf.xmpp.test/a/b", "room@conf.xmpp.test"),
    ],
)
def test_parse_jid_canonicalises(text: str, full: str, bare: str) -> None:
    jid = parse_jid(text)
    assert (jid.full, jid.bare) == (full, bare)
    assert bare_jid(jid.full) == bare


@pytest.mark.parametrize(
    "text", ["", "a@b@c", "user@", "bob@xmpp.test/\x01", "x" * 1024 + "@x.test"]
)
def test_parse_jid_refuses_with_jid_malformed(text: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_jid(text)
    assert (caught.value.sip_status, caught.value.xmpp_condition) == (400, "jid-malformed")


def test_jid_for_sip_uri_once_maps_the_same_and_leaves_the_caches() -> None:
    from component import addresses

    caches = [getattr(addresses, name) for name in addresses._CACHED_ON_THE_WAY]
    uris = ["sip:once1@sip.test", "sip:once2@example.org", "sip:Once%C3%A93@sip.test"]
    sizes = [cache.cache_info().currsize for cache in caches]
    once = [BOOK.jid_for_sip_uri_once(uri) for uri in uris]
    assert [cache.cache_info().currsize for cache in caches] == sizes
    assert [getattr(addresses, name) for name in addresses._CACHED_ON_THE_WAY] == caches
    assert once == [BOOK.jid_for_sip_uri(uri) for uri in uris]
    with pytest.raises(AddressError):
        BOOK.jid_for_sip_uri_once("sip:nobody@" + BOOK.jdomain)
    assert [getattr(addresses, name) for name in addresses._CACHED_ON_THE_WAY] == caches
