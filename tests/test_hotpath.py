"""The hot-path short cuts of sipside agree with the general code they stand in for.

Each fast path (simple Via and name-addr shapes, the header index, the header size bound, the
remembered next deadline, the stamped Via, the generated frozen-dataclass ``__init__``) is
checked against the general computation on generated input.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import FrozenInstanceError, dataclass, field, fields, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipside import headers as h
from sipside import message as m
from sipside.errors import LocalError, PeerError
from sipside.fastpath import fast_frozen_init
from sipside.headers import NameAddr, Via
from sipside.message import SipRequest, SipResponse, parse_message
from sipside.peer import Peer
from sipside.transaction import (
    ClientKey,
    ClientTransaction,
    DeliverRequest,
    ServerKey,
    ServerTransaction,
)
from sipside.txlayer import TransactionLayer
from sipside.validate import _header_bytes
from sipside.xmlsafe import MediaType

SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))

PIECES = [
    "SIP/2.0/UDP ", "SIP/2.0/tcp ", "SIP / 2.0 / TLS ", "127.0.0.1", "host.example", "[::1]",
    ":5060", ":70000", ";branch=z9hG4bK", "abc", ";rport", ";received=10.0.0.1", ";BRANCH=x",
    ";tag=", "<sip:alice@sip.test>", "sip:bob@h", '"Al ice"', '"a\\"b"', "Alice ", " ", "\t",
    ";", "=", ",", '"', "<", ">", "@", "é", "%", "*", ";lr", ";a=b=c",
]  # fmt: skip
texts = st.lists(st.sampled_from(PIECES), max_size=10).map("".join)


def outcome(func: Callable[[], Any]) -> Any:
    """The value, or the PeerError's status and warning."""
    try:
        return func()
    except PeerError as exc:
        return ("PeerError", exc.status, exc.warning)


@SETTINGS
@given(texts)
def test_via_fast_path_parses_as_the_general_path(text: str) -> None:
    assert outcome(lambda: Via._parse(text)) == outcome(lambda: Via._parse_general(text))


BRANCH_PIECES = ["z9hG4bK", "abc", "-", ".", "=", ";", " ", '"', "é", "\x00", "\t", ",", "", "<"]
branches = st.lists(st.sampled_from(BRANCH_PIECES), max_size=6).map("".join)


@SETTINGS
@given(texts, texts, branches, branches)
def test_via_of_a_known_shape_parses_as_the_general_path(
    head: str, tail: str, first: str, second: str
) -> None:
    # The first text teaches the parser its shape (when the simple path takes it); the second,
    # the same text with another branch value, must parse as the general path parses it.
    h._VIA_SHAPES.clear()
    known = f"SIP/2.0/UDP 192.0.2.1:5060{head};branch={first}{tail}"
    assert outcome(lambda: Via._parse(known)) == outcome(lambda: Via._parse_general(known))
    text = f"SIP/2.0/UDP 192.0.2.1:5060{head};branch={second}{tail}"
    assert outcome(lambda: Via._parse(text)) == outcome(lambda: Via._parse_general(text))


def test_via_of_a_known_shape_takes_the_short_way() -> None:
    h._VIA_SHAPES.clear()
    first = Via._parse("SIP/2.0/UDP 192.0.2.1:40112;rport=40112;branch=z9hG4bK-1;x")
    assert len(h._VIA_SHAPES) == 1
    via = Via._parse("SIP/2.0/UDP 192.0.2.1:40112;rport=40112;branch=z9hG4bK-2;x")
    assert via == Via(
        "UDP", "192.0.2.1", 40112, (("rport", "40112"), ("branch", "z9hG4bK-2"), ("x", None))
    )
    assert via.branch == "z9hG4bK-2" and first.branch == "z9hG4bK-1"


@SETTINGS
@given(texts)
def test_name_addr_fast_path_parses_as_the_general_path(text: str) -> None:
    stripped = text.strip()
    fast = outcome(lambda: h._parse_name_addr(text))
    assert fast == outcome(lambda: h._parse_name_addr_general(stripped))


@pytest.mark.parametrize(
    "value",
    [
        "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1;rport",
        "SIP/2.0/TCP [2001:db8::1]:5061;branch=z9hG4bKx;received=192.0.2.1;rport=9",
        "SIP/2.0/UDP host.example;branch=z9hG4bKy;ttl=3;maddr=224.0.0.1",
    ],
)
def test_typical_vias_take_the_fast_path_and_round_trip(value: str) -> None:
    assert h._VIA_SIMPLE.fullmatch(value) is not None
    via = Via.parse(value)
    assert str(via) == value
    assert Via._parse_general(value) == via


