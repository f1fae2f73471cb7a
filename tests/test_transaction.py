"""Non-INVITE client and server transactions (RFC 3261 17.1.2, 17.2.2; RFC 4320), fake clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipside.errors import LocalError, TransactionTimeout, TransportError
from sipside.message import SipRequest, SipResponse, make_response, parse_message
from sipside.peer import Peer
from sipside.timers import TimerConfig
from sipside.transaction import (
    ClientKey,
    ClientState,
    ClientTransaction,
    DeliverResponse,
    Discarded,
    Effect,
    Failed,
    ServerKey,
    ServerState,
    ServerTransaction,
    Terminated,
    Transmit,
)

UDP = Peer("udp", "192.0.2.10", 5060)
TCP = Peer("tcp", "192.0.2.10", 5060)
CONFIG = TimerConfig()
BRANCH = "z9hG4bK-test-1"


def request(transport: str = "UDP", branch: str = BRANCH) -> SipRequest:
    return SipRequest(
        "MESSAGE",
        "sip:bob@example.org",
        (
            ("Via", f"SIP/2.0/{transport} 192.0.2.1:5060;branch={branch}"),
            ("Max-Forwards", "70"),
            ("From", "<sip:alice@example.org>;tag=a1"),
            ("To", "<sip:bob@example.org>"),
            ("Call-ID", "call-1@192.0.2.1"),
            ("CSeq", "1 MESSAGE"),
            ("Content-Type", "text/plain"),
        ),
        b"hello",
    )


def response(status: int, req: SipRequest | None = None) -> SipResponse:
    return make_response(req or request(), status, to_tag=None if status == 100 else "b1")


# A scripted run: at each time, one action; timers due before (and at) it are fired first.
Action = Callable[[float], list[Effect]]


def run(
    tx: ClientTransaction | ServerTransaction, script: list[tuple[float, Action]]
) -> list[tuple[float, str]]:
    """Drive ``tx`` through ``script`` and then its remaining timers; summarise the effects."""
    log: list[tuple[float, str]] = []

    def note(now: float, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case Transmit(data=data):
                    message = parse_message(data)
                    what = "send" if isinstance(message, SipRequest) else f"send {message.status}"
                    log.append((now, what))
                case DeliverResponse(response=resp):
                    log.append((now, f"deliver {resp.status}"))
                case Failed(error=error):
                    log.append((now, f"failed {type(error).__name__}"))
                case Terminated():
                    log.append((now, "terminated"))
                case Discarded():
                    log.append((now, "discarded"))
                case _:
                    raise AssertionError(effect)

    def fire_until(limit: float) -> None:
        while (deadline := tx.next_deadline()) is not None and deadline <= limit:
            note(deadline, tx.handle_timer(deadline))

    for at, action in script:
        fire_until(at)
        note(at, action(at))
    fire_until(float("inf"))
    return log


def sends(*times: float) -> list[tuple[float, str]]:
    return [(t, "send") for t in times]


def client(peer: Peer) -> ClientTransaction:
    transport = "UDP" if peer is UDP else "TCP"
    return ClientTransaction(ClientKey(BRANCH, "MESSAGE"), request(transport), peer, CONFIG)


def start(tx: ClientTransaction) -> Action:
    return tx.start


def answer(tx: ClientTransaction, status: int) -> Action:
    return lambda now: tx.receive_response(response(status), now)


RETRANSMITS_UDP = [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]

CLIENT_CASES: dict[str, tuple[Peer, list[tuple[float, int]], list[tuple[float, str]]]] = {
    # RFC 3261 17.1.2.2: E doubles from T1 to T2, then every T2; F at 64*T1 ends it.
    "udp no answer": (
        UDP,
        [],
        [*sends(*RETRANSMITS_UDP), (32.0, "failed TransactionTimeout"), (32.0, "terminated")],
    ),
    # The E already armed fires in Proceeding at 0.5, then every T2.
    "udp 100 then silence": (
        UDP,
        [(0.2, 100)],
        [
            (0.0, "send"),
            (0.2, "deliver 100"),
            *sends(0.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5),
            (32.0, "failed TransactionTimeout"),
            (32.0, "terminated"),
        ],
    ),
    "udp 100 late": (
        UDP,
        [(4.0, 100)],
        [
            *sends(0.0, 0.5, 1.5, 3.5),
            (4.0, "deliver 100"),
            *sends(7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5),
            (32.0, "failed TransactionTimeout"),
            (32.0, "terminated"),
        ],
    ),
    # Final response: delivered once; retransmitted finals absorbed; Timer K = T4.
    "udp 200": (
        UDP,
        [(1.0, 200), (2.0, 200), (5.5, 200)],
        [*sends(0.0, 0.5), (1.0, "deliver 200"), (6.0, "terminated")],
    ),
    "udp 100 then 404 then 100": (
        UDP,
        [(0.1, 100), (0.7, 404), (0.8, 100)],
        [
            (0.0, "send"),
            (0.1, "deliver 100"),
            (0.5, "send"),
            (0.7, "deliver 404"),
            (5.7, "terminated"),
        ],
    ),
    "udp 200 just before F": (
        UDP,
        [(31.9, 200)],
        [*sends(*RETRANSMITS_UDP), (31.9, "deliver 200"), (36.9, "terminated")],
    ),
    # Reliable: no retransmissions, Timer F still applies, Timer K = 0.
    "tcp no answer": (
        TCP,
        [],
        [(0.0, "send"), (32.0, "failed TransactionTimeout"), (32.0, "terminated")],
    ),
    "tcp 100 then 200": (
        TCP,
        [(1.0, 100), (2.0, 200), (2.5, 200)],
        [(0.0, "send"), (1.0, "deliver 100"), (2.0, "deliver 200"), (2.0, "terminated")],
    ),
}


@pytest.mark.parametrize("name", CLIENT_CASES)
def test_client_transaction(name: str) -> None:
    peer, answers, expected = CLIENT_CASES[name]
    tx = client(peer)
    script: list[tuple[float, Action]] = [(0.0, start(tx))]
    script += [(at, answer(tx, status)) for at, status in answers]
    assert run(tx, script) == expected
    assert tx.state is ClientState.TERMINATED
    assert tx.next_deadline() is None


def test_client_retransmits_identical_bytes_to_its_peer() -> None:
    tx = client(UDP)
    first = tx.start(0.0)
    again = tx.handle_timer(0.5)
    assert first == again == [Transmit(bytes(request()), UDP, tx.key)]


def test_client_late_timer_sends_once_and_rearms_from_now() -> None:
    tx = client(UDP)
    tx.start(0.0)
    assert len(tx.handle_timer(3.0)) == 1  # E was due at 0.5 and 1.5: one send, no burst
    assert tx.next_deadline() == 3.0 + 1.0
    assert tx.handle_timer(3.5) == []


def test_client_timeout_is_a_failure_not_a_made_up_408() -> None:
    tx = client(UDP)
    tx.start(0.0)
    effects = tx.handle_timer(32.0)
    assert len(effects) == 2
    assert isinstance(effects[0], Failed) and isinstance(effects[0].error, TransactionTimeout)
    assert effects[1] == Terminated(tx.key)
    assert not any(isinstance(effect, DeliverResponse) for effect in effects)
    assert tx.handle_timer(40.0) == []
    assert tx.receive_response(response(200), 41.0) == []


@pytest.mark.parametrize("peer", [UDP, TCP])
def test_client_transport_error(peer: Peer) -> None:
    tx = client(peer)
    tx.start(0.0)
    error = TransportError("connection refused")
    assert tx.transport_error(error, 0.1) == [Failed(tx.key, error), Terminated(tx.key)]
    assert tx.next_deadline() is None
    assert tx.transport_error(error, 0.2) == []


def test_client_misuse_is_a_local_error() -> None:
    tx = client(UDP)
    with pytest.raises(LocalError):
        tx.receive_response(response(200), 0.0)
    tx.start(0.0)
    with pytest.raises(LocalError):
        tx.start(0.1)


# --- server ------------------------------------------------------------------------------------


def server(peer: Peer, *, auto_trying: bool = True) -> ServerTransaction:
    req = request("UDP" if peer is UDP else "TCP")
    key = ServerKey(BRANCH, "192.0.2.1", 5060, "MESSAGE")
    return ServerTransaction(key, req, peer, CONFIG, 0.0, auto_trying=auto_trying)


def retransmit(tx: ServerTransaction) -> Action:
    return tx.receive_request


def reply(tx: ServerTransaction, status: int) -> Action:
    return lambda now: tx.send_response(response(status), now)


SERVER_CASES: dict[str, tuple[Peer, bool, list[tuple[float, str]], list[tuple[float, str]]]] = {
    # RFC 3261 17.2.2: retransmissions in Trying are absorbed, in Completed answered from cache;
    # Timer J = 64*T1 over UDP.
    "udp 200": (
        UDP,
        True,
        [(0.5, "request"), (1.0, "200"), (1.5, "request"), (3.5, "request"), (20.0, "request")],
        [
            (1.0, "send 200"),
            (1.5, "send 200"),
            (3.5, "send 200"),
            (20.0, "send 200"),
            (33.0, "terminated"),
        ],
    ),
    # RFC 4320 4.1: the automatic 100 at 3.5 s (Timer E reaches T2), then re-sent on retransmits.
    "udp slow answer": (
        UDP,
        True,
        [(1.5, "request"), (4.0, "request"), (6.0, "202"), (7.0, "request")],
        [
            (3.5, "send 100"),
            (4.0, "send 100"),
            (6.0, "send 202"),
            (7.0, "send 202"),
            (38.0, "terminated"),
        ],
    ),
    "udp slow answer without auto 100": (
        UDP,
        False,
        [(4.0, "request"), (6.0, "200")],
        [(6.0, "send 200"), (38.0, "terminated")],
    ),
    # Not an RFC timer: an unanswered request is given up at 64*T1 (the client's F has fired).
    "udp never answered": (
        UDP,
        True,
        [],
        [(3.5, "send 100"), (32.0, "failed TransactionTimeout"), (32.0, "terminated")],
    ),
    "udp second final discarded": (
        UDP,
        True,
        [(1.0, "200"), (2.0, "500")],
        [(1.0, "send 200"), (2.0, "discarded"), (33.0, "terminated")],
    ),
    # RFC 4320 4.1: an application 100 before the client's E reaches T2 is not sent over UDP.
    "udp early 100 discarded": (
        UDP,
        True,
        [(1.0, "100"), (3.0, "request"), (3.6, "request"), (4.0, "200")],
        [
            (1.0, "discarded"),
            (3.5, "send 100"),
            (3.6, "send 100"),
            (4.0, "send 200"),
            (36.0, "terminated"),
        ],
    ),
    # Reliable: no automatic 100, a 100 is fine at any time, Timer J = 0.
    "tcp 100 then 200": (
        TCP,
        True,
        [(0.1, "100"), (1.0, "200"), (2.0, "200")],
        [(0.1, "send 100"), (1.0, "send 200"), (1.0, "terminated"), (2.0, "discarded")],
    ),
    "tcp never answered": (
        TCP,
        True,
        [],
        [(32.0, "failed TransactionTimeout"), (32.0, "terminated")],
    ),
}


@pytest.mark.parametrize("name", SERVER_CASES)
def test_server_transaction(name: str) -> None:
    peer, auto, steps, expected = SERVER_CASES[name]
    tx = server(peer, auto_trying=auto)
    script = [
        (at, retransmit(tx) if step == "request" else reply(tx, int(step))) for at, step in steps
    ]
    log = run(tx, script)
    assert log == expected
    assert tx.state is ServerState.TERMINATED
    assert tx.next_deadline() is None


@pytest.mark.parametrize("status", [408, 101, 180, 183, 199, 99, 700])
@pytest.mark.parametrize("peer", [UDP, TCP])
def test_server_refuses_what_rfc_4320_forbids(status: int, peer: Peer) -> None:
    tx = server(peer)
    forbidden = SipResponse(status, "Nope", response(200).headers)
    with pytest.raises(LocalError):
        tx.send_response(forbidden, 10.0)
    assert tx.state is ServerState.TRYING  # nothing changed: a 200 still goes out
    assert len(tx.send_response(response(200), 10.0)) >= 1


def test_server_transport_error_terminates() -> None:
    tx = server(TCP)
    error = TransportError("connection reset")
    assert tx.transport_error(error, 1.0) == [Failed(tx.key, error), Terminated(tx.key)]
    effects = tx.send_response(response(200), 2.0)
    assert len(effects) == 1 and isinstance(effects[0], Discarded)


@pytest.mark.parametrize(
    ("t1", "t2", "expected"), [(0.5, 4.0, 3.5), (0.1, 1.0, 1.5), (1.0, 1.0, 1.0)]
)
def test_trying_delay_is_when_timer_e_reaches_t2(t1: float, t2: float, expected: float) -> None:
    config = TimerConfig(t1=t1, t2=t2)
    assert config.trying_delay == pytest.approx(expected)
    # Cross-check against a client transaction with the same timers.
    tx = ClientTransaction(ClientKey(BRANCH, "MESSAGE"), request(), UDP, config)
    tx.start(0.0)
    interval = 0.0
    while True:
        previous = tx.next_deadline()
        assert previous is not None
        tx.handle_timer(previous)
        deadline = tx.next_deadline()
        assert deadline is not None
        interval = deadline - previous
        if interval >= t2:
            break
    assert previous == pytest.approx(expected)


# --- property: random interleavings of responses and timers ------------------------------------

EVENT = st.tuples(
    st.floats(min_value=0.0, max_value=45.0, allow_nan=False),
    st.sampled_from(["100", "200", "486", "timer", "late-timer"]),
)


@settings(max_examples=300, deadline=None)
@given(reliable=st.booleans(), events=st.lists(EVENT, max_size=25))
def test_client_delivers_at_most_one_final_and_always_terminates(
    reliable: bool, events: list[tuple[float, str]]
) -> None:
    tx = client(TCP if reliable else UDP)
    limit = CONFIG.timer_f + CONFIG.t4
    effects = tx.start(0.0)
    now = 0.0
    for at, kind in sorted(events):
        # "late-timer" is an endpoint that missed earlier deadlines; others fire them on time.
        if kind != "late-timer":
            while (deadline := tx.next_deadline()) is not None and deadline <= at:
                effects += tx.handle_timer(deadline)
        now = at
        if kind in ("timer", "late-timer"):
            effects += tx.handle_timer(now)
        else:
            effects += tx.receive_response(response(int(kind)), now)
        deadline = tx.next_deadline()
        assert deadline is None or deadline <= limit
    while (deadline := tx.next_deadline()) is not None:
        assert deadline <= limit
        effects += tx.handle_timer(max(deadline, now))
    assert tx.state is ClientState.TERMINATED
    finals = [e for e in effects if isinstance(e, DeliverResponse) and e.response.status >= 200]
    failures = [e for e in effects if isinstance(e, Failed)]
    assert len(finals) + len(failures) == 1
    assert effects.count(Terminated(tx.key)) == 1
    assert effects.index(Terminated(tx.key)) == len(effects) - 1
    if reliable:
        assert sum(isinstance(e, Transmit) for e in effects) == 1


@pytest.mark.parametrize(
    ("t1", "t2", "t4", "timer_f", "j_udp", "k_udp"),
    [
        (0.5, 4.0, 5.0, 32.0, 32.0, 5.0),
        (0.1, 2.0, 1.0, 6.4, 6.4, 1.0),
        (2.0, 8.0, 0.0, 128, 128, 0),
    ],
)
def test_timer_config_derived_values(
    t1: float, t2: float, t4: float, timer_f: float, j_udp: float, k_udp: float
) -> None:
    config = TimerConfig(t1=t1, t2=t2, t4=t4)
    assert config.timer_f == pytest.approx(timer_f)
    assert (config.timer_j(False), config.timer_k(False)) == pytest.approx((j_udp, k_udp))
    assert (config.timer_j(True), config.timer_k(True)) == (0.0, 0.0)
    assert config.timer_e() == t1
    assert config.timer_e(t2 * 0.75) == t2


@pytest.mark.parametrize(("t1", "t2", "t4"), [(0.0, 4.0, 5.0), (0.5, -1.0, 5.0), (0.5, 4.0, -1)])
def test_timer_config_refuses_nonsense(t1: float, t2: float, t4: float) -> None:
    with pytest.raises(LocalError):
        TimerConfig(t1=t1, t2=t2, t4=t4)
