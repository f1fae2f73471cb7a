"""The asyncio endpoint on loopback sockets: two endpoints talking, and raw sockets as peers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from sipside.digest import Authorized, Credentials, DigestClient, DigestVerifier, Rechallenge
from sipside.endpoint import Endpoint, IncomingRequest, make_request, parse_listen, peer_for_uri
from sipside.errors import LocalError, TransactionTimeout
from sipside.message import SipResponse, new_call_id, parse_message
from sipside.peer import Peer
from sipside.timers import TimerConfig

Handler = Callable[[IncomingRequest], None]


class Recorder:
    """An application that answers 200 (or what ``status`` says) and keeps what it saw."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.seen: list[IncomingRequest] = []

    def __call__(self, incoming: IncomingRequest) -> None:
        self.seen.append(incoming)
        incoming.respond(self.status)


async def _endpoint(
    handler: Handler, listen: tuple[str, ...] = ("udp:127.0.0.1:0", "tcp:127.0.0.1:0"), **kw: object
) -> Endpoint:
    ep = Endpoint(listen, **kw)  # type: ignore[arg-type]
    await ep.start(handler)
    return ep


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Endpoint, Endpoint, Recorder]]:
    recorder = Recorder()
    server = await _endpoint(recorder)
    client = await _endpoint(Recorder())
    yield client, server, recorder
    await client.close()
    await server.close()


async def test_handler_given_to_the_constructor_still_serves() -> None:
    recorder = Recorder(202)
    server = Endpoint(["udp:127.0.0.1:0"], recorder)
    await server.start()
    client = await _endpoint(Recorder())
    try:
        response = await client.request(_message(server.local_peers["udp"]))  # type: ignore[arg-type]
        assert response.status == 202 and len(recorder.seen) == 1
    finally:
        await client.close()
        await server.close()


def _message(to_peer: Peer, body: bytes = b"hello", method: str = "MESSAGE") -> object:
    return make_request(
        method,
        f"sip:bob@{to_peer.hostport()}",
        from_="<sip:alice@sip.test>;tag=a1",
        to="<sip:bob@sip.test>",
        call_id=new_call_id(),
        headers=[("Content-Type", "text/plain")] if body else [],
        body=body,
    )


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_message_round_trip(
    pair: tuple[Endpoint, Endpoint, Recorder], transport: str
) -> None:
    client, server, recorder = pair
    dest = server.local_peers[transport]
    response = await client.request(_message(dest), dest)  # type: ignore[arg-type]
    assert response.status == 200
    assert response.to_tag  # RFC 3261 8.2.6.2: the UAS adds a To tag
    assert len(recorder.seen) == 1
    got = recorder.seen[0]
    assert got.request.body == b"hello"
    assert got.source.transport == transport
    assert got.request.vias[0].transport == transport.upper()