# --- the header index against a plain scan ---------------------------------------------------

NAMES = [
    *("Via", "v", "VIA", "From", "f", "To", "Call-ID", "i", "CSeq", "Contact", "m", "Route"),
    *("X-Thing", "x-thing", "X-THING", "Require", "Content-Length", "Supported"),
]


def scan_header(req: SipRequest, name: str) -> str | None:
    """RFC 3261 7.3.5 lookup as a scan: the old implementation of ``header``."""
    canon = h.canonical_name(name)
    if canon == "Content-Length":
        return str(len(req.body))
    known = canon in h.KNOWN_HEADERS
    for key, value in req.headers:
        if (key == canon) if known else (key.lower() == canon.lower()):
            return value
    return None


def scan_values(req: SipRequest, name: str) -> list[str]:
    canon = h.canonical_name(name)
    if canon == "Content-Length":
        return [str(len(req.body))]
    known = canon in h.KNOWN_HEADERS
    values = [v for k, v in req.headers if ((k == canon) if known else k.lower() == canon.lower())]
    if canon not in h.LIST_HEADERS:
        return values
    return [item for value in values for item in h.split_list(value) if item]


headers_lists = st.lists(
    st.tuples(st.sampled_from(NAMES), st.sampled_from(["a", "b, c", "SIP/2.0/UDP h", ""])),
    max_size=8,
)


@SETTINGS
@given(headers_lists)
def test_index_lookups_match_a_scan(headers: list[tuple[str, str]]) -> None:
    made = SipRequest("MESSAGE", "sip:a@b", tuple(headers))
    wire = b"MESSAGE sip:a@b SIP/2.0\r\n" + b"".join(
        f"{name}: {value}\r\n".encode() for name, value in headers if name != "Content-Length"
    )
    parsed = outcome(lambda: parse_message(wire + b"\r\n"))
    for req in (made, parsed):
        if not isinstance(req, SipRequest):
            continue
        for name in NAMES:
            assert req.header(name) == scan_header(req, name)
            assert outcome(lambda: req.header_values(name)) == outcome(  # noqa: B023
                lambda: scan_values(req, name)  # noqa: B023
            )


@SETTINGS
@given(
    st.lists(st.sampled_from([*PIECES, "\r\n", "\r\n ", ": ", "Subject", "X-A", "é"]), max_size=30)
)
def test_header_size_bound_is_an_upper_bound(pieces: list[str]) -> None:
    head = "MESSAGE sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP h;branch=z9hG4bK1\r\nSubject: " + "".join(
        pieces
    )
    req = outcome(lambda: parse_message(head.encode() + b"\r\n\r\n"))
    if isinstance(req, SipRequest):
        bound = req.header_bytes_at_most()
        assert bound is not None and bound >= _header_bytes(req)
        stamped = req.with_top_via("SIP/2.0/UDP h;branch=z9hG4bK1;received=192.0.2.77;rport=1")
        stamped_bound = stamped.header_bytes_at_most()
        assert stamped_bound is not None and stamped_bound >= _header_bytes(stamped)


def test_copies_made_in_code_rebuild_the_index() -> None:
    import copy
    import pickle

    req = parse_message(b"MESSAGE sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP h\r\nt: <sip:a@b>\r\n\r\n")
    assert isinstance(req, SipRequest)
    for other in (copy.copy(req), pickle.loads(pickle.dumps(req)), req.add_header("X-A", "1")):
        assert other.header("To") == "<sip:a@b>"
        assert other.header_bytes_at_most() is None


# --- the remembered next deadline against a full scan ----------------------------------------


def brute_next_deadline(layer: TransactionLayer) -> float | None:
    transactions: list[ClientTransaction | ServerTransaction] = [
        *layer._clients.values(),
        *layer._servers.values(),
    ]
    deadlines = [d for tx in transactions if (d := tx.next_deadline()) is not None]
    return min(deadlines, default=None)


def request_bytes(n: int, transport: str = "UDP") -> bytes:
    return (
        f"MESSAGE sip:a@b SIP/2.0\r\nVia: SIP/2.0/{transport} 10.0.0.1:5060;branch=z9hG4bK{n}\r\n"
        f"From: <sip:c@d>;tag={n}\r\nTo: <sip:a@b>\r\nCall-ID: {n}\r\nCSeq: 1 MESSAGE\r\n\r\n"
    ).encode()


