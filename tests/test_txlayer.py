"""The transaction layer: matching (RFC 3261 17.1.3, 17.2.3), merged requests, response routing,
timers over many transactions, and two layers talking over a lossy in-memory network."""

from __future__ import annotations

import pytest

from sipside.errors import LocalError, PeerError, TransportError
from sipside.message import SipRequest, SipResponse, make_response, parse_message
from sipside.peer import Peer
from sipside.timers import TimerConfig
from sipside.transaction import ClientKey, LegacyServerKey, ServerKey
from sipside.txlayer import (
    DeliverRequest,
    DeliverResponse,
    Discarded,
    Effect,
    Failed,
    Stray,
    Terminated,
    TransactionLayer,
    Transmit,
)

SOURCE = Peer("udp", "192.0.2.1", 5060)
GATEWAY = Peer("udp", "192.0.2.99", 5070)


def req(
    *,
    method: str = "MESSAGE",
    branch: str | None = "z9hG4bK-1",
    sent_by: str = "192.0.2.1:5060",
    transport: str = "UDP",
    via_params: str = "",
    uri: str = "sip:bob@example.org",
    to_tag: str | None = None,
    from_tag: str = "a1",
    call_id: str = "call-1",
    cseq: int = 1,
) -> SipRequest:
    branch_param = f";branch={branch}" if branch is not None else ""
    return SipRequest(
        method,
        uri,
        (
            ("Via", f"SIP/2.0/{transport} {sent_by}{branch_param}{via_params}"),
            ("Via", "SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bK-lower"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:alice@example.org>;tag={from_tag}"),
            ("To", "<sip:bob@example.org>" + (f";tag={to_tag}" if to_tag else "")),
            ("Call-ID", call_id),
            ("CSeq", f"{cseq} {method}"),
        ),
        b"hi" if method == "MESSAGE" else b"",
    )


def kinds(effects: list[Effect]) -> list[str]:
    """A compact picture of an effect list: 'deliver', 'send 200', 'stray', ..."""
    out = []
    for effect in effects:
        match effect:
            case Transmit(data=data):
                message = parse_message(data)
                out.append(f"send {message.status}" if isinstance(message, SipResponse) else "send")
            case _:
                out.append(type(effect).__name__.lower())
    return out


def delivered(effects: list[Effect]) -> DeliverRequest:
    [effect] = [e for e in effects if isinstance(e, DeliverRequest)]
    return effect


# --- server matching (RFC 3261 17.2.3) --------------------------------------------------------

# Each case: (first request, second request, is the second the same transaction?)
MATCHING = {
    "identical retransmission": (req(), req(), True),
    "Call-ID is not part of the RFC 3261 key": (req(), req(call_id="other"), True),
    "sent-by host compared case-insensitively": (
        req(sent_by="UA.example:5060"),
        req(sent_by="ua.EXAMPLE:5060"),
        True,
    ),
    "same branch, other method": (req(), req(method="OPTIONS"), False),
    "same branch, other sent-by port": (req(), req(sent_by="192.0.2.1:5062"), False),
    "same branch, other sent-by host": (req(), req(sent_by="192.0.2.2:5060"), False),
    "other branch": (req(), req(branch="z9hG4bK-2"), False),
    # RFC 2543 fallback (no magic cookie): Request-URI, To tag, From tag, Call-ID, CSeq, top Via.
    "2543 identical": (req(branch="1234"), req(branch="1234"), True),
    "2543 without branch": (req(branch=None), req(branch=None), True),
    "2543 other CSeq number": (req(branch=None), req(branch=None, cseq=2), False),
    "2543 other From tag": (req(branch=None), req(branch=None, from_tag="a2"), False),
    "2543 other To tag": (req(branch=None), req(branch=None, to_tag="b9"), False),
    "2543 other Call-ID": (req(branch=None), req(branch=None, call_id="other"), False),
    "2543 other Request-URI": (req(branch=None), req(branch=None, uri="sip:carol@x.org"), False),
    "2543 other top Via": (req(branch="1234"), req(branch="1235"), False),
}


@pytest.mark.parametrize("name", MATCHING)
def test_server_matching(name: str) -> None:
    first, second, same = MATCHING[name]
    # In-dialog requests (with To tag) skip the merged-request check; test matching alone.
    if first.to_tag is None and second.to_tag is None:
        first = first.replace_headers("To", ["<sip:bob@example.org>;tag=t"])
        second = second.replace_headers("To", ["<sip:bob@example.org>;tag=t"])
    layer = TransactionLayer()
    assert kinds(layer.receive(first, SOURCE, 0.0)) == ["deliverrequest"]
    effects = layer.receive(second, SOURCE, 0.1)
    assert kinds(effects) == ([] if same else ["deliverrequest"])
    assert layer.server_count == (1 if same else 2)


def test_retransmission_gets_cached_response_and_application_sees_request_once() -> None:
    layer = TransactionLayer()
    request = req()
    key = delivered(layer.receive(request, SOURCE, 0.0)).key
    assert isinstance(key, ServerKey)
    assert layer.receive(request, SOURCE, 0.5) == []  # Trying: absorbed
    response = make_response(request, 202, to_tag="g1")
    [sent] = layer.send_response(key, response, 1.0)
    assert sent == Transmit(bytes(response), SOURCE, key)
    for at in (1.5, 3.5, 7.5):
        assert layer.receive(request, SOURCE, at) == [sent]
    assert layer.handle_timer(32.9) == []
    assert layer.handle_timer(33.0) == [Terminated(key)]
    assert layer.server_count == 0
    # After Timer J the same request is a new transaction again.
    assert kinds(layer.receive(request, SOURCE, 34.0)) == ["deliverrequest"]


def test_legacy_key_is_used_without_magic_cookie() -> None:
    layer = TransactionLayer()
    effects = layer.receive(req(branch="old-2543-branch"), SOURCE, 0.0)
    key = delivered(effects).key
    assert key == LegacyServerKey(
        "sip:bob@example.org",
        None,
        "a1",
        "call-1",
        1,
        "MESSAGE",
        "SIP/2.0/UDP 192.0.2.1:5060;branch=old-2543-branch",
    )


def test_ack_gets_no_transaction_and_no_response() -> None:
    layer = TransactionLayer()
    effects = layer.receive(req(method="ACK"), SOURCE, 0.0)
    assert kinds(effects) == ["stray"]
    assert layer.server_count == 0 and layer.next_deadline() is None


def test_request_without_via_is_a_peer_error() -> None:
    request = SipRequest("MESSAGE", "sip:bob@example.org", req().headers[2:])
    with pytest.raises(PeerError) as caught:
        TransactionLayer().receive(request, SOURCE, 0.0)
    assert caught.value.status == 400


# --- merged requests (RFC 3261 8.2.2.2) --------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_merged_request_gets_482_and_is_not_delivered(transport: str) -> None:
    layer = TransactionLayer()
    source = Peer(transport, "192.0.2.1", 5060)
    via = transport.upper()
    assert kinds(layer.receive(req(transport=via), source, 0.0)) == ["deliverrequest"]
    merged = req(transport=via, branch="z9hG4bK-forked", sent_by="198.51.100.7:5060")
    effects = layer.receive(merged, source, 0.2)
    assert kinds(effects) == ["stray", "send 482"] + (["terminated"] if transport == "tcp" else [])
    [transmit] = [e for e in effects if isinstance(e, Transmit)]
    response = parse_message(transmit.data)
    assert isinstance(response, SipResponse)
    assert response.to_tag is not None  # RFC 3261 8.2.6.2: a final response carries a To tag
    assert response.vias[0].branch == "z9hG4bK-forked"
    if transport == "udp":
        # Its retransmission matches the 482 transaction and gets the 482 again.
        assert layer.receive(merged, source, 0.7) == [transmit]


@pytest.mark.parametrize(
    "second",
    [
        req(branch="z9hG4bK-2", to_tag="in-dialog"),  # has a To tag: no merge check
        req(branch="z9hG4bK-2", cseq=2),
        req(branch="z9hG4bK-2", from_tag="a2"),
        req(branch="z9hG4bK-2", call_id="call-2"),
    ],
)
def test_not_merged_when_anything_differs(second: SipRequest) -> None:
    layer = TransactionLayer()
    layer.receive(req(), SOURCE, 0.0)
    assert kinds(layer.receive(second, SOURCE, 0.1)) == ["deliverrequest"]


def test_merge_index_is_released_with_the_transaction() -> None:
    layer = TransactionLayer()
    key = delivered(layer.receive(req(), SOURCE, 0.0)).key
    layer.send_response(key, make_response(req(), 200, to_tag="x"), 0.1)
    assert kinds(layer.receive(req(branch="z9hG4bK-2"), SOURCE, 1.0)) == ["stray", "send 482"]
    layer.handle_timer(40.0)
    assert layer.server_count == 0
    assert kinds(layer.receive(req(branch="z9hG4bK-3"), SOURCE, 41.0)) == ["deliverrequest"]


# --- where responses go (RFC 3261 18.2.1, 18.2.2; RFC 3581) ------------------------------------

# (transport, top Via sent-by and params, source, expected response peer, expected top Via params)
ROUTING = {
    "udp plain": ("udp", "192.0.2.1:5060", "", ("192.0.2.1", 5060), (("branch", "z9hG4bK-1"),)),
    "udp rport": (
        "udp",
        "192.0.2.1:5060;rport",
        "",
        ("192.0.2.1", 40000),
        (("branch", "z9hG4bK-1"), ("received", "192.0.2.1"), ("rport", "40000")),
    ),
    "udp host name sent-by": (
        "udp",
        "ua.example.org:5070",
        "",
        ("198.51.100.7", 5070),
        (("branch", "z9hG4bK-1"), ("received", "198.51.100.7")),
    ),
    "udp default port": ("udp", "192.0.2.1", "", ("192.0.2.1", 5060), (("branch", "z9hG4bK-1"),)),
    "udp forged received": (
        "udp",
        "192.0.2.1:5060",
        ";received=203.0.113.66",
        ("192.0.2.1", 5060),
        (("branch", "z9hG4bK-1"), ("received", "192.0.2.1")),
    ),
    "udp ipv6": (
        "udp",
        "[2001:db8::1]:5060",
        "",
        ("2001:db8::1", 5060),
        (("branch", "z9hG4bK-1"),),
    ),
    "tcp ephemeral port": (
        "tcp",
        "192.0.2.1:5060",
        "",
        ("192.0.2.1", 45000),
        (("branch", "z9hG4bK-1"),),
    ),
}
SOURCES = {
    "udp rport": Peer("udp", "192.0.2.1", 40000),
    "udp host name sent-by": Peer("udp", "198.51.100.7", 5070),
    "udp default port": Peer("udp", "192.0.2.1", 33333),
    "udp ipv6": Peer("udp", "2001:db8::1", 5060),
    "tcp ephemeral port": Peer("tcp", "192.0.2.1", 45000),
}


@pytest.mark.parametrize("name", ROUTING)
def test_response_destination(name: str) -> None:
    transport, sent_by, extra, (host, port), params = ROUTING[name]
    source = SOURCES.get(name, SOURCE)
    layer = TransactionLayer()
    request = req(transport=transport.upper(), sent_by=sent_by, via_params=extra)
    delivery = delivered(layer.receive(request, source, 0.0))
    top = delivery.request.vias[0]
    assert top.params == params
    assert delivery.request.vias[1:] == request.vias[1:]
    assert delivery.source == source
    response = make_response(delivery.request, 200, to_tag="t")
    [transmit, *_] = layer.send_response(delivery.key, response, 0.1)
    assert isinstance(transmit, Transmit)
    assert transmit.peer == Peer(transport, host, port)
    # The response echoes the stamped Via, so the client learns its public address.
    echoed = parse_message(transmit.data)
    assert echoed.vias[0].params == params


# --- client side (RFC 3261 17.1.3) -------------------------------------------------------------


def test_response_matching_by_branch_and_cseq_method() -> None:
    layer = TransactionLayer()
    request = req(sent_by="192.0.2.99:5070", branch="z9hG4bK-out")
    key, effects = layer.send_request(request, SOURCE, 0.0)
    assert key == ClientKey("z9hG4bK-out", "MESSAGE")
    assert effects == [Transmit(bytes(request), SOURCE, key)]
    other_method = make_response(req(method="OPTIONS", branch="z9hG4bK-out"), 200)
    assert kinds(layer.receive(other_method, SOURCE, 0.1)) == ["stray"]
    ok = make_response(request, 200, to_tag="r")
    assert layer.receive(ok, SOURCE, 0.2) == [DeliverResponse(key, ok)]
    assert layer.receive(ok, SOURCE, 0.3) == []  # absorbed in Completed
    assert layer.handle_timer(5.2) == [Terminated(key)]
    assert layer.client_count == 0
    assert kinds(layer.receive(ok, SOURCE, 6.0)) == ["stray"]


@pytest.mark.parametrize(
    "stray",
    [
        make_response(req(branch="z9hG4bK-unknown"), 200),
        make_response(req(branch=None), 200),
        SipResponse(200, "OK", (("Call-ID", "x"),)),
    ],
)
def test_stray_response_is_dropped(stray: SipResponse) -> None:
    layer = TransactionLayer()
    layer.send_request(req(), SOURCE, 0.0)
    [effect] = layer.receive(stray, SOURCE, 0.1)
    assert isinstance(effect, Stray) and effect.message == stray and effect.source == SOURCE
    assert layer.client_count == 1
    assert layer.next_deadline() == 0.5


@pytest.mark.parametrize(
    "bad",
    [req(branch=None), req(branch="2543-style"), req(method="INVITE"), req(method="ACK")],
)
def test_send_request_refuses_what_it_cannot_run(bad: SipRequest) -> None:
    with pytest.raises(LocalError):
        TransactionLayer().send_request(bad, SOURCE, 0.0)


def test_send_request_refuses_a_reused_branch() -> None:
    layer = TransactionLayer()
    layer.send_request(req(), SOURCE, 0.0)
    with pytest.raises(LocalError):
        layer.send_request(req(), SOURCE, 0.1)


def test_transport_error_fails_and_forgets() -> None:
    layer = TransactionLayer()
    key, _ = layer.send_request(req(), Peer("tcp", "192.0.2.1", 5060), 0.0)
    error = TransportError("refused")
    assert layer.transport_error(key, error, 0.1) == [Failed(key, error), Terminated(key)]
    assert key not in layer and layer.client_count == 0
    assert layer.transport_error(key, error, 0.2) == []


def test_answer_after_the_transaction_ended_is_discarded() -> None:
    layer = TransactionLayer()
    key = delivered(layer.receive(req(), SOURCE, 0.0)).key
    # One late tick: the 64*T1 guard wins over the overdue automatic 100, which is not sent.
    assert kinds(layer.handle_timer(32.0)) == ["failed", "terminated"]
    effects = layer.send_response(key, make_response(req(), 200, to_tag="t"), 33.0)
    assert kinds(effects) == ["discarded"]
    assert isinstance(effects[0], Discarded)


def test_408_from_the_application_is_a_local_error() -> None:
    layer = TransactionLayer()
    key = delivered(layer.receive(req(), SOURCE, 0.0)).key
    with pytest.raises(LocalError):
        layer.send_response(key, make_response(req(), 408, to_tag="t"), 1.0)


def test_automatic_100_goes_to_the_response_address() -> None:
    layer = TransactionLayer(TimerConfig(t1=0.25))
    source = Peer("udp", "192.0.2.1", 40000)
    layer.receive(req(via_params=";rport"), source, 10.0)
    assert layer.next_deadline() == 10.0 + layer.config.trying_delay
    [transmit] = layer.handle_timer(10.0 + layer.config.trying_delay)
    assert isinstance(transmit, Transmit) and transmit.peer == source
    assert kinds([transmit]) == ["send 100"]


def test_no_automatic_100_when_disabled() -> None:
    layer = TransactionLayer(auto_trying=False)
    layer.receive(req(), SOURCE, 0.0)
    assert layer.next_deadline() == 32.0
    assert kinds(layer.handle_timer(31.9)) == []


def test_stale_timer_entries_are_dropped_not_rearmed() -> None:
    layer = TransactionLayer()
    key = delivered(layer.receive(req(), SOURCE, 0.0)).key
    layer.send_response(key, make_response(req(), 200, to_tag="t"), 1.0)
    # The automatic-100 entry (3.5 s) is stale now; only Timer J (33 s) is live.
    assert layer.scheduled_timers == 2
    assert layer.handle_timer(3.5) == []
    assert layer.scheduled_timers == 1
    assert layer.next_deadline() == 33.0


def _answer_first_run(answer_first: bool) -> list[object]:
    """Requests answered at once, one left to its automatic 100, a retransmission, a transport
    error and the timers, as a list of what each step returned and the next deadline."""
    layer = TransactionLayer()
    seen: list[object] = []

    def step(effects: list[Effect]) -> None:
        seen.append((kinds(effects), layer.next_deadline(), layer.server_count))

    keys = []
    for i in range(4):
        effects = layer.receive(
            req(branch=f"z9hG4bK-{i}", call_id=f"c{i}"), SOURCE, float(i), answer_first=answer_first
        )
        keys.append(delivered(effects).key)
        if i != 2:  # the third waits for its automatic 100
            step(layer.send_response(keys[i], make_response(req(), 202, to_tag="t"), float(i)))
        else:
            step(effects)
    step(layer.receive(req(branch="z9hG4bK-1", call_id="c1"), SOURCE, 4.0, answer_first=True))
    step(layer.transport_error(keys[3], TransportError("gone"), 4.5))
    for now in (3.0, 5.5, 6.0, 33.0, 34.0, 36.0):
        step(layer.handle_timer(now))
    return seen


def test_answer_first_fires_the_same_timers_without_stale_entries() -> None:
    # The endpoint's way (answer_first) and the plain way give the same effects, deadlines and
    # transactions at every step.
    assert _answer_first_run(True) == _answer_first_run(False)
    layer = TransactionLayer()
    key = delivered(layer.receive(req(), SOURCE, 0.0, answer_first=True)).key
    layer.send_response(key, make_response(req(), 200, to_tag="t"), 1.0)
    assert layer.scheduled_timers == 1  # Timer J only: no automatic-100 entry to go stale
    assert layer.next_deadline() == 33.0


def test_answer_first_refused_response_leaves_the_transaction_scheduled() -> None:
    # RFC 4320 4.2: the application may not answer 408; the transaction it tried to answer
    # keeps its automatic 100 and its guard, as it does without answer_first.
    layer = TransactionLayer()
    key = delivered(layer.receive(req(), SOURCE, 10.0, answer_first=True)).key
    with pytest.raises(LocalError):
        layer.send_response(key, make_response(req(), 408, to_tag="t"), 10.0)
    assert layer.next_deadline() == 10.0 + layer.config.trying_delay
    assert kinds(layer.handle_timer(10.0 + layer.config.trying_delay)) == ["send 100"]
    assert layer.next_deadline() == 10.0 + layer.config.timer_f


def test_answer_first_request_left_unanswered_gets_its_100() -> None:
    layer = TransactionLayer()
    layer.receive(req(), SOURCE, 10.0, answer_first=True)
    assert layer.next_deadline() == 10.0 + layer.config.trying_delay
    assert kinds(layer.handle_timer(10.0 + layer.config.trying_delay)) == ["send 100"]


# --- many transactions: every one ends, nothing leaks ------------------------------------------


def test_many_transactions_leave_nothing_behind() -> None:
    layer = TransactionLayer()
    udp, tcp = Peer("udp", "192.0.2.1", 5060), Peer("tcp", "192.0.2.1", 5060)
    server_keys = []
    for i in range(400):
        peer = udp if i % 2 else tcp
        out = req(branch=f"z9hG4bK-c{i}", call_id=f"c{i}")
        layer.send_request(out, peer, i * 0.01)
        if i % 4 == 0:
            layer.receive(make_response(out, 100), peer, i * 0.01 + 0.1)
        if i % 3 == 0:
            layer.receive(make_response(out, 200, to_tag="t"), peer, i * 0.01 + 0.2)
        incoming = req(branch=f"z9hG4bK-s{i}", call_id=f"s{i}", transport=peer.transport.upper())
        server_keys.append(delivered(layer.receive(incoming, peer, i * 0.01)).key)
        if i % 5:
            response = make_response(incoming, 200, to_tag="t")
            layer.send_response(server_keys[-1], response, i * 0.01 + 1.0)
    assert layer.client_count > 0 and layer.server_count > 0
    fired = 0
    ends: dict[str, int] = {}
    while (deadline := layer.next_deadline()) is not None:
        for effect in layer.handle_timer(deadline):
            ends[type(effect).__name__] = ends.get(type(effect).__name__, 0) + 1
        fired += 1
        assert fired < 20_000
    assert layer.client_count == layer.server_count == 0
    assert layer.scheduled_timers == 0
    assert not any(key in layer for key in server_keys)
    # Unanswered clients time out (Timer F), unanswered servers give up: each one Failed.
    unanswered_clients = sum(1 for i in range(400) if i % 3)
    unanswered_servers = sum(1 for i in range(400) if i % 5 == 0)
    assert ends["Failed"] == unanswered_clients + unanswered_servers


# --- two layers over a lossy in-memory network (aioquic-style) ---------------------------------


@pytest.mark.parametrize(("lost_requests", "lost_responses"), [(0, 0), (2, 0), (0, 3), (3, 2)])
def test_two_layers_over_a_lossy_network(lost_requests: int, lost_responses: int) -> None:
    alice, bob = TransactionLayer(), TransactionLayer()
    alice_addr, bob_addr = Peer("udp", "192.0.2.1", 5060), Peer("udp", "192.0.2.2", 5060)
    request = req(sent_by="192.0.2.1:5060", branch="z9hG4bK-net")
    _, wire = alice.send_request(request, bob_addr, 0.0)
    losses = {"request": lost_requests, "response": lost_responses}
    app_requests: list[SipRequest] = []
    app_responses: list[int] = []
    now = 0.0

    def pump(effects: list[Effect], at: float) -> None:
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            match effect:
                case Transmit(data=data, peer=peer):
                    message = parse_message(data)
                    kind = "request" if isinstance(message, SipRequest) else "response"
                    if losses[kind]:
                        losses[kind] -= 1
                        continue
                    if peer == bob_addr:
                        queue += bob.receive(message, alice_addr, at)
                    else:
                        assert peer == alice_addr
                        queue += alice.receive(message, bob_addr, at)
                case DeliverRequest(key=key, request=incoming):
                    app_requests.append(incoming)
                    reply = make_response(incoming, 200, to_tag="bob")
                    queue += bob.send_response(key, reply, at)
                case DeliverResponse(response=response):
                    app_responses.append(response.status)
                case _:
                    pass

    pump(wire, now)
    while True:
        deadlines = [d for d in (alice.next_deadline(), bob.next_deadline()) if d is not None]
        if not deadlines:
            break
        now = min(deadlines)
        pump(alice.handle_timer(now) + bob.handle_timer(now), now)
    assert len(app_requests) == 1
    assert app_responses == [200]
    assert alice.client_count == bob.server_count == 0