async def test_large_request_over_tcp_same_port() -> None:
    recorder = Recorder()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = await _endpoint(recorder, (f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}"))
    client = await _endpoint(Recorder())
    try:
        dest = Peer("udp", "127.0.0.1", port)
        response = await client.request(_message(dest, b"y" * 3000), dest)  # type: ignore[arg-type]
        assert response.status == 200
        assert recorder.seen[0].source.transport == "tcp"
        assert recorder.seen[0].request.body == b"y" * 3000
    finally:
        await client.close()
        await server.close()


def _raw_request(method: str, port: int, branch: str = "z9hG4bKraw1", extra: str = "") -> bytes:
    return (
        f"{method} sip:bob@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:9;branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@sip.test>;tag=x1\r\n"
        "To: <sip:bob@sip.test>\r\n"
        "Call-ID: raw-1@test\r\n"
        f"CSeq: 1 {method}\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


async def _udp_exchange(port: int, data: bytes, count: int = 1) -> list[SipResponse]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    try:
        responses = []
        for _ in range(count):
            await loop.sock_sendto(sock, data, ("127.0.0.1", port))
            raw = await asyncio.wait_for(loop.sock_recv(sock, 65535), 2)
            parsed = parse_message(raw)
            assert isinstance(parsed, SipResponse)
            responses.append(parsed)
        return responses
    finally:
        sock.close()


async def test_retransmission_gets_cached_response_and_reaches_app_once() -> None:
    recorder = Recorder(202)
    server = await _endpoint(recorder)
    try:
        port = server.local_peers["udp"].port
        responses = await _udp_exchange(port, _raw_request("MESSAGE", port), count=3)
        assert [r.status for r in responses] == [202, 202, 202]
        assert len(recorder.seen) == 1
        # the response goes back to the real source and says where it came from (RFC 3261 18.2.1)
        assert responses[0].vias[0].param("received") == "127.0.0.1"
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("method", "extra", "status", "header"),
    [
        ("INVITE", "", 405, "Allow"),
        ("BYE", "", 405, "Allow"),
        ("FROBNICATE", "", 501, None),
        ("MESSAGE", "Require: foo\r\n", 420, "Unsupported"),
    ],
)
async def test_stack_answers(method: str, extra: str, status: int, header: str | None) -> None:
    recorder = Recorder()
    server = await _endpoint(recorder)
    try:
        port = server.local_peers["udp"].port
        raw = _raw_request(method, port, extra=extra)
        [response] = await _udp_exchange(port, raw)
        assert response.status == status
        if header:
            assert response.header(header)
        assert recorder.seen == []
    finally:
        await server.close()


@pytest.mark.parametrize("uri", [b"sip:bob@", b"sip:"])
async def test_options_reach_the_application(uri: bytes) -> None:
    # RFC 3261 11.2: only the application knows which Request-URIs it serves, the gateway's
    # own address (no user part) included.
    recorder = Recorder(200)
    server = await _endpoint(recorder)
    try:
        port = server.local_peers["udp"].port
        raw = _raw_request("OPTIONS", port).replace(b"sip:bob@", uri)
        [response] = await _udp_exchange(port, raw)
        assert response.status == 200
        assert [r.request.method for r in recorder.seen] == ["OPTIONS"]
    finally:
        await server.close()


async def test_untrusted_source_gets_403() -> None:
    recorder = Recorder()
    server = await _endpoint(recorder, trusted=("10.0.0.0/8",))
    try:
        port = server.local_peers["udp"].port
        [response] = await _udp_exchange(port, _raw_request("MESSAGE", port))
        assert response.status == 403
        assert recorder.seen == []
    finally:
        await server.close()


async def test_garbage_with_headers_gets_400_and_garbage_is_dropped() -> None:
    server = await _endpoint(Recorder())
    try:
        port = server.local_peers["udp"].port
        broken = _raw_request("MESSAGE", port).replace(b"CSeq: 1 MESSAGE", b"CSeq: 1 MESSAGE")
        broken = broken.replace(b"Max-Forwards: 70", b"Max-Forwards: seventy")
        [response] = await _udp_exchange(port, broken)
        assert response.status == 400
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        await loop.sock_sendto(sock, b"\x00\xff garbage", ("127.0.0.1", port))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(loop.sock_recv(sock, 100), 0.3)
        sock.close()
        # still alive after the garbage
        fresh = _raw_request("MESSAGE", port, branch="z9hG4bKafter").replace(b"raw-1", b"raw-2")
        [ok] = await _udp_exchange(port, fresh)
        assert ok.status == 200
    finally:
        await server.close()


async def test_timeout_without_answer() -> None:
    client = await _endpoint(Recorder(), timers=TimerConfig(t1=0.01, t2=0.04, t4=0.05))
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    try:
        dest = Peer("udp", "127.0.0.1", sink.getsockname()[1])
        with pytest.raises(TransactionTimeout):
            await client.request(_message(dest), dest)  # type: ignore[arg-type]
        assert client.stats.timeouts == 1
    finally:
        sink.close()
        await client.close()


async def test_deadlines_within_the_slack_share_one_wakeup() -> None:
    # Each answered UDP request lingers 64*T1 (Timer J) with its own deadline; the endpoint's
    # one timer fires them all once the earliest is ``slack`` overdue, not once each.
    config = TimerConfig(t1=0.05)  # Timer J 3.2 s, slack 5 ms
    server = await _endpoint(Recorder(202), listen=("udp:127.0.0.1:0",), timers=config)
    loop = server._loop
    assert loop is not None
    armed: list[float] = []
    call_at = loop.call_at

    def recording_call_at(when: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        armed.append(when)
        return call_at(when, callback)

    loop.call_at = recording_call_at  # type: ignore[method-assign,assignment]
    try:
        start = loop.time()
        for k in range(5):
            server._instant = start + k * 0.001  # five answers 1 ms apart
            data = _raw_request("MESSAGE", 5060, branch=f"z9hG4bKslack{k}")
            server._on_datagram(
                data.replace(b"raw-1", f"raw-{k}".encode()), Peer("udp", "127.0.0.1", 9)
            )
        assert server.transactions == (0, 5)
        assert armed == [pytest.approx(start + config.timer_f + config.slack)]
        server._instant = armed[0]
        server._on_timer()
        assert server.transactions == (0, 0)
    finally:
        server._instant = None
        del loop.call_at
        await server.close()


async def test_deadlines_past_due_fire_in_a_pass_awake_for_a_datagram() -> None:
    # Under steady traffic a datagram comes before the loop timer (armed ``slack`` after the
    # earliest deadline): once that deadline is half the slack old, the datagram's pass fires
    # what is due and moves the loop timer to the next deadline, so it never wakes the process.
    config = TimerConfig(t1=0.05)  # Timer J 3.2 s, slack 5 ms
    server = await _endpoint(Recorder(202), listen=("udp:127.0.0.1:0",), timers=config)
    loop = server._loop
    assert loop is not None
    armed: list[asyncio.TimerHandle] = []
    call_at = loop.call_at

    def recording_call_at(when: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        handle = call_at(when, callback)
        armed.append(handle)
        return handle

    loop.call_at = recording_call_at  # type: ignore[method-assign,assignment]
    source = Peer("udp", "127.0.0.1", 9)

    def datagram(k: int, at: float) -> None:
        server._instant = at
        data = _raw_request("MESSAGE", 5060, branch=f"z9hG4bKdue{k}")
        server._on_datagram(data.replace(b"raw-1", f"raw-{k}".encode()), source)

    try:
        start = loop.time()
        for k in range(5):
            datagram(k, start + k * 0.001)  # five answers 1 ms apart
        assert server.transactions == (0, 5) and len(armed) == 1
        due = start + config.timer_f
        datagram(5, due + config.slack * 0.4)  # within half the slack: left to the timer
        assert server.transactions == (0, 6) and len(armed) == 1
        datagram(6, due + 0.0035)  # 0.7 slack: the first four are due, and fire now
        assert server.transactions == (0, 3)
        assert armed[0].cancelled() and len(armed) == 2
        assert armed[1].when() == pytest.approx(due + 0.004 + config.slack)
        assert not armed[1].cancelled()
    finally:
        server._instant = None
        del loop.call_at
        await server.close()


async def test_digest_challenge_answered() -> None:
    verifier = DigestVerifier("sip.test", {"gw": "pw"}.get, b"k" * 16)
    verdicts: list[object] = []

    def handler(incoming: IncomingRequest) -> None:
        req = incoming.request
        verdict = verifier.verify(req.header("Authorization"), req.method, req.uri, 0.0)
        verdicts.append(verdict)
        if isinstance(verdict, Rechallenge):
            incoming.respond(401, headers=[("WWW-Authenticate", verdict.challenge)])
        elif isinstance(verdict, Authorized):
            incoming.respond(200)
        else:
            incoming.respond(403)

    server = await _endpoint(handler)
    client = await _endpoint(Recorder(), digest=DigestClient(Credentials("gw", "pw")))
    try:
        dest = server.local_peers["udp"]
        response = await client.request(_message(dest), dest)  # type: ignore[arg-type]
        assert response.status == 200
        assert [type(v).__name__ for v in verdicts] == ["Rechallenge", "Authorized"]
    finally:
        await client.close()
        await server.close()


async def test_ipv6_udp() -> None:
    recorder = Recorder()
    server = await _endpoint(recorder, ("udp:[::1]:0",))
    client = await _endpoint(Recorder(), ("udp:[::1]:0",))
    try:
        dest = server.local_peers["udp"]
        response = await client.request(_message(dest), dest)  # type: ignore[arg-type]
        assert response.status == 200
        assert recorder.seen[0].source.host == "::1"
    finally:
        await client.close()
        await server.close()


@pytest.mark.parametrize(
    ("spec", "peer"),
    [
        ("udp:127.0.0.1:5070", Peer("udp", "127.0.0.1", 5070)),
        ("tls:[::1]:5071", Peer("tls", "::1", 5071)),
        ("TCP:0.0.0.0:5060", Peer("tcp", "0.0.0.0", 5060)),
    ],
)
def test_parse_listen(spec: str, peer: Peer) -> None:
    assert parse_listen(spec) == peer


@pytest.mark.parametrize(
    "spec", ["udp:host.test:5060", "sctp:127.0.0.1:1", "udp:[::1", "udp:1.2.3.4"]
)
def test_parse_listen_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(spec)


@pytest.mark.parametrize(
    ("uri", "peer"),
    [
        ("sip:127.0.0.1:5060", Peer("udp", "127.0.0.1", 5060)),
        ("sip:127.0.0.1;transport=tcp", Peer("tcp", "127.0.0.1", 5060)),
        ("sips:[::1]", Peer("tls", "::1", 5061)),
        ("sip:alice@10.1.2.3:5080;transport=TCP", Peer("tcp", "10.1.2.3", 5080)),
    ],
)
def test_peer_for_uri(uri: str, peer: Peer) -> None:
    assert peer_for_uri(uri) == peer


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A throw-away self-signed certificate and key (PEM files) made with openssl."""
    import subprocess

    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
async def test_tls_message_round_trip_and_connection_reuse(
    tls_pair: tuple[str, str], host: str
) -> None:
    cert, key = tls_pair
    recorder = Recorder()
    server = await _endpoint(recorder, (f"tls:{host}:0",), tls_cert=cert, tls_key=key)
    client = await _endpoint(Recorder(), (f"tls:{host}:0",), tls_cert=cert, tls_key=key)
    try:
        dest = server.local_peers["tls"]
        for body in (b"one", b"two"):
            response = await client.request(_message(dest, body), dest)  # type: ignore[arg-type]
            assert response.status == 200
        assert [seen.request.body for seen in recorder.seen] == [b"one", b"two"]
        assert recorder.seen[0].request.vias[0].transport == "TLS"
        # the second request reused the first connection
        assert recorder.seen[0].source == recorder.seen[1].source
    finally:
        await client.close()
        await server.close()


async def test_tls_listener_without_certificate_is_refused() -> None:
    with pytest.raises(LocalError):
        await _endpoint(Recorder(), ("tls:127.0.0.1:0",))


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_admission_refuses_before_the_application(transport: str) -> None:
    # A source the application's admission check refuses gets 503 with the Retry-After it gives,
    # without its request being parsed, matched or handed over; responses are never refused.
    asked: list[str] = []

    def admit(host: str, now: float) -> int | None:
        asked.append(host)
        return 7 if len(asked) > 1 else None

    recorder = Recorder(202)
    server = await _endpoint(recorder, admit=admit)
    client = await _endpoint(Recorder(200), admit=lambda host, now: 1)
    try:
        peer = server.local_peers[transport]
        first = await client.request(_message(peer), peer)  # type: ignore[arg-type]
        second = await client.request(_message(peer), peer)  # type: ignore[arg-type]
        assert (first.status, second.status) == (202, 503)
        assert second.header("Retry-After") == "7"
        assert len(recorder.seen) == 1
        assert asked == ["127.0.0.1", "127.0.0.1"]
        assert server.stats.rejected == 1
    finally:
        await client.close()
        await server.close()