operations = st.lists(
    st.tuples(st.sampled_from(["udp", "tcp", "answer", "tick", "client"]), st.floats(0, 40)),
    max_size=40,
)


@SETTINGS
@given(operations)
def test_next_deadline_is_the_earliest_transaction_deadline(ops: list[tuple[str, float]]) -> None:
    layer = TransactionLayer()
    now = 0.0
    pending: list[Any] = []
    numbers = itertools.count()
    for op, step in ops:
        now += step / 10
        match op:
            case "udp" | "tcp":
                source = Peer(op, "10.0.0.1", 5060)
                for effect in layer.receive(
                    parse_message(request_bytes(next(numbers), op.upper())), source, now
                ):
                    if isinstance(effect, DeliverRequest):
                        pending.append(effect)
            case "answer" if pending:
                delivered = pending.pop(0)
                layer.send_response(delivered.key, m.make_response(delivered.request, 200), now)
            case "tick":
                due = layer.next_deadline()
                if due is not None:
                    now = max(now, due)
                    layer.handle_timer(now)
            case "client":
                req = SipRequest(
                    "MESSAGE",
                    "sip:a@b",
                    (("Via", f"SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKc{next(numbers)}"),),
                )
                layer.send_request(req, Peer("udp", "10.0.0.3", 5060), now)
        assert layer.next_deadline() == brute_next_deadline(layer)
    heapq.heapify(layer._heap)  # untouched invariant: the heap stays a heap


# --- the generated __init__ ------------------------------------------------------------------


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class Sample:
    a: int
    b: str = "x"
    c: tuple[int, ...] = ()
    d: int | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "d", self.a * 2)


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((1,), {}, (1, "x", (), 2)),
        ((2, "y"), {}, (2, "y", (), 4)),
        ((3,), {"c": (1,)}, (3, "x", (1,), 6)),
        ((), {"a": 4, "b": "z"}, (4, "z", (), 8)),
    ],
)
def test_fast_frozen_init_keeps_the_dataclass_contract(
    args: tuple[Any, ...], kwargs: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    sample = Sample(*args, **kwargs)
    assert (sample.a, sample.b, sample.c, sample.d) == expected
    assert sample == Sample(*args, **kwargs)
    with pytest.raises(FrozenInstanceError):
        sample.a = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        Sample()  # type: ignore[call-arg]


def test_fast_frozen_init_refuses_an_own_init_that_does_not_take_the_fields() -> None:
    # A hot class writes its __init__ out for the compiler; the pure-Python one replaces it and
    # must take the same parameters, or the two builds would disagree.
    with pytest.raises(LocalError, match="does not take the fields"):

        @fast_frozen_init
        @dataclass(frozen=True, slots=True, init=False)
        class Drifted:
            a: int
            b: str = "x"

            def __init__(self, a: int, b: str = "y") -> None:
                object.__setattr__(self, "a", a)
                object.__setattr__(self, "b", b)


@pytest.mark.parametrize(
    ("cls", "args"),
    [
        (Via, ("UDP", "h", 5060, (("branch", "z9hG4bK1"), ("rport", None)))),
        (NameAddr, (None, "sip:a@b", (("tag", "t"),))),
        (SipRequest, ("MESSAGE", "sip:a@b", (("Call-ID", "c"),), b"hi")),
        (SipResponse, (202, "Accepted", (("Call-ID", "c"),), b"")),
        (Peer, ("udp", "127.0.0.1", 5060)),
        (ServerKey, ("z9hG4bK1", "h", None, "MESSAGE")),
        (ClientKey, ("z9hG4bK1", "MESSAGE")),
        (MediaType, ("text/plain", (("charset", "utf-8"),))),
    ],
)
def test_the_hot_classes_own_inits_keep_the_dataclass_contract(
    cls: type[Any], args: tuple[Any, ...]
) -> None:
    # Compiled or not (CI runs this file both ways): fields set, equal and hashed by value,
    # frozen, and replace() goes through the same constructor.
    one, two = cls(*args), cls(*args)
    assert [getattr(one, f.name) for f in fields(one) if f.init] == list(args)
    assert one == two and hash(one) == hash(two)
    with pytest.raises(FrozenInstanceError):
        setattr(one, fields(one)[0].name, None)
    assert replace(one) == one
    if cls is Via:
        assert one.branch == "z9hG4bK1"
        assert replace(one, params=()).branch is None


def test_fast_frozen_init_refuses_default_factory() -> None:
    with pytest.raises(LocalError):

        @fast_frozen_init
        @dataclass(frozen=True, slots=True)
        class Bad:
            items: list[int] = field(default_factory=list)
