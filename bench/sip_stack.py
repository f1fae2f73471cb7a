"""Benchmark of the SIP stack: parsing, validation and MESSAGE transactions over loopback.

Run ``python -m bench.sip_stack`` (``--quick`` for a short run, ``--profile udp`` or
``--profile tcp`` to print the cProfile hot spots of one endpoint row). It prints one table:

- ``parse_message`` and ``bytes()`` of a typical relayed MESSAGE and of a NOTIFY with a PIDF
  body, and ``validate_request`` of the MESSAGE: messages per second and microseconds each;
- MESSAGE transactions from a client Endpoint to a server Endpoint that answers 200, over
  loopback UDP and TCP, with 1 and 50 requests in flight: requests per second, p50/p99
  latency, and CPU microseconds per transaction from ``time.process_time()``. Both endpoints
  run in this one process, so the CPU figure is the client's and the server's side together;
- as the limit of the machine in the same run, a raw asyncio UDP echo of the same bytes with
  the same concurrency (no parsing at all).

Every row is bounded in count and in time (a few seconds each, less with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import pstats
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog

from sipside.endpoint import Endpoint, IncomingRequest, make_request
from sipside.message import SipRequest, new_call_id, new_tag, parse_message
from sipside.validate import validate_request

HOST = "127.0.0.1"

# A MESSAGE as Kamailio relays it to the gateway: two Vias, Record-Route-free, a short text.
TYPICAL_MESSAGE = (
    b"MESSAGE sip:bob*xmpp.test@jabber.sip.test SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK3c1d.7a0f2b1e0c9d8e7f6a5b4c3d2e1f0a9b.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:40112;rport=40112;received=127.0.0.1;"
    b"branch=z9hG4bKPj8d2f8a7e-4c1b-4a0e-9d6f-3b2a1c0e9f8d\r\n"
    b"Max-Forwards: 69\r\n"
    b'From: "Alice" <sip:alice@sip.test>;tag=6a9c2f0e-1b3d-4e5f-8a7b-9c0d1e2f3a4b\r\n'
    b"To: <sip:bob*xmpp.test@jabber.sip.test>\r\n"
    b"Call-ID: 1f2e3d4c-5b6a-4798-8a9b-0c1d2e3f4a5b\r\n"
    b"CSeq: 21764 MESSAGE\r\n"
    b"Accept: text/plain, application/im-iscomposing+xml\r\n"
    b"User-Agent: PJSUA v2.15 Linux\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 35\r\n"
    b"\r\n"
    b"Hello Bob, are you there this time?"
)

_PIDF = (
    b'<?xml version="1.0" encoding="UTF-8"?>\r\n'
    b'<presence xmlns="urn:ietf:params:xml:ns:pidf" '
    b'xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model" '
    b'xmlns:rpid="urn:ietf:params:xml:ns:pidf:rpid" entity="sip:alice@sip.test">\r\n'
    b' <tuple id="t1"><status><basic>open</basic></status>'
    b"<contact>sip:alice@127.0.0.1:40112</contact><note>in a meeting</note></tuple>\r\n"
    b' <dm:person id="p1"><rpid:activities><rpid:busy/></rpid:activities>'
    b"<dm:note>in a meeting</dm:note></dm:person>\r\n"
    b"</presence>\r\n"
)
TYPICAL_NOTIFY = (
    b"NOTIFY sip:127.0.0.1:5070 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK9f8e.0a1b2c3d4e5f60718293a4b5c6d7e8f9.0\r\n"
    b"To: <sip:bob*xmpp.test@jabber.sip.test>;tag=8c7b6a59\r\n"
    b"From: <sip:alice@sip.test>;tag=a1b2c3d4e5f60718-2f3e\r\n"
    b"CSeq: 3 NOTIFY\r\n"
    b"Call-ID: 0d4c3b2a19f8e7d6c5b4a3928170f6e5\r\n"
    b"Content-Length: " + str(len(_PIDF)).encode() + b"\r\n"
    b"Max-Forwards: 70\r\n"
    b"Event: presence\r\n"
    b"Contact: <sip:127.0.0.1:5060>\r\n"
    b"Subscription-State: active;expires=3599\r\n"
    b"Content-Type: application/pidf+xml\r\n"
    b"\r\n" + _PIDF
)


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the result table."""

    name: str
    count: int
    seconds: float
    cpu: float
    latencies: tuple[float, ...] = ()

    def cells(self) -> list[str]:
        """The table cells: count, rate, us per op, p50, p99, CPU us per op."""
        rate = self.count / self.seconds if self.seconds else 0.0
        per_op = self.seconds / self.count * 1e6 if self.count else 0.0
        cpu_op = self.cpu / self.count * 1e6 if self.count else 0.0
        if self.latencies:
            ordered = sorted(self.latencies)
            p50 = f"{statistics.median(ordered) * 1e6:.0f}"
            p99 = f"{ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6:.0f}"
        else:
            p50 = p99 = "-"
        return [
            self.name,
            str(self.count),
            f"{rate:,.0f}",
            f"{per_op:.1f}",
            p50,
            p99,
            f"{cpu_op:.1f}",
        ]


HEADER = ["row", "count", "per s", "us/op", "p50 us", "p99 us", "cpu us/op"]


def print_table(rows: list[Row]) -> None:
    """Print the rows as an aligned text table."""
    lines = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    for index, line in enumerate(lines):
        first = line[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        print("  ".join([first, *rest]))
        if index == 0:
            print("  ".join("-" * w for w in widths))


# --- pure functions ---------------------------------------------------------------------------


def time_loop(name: str, func: Callable[[], object], budget: float, cap: int) -> Row:
    """Call ``func`` in batches until ``budget`` seconds or ``cap`` calls have passed."""
    count, batch = 0, 200
    cpu0, start = time.process_time(), time.perf_counter()
    deadline = start + budget
    while count < cap and time.perf_counter() < deadline:
        for _ in range(batch):
            func()
        count += batch
    return Row(name, count, time.perf_counter() - start, time.process_time() - cpu0)


def pure_rows(budget: float, cap: int) -> list[Row]:
    """Parsing, serialising and validating the typical messages."""
    message = cast(SipRequest, parse_message(TYPICAL_MESSAGE))
    notify = cast(SipRequest, parse_message(TYPICAL_NOTIFY))
    return [
        time_loop("parse MESSAGE", lambda: parse_message(TYPICAL_MESSAGE), budget, cap),
        time_loop("bytes() MESSAGE", lambda: bytes(message), budget, cap),
        time_loop("parse NOTIFY+PIDF", lambda: parse_message(TYPICAL_NOTIFY), budget, cap),
        time_loop("bytes() NOTIFY+PIDF", lambda: bytes(notify), budget, cap),
        time_loop("validate_request MESSAGE", lambda: validate_request(message), budget, cap),
        time_loop(
            "parse+validate MESSAGE",
            lambda: validate_request(cast(SipRequest, parse_message(TYPICAL_MESSAGE))),
            budget,
            cap,
        ),
    ]


# --- over loopback ----------------------------------------------------------------------------


def _answer(incoming: IncomingRequest) -> None:
    incoming.respond(200)


async def _drive(
    send: Callable[[], Awaitable[None]], concurrency: int, budget: float, cap: int
) -> tuple[int, float, float, list[float]]:
    """Run ``concurrency`` workers calling ``send`` until the budget or the cap is reached."""
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < cap and loop.time() < deadline:
            issued += 1
            began = time.perf_counter()
            await send()
            latencies.append(time.perf_counter() - began)

    cpu0, start = time.process_time(), time.perf_counter()
    # a lost datagram would stall a worker: the whole row is bounded instead of each request
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), budget + 30)
    return len(latencies), time.perf_counter() - start, time.process_time() - cpu0, latencies


async def endpoint_row(transport: str, concurrency: int, budget: float, cap: int) -> Row:
    """MESSAGE transactions from one Endpoint to another that answers 200."""
    server = Endpoint([f"{transport}:{HOST}:0"], _answer)
    client = Endpoint([f"{transport}:{HOST}:0"], _answer)
    await server.start()
    await client.start()
    dest = server.local_peers[transport]
    uri = f"sip:bob*xmpp.test@{dest.hostport()}"
    body = b"Hello Bob, are you there this time?"

    async def send() -> None:
        request = make_request(
            "MESSAGE",
            uri,
            from_=f"<sip:alice@sip.test>;tag={new_tag()}",
            to="<sip:bob*xmpp.test@jabber.sip.test>",
            call_id=new_call_id(),
            headers=[("Content-Type", "text/plain")],
            body=body,
        )
        response = await client.request(request, dest)
        if response.status != 200:
            raise RuntimeError(f"benchmark request got {response.status}")

    try:
        await send()  # connect (TCP) and warm up outside the measurement
        count, seconds, cpu, latencies = await _drive(send, concurrency, budget, cap)
    finally:
        await client.close()
        await server.close()
    name = f"endpoint {transport.upper()} MESSAGE x{concurrency}"
    return Row(name, count, seconds, cpu, tuple(latencies))


class _Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)


class _Pinger(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: asyncio.Future[bytes] | None = None

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_result(data)


async def echo_row(concurrency: int, budget: float, cap: int) -> Row:
    """The same bytes through a raw asyncio UDP echo: the floor of any UDP stack here."""
    loop = asyncio.get_running_loop()
    server, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(HOST, 0))
    port = server.get_extra_info("sockname")[1]
    clients: list[tuple[asyncio.DatagramTransport, _Pinger]] = []
    for _ in range(concurrency):
        transport, pinger = await loop.create_datagram_endpoint(_Pinger, remote_addr=(HOST, port))
        clients.append((transport, pinger))
    free = list(clients)

    async def send() -> None:
        transport, pinger = free.pop()
        pinger.waiting = loop.create_future()
        transport.sendto(TYPICAL_MESSAGE)
        await pinger.waiting
        free.append((transport, pinger))

    try:
        count, seconds, cpu, latencies = await _drive(send, concurrency, budget, cap)
    finally:
        for transport, _ in clients:
            transport.close()
        server.close()
    return Row(f"raw UDP echo x{concurrency}", count, seconds, cpu, tuple(latencies))


async def network_rows(budget: float, cap: int) -> list[Row]:
    """The endpoint rows and the raw echo rows, for 1 and 50 requests in flight."""
    rows = []
    for concurrency in (1, 50):
        rows.append(await echo_row(concurrency, budget, cap))
        for transport in ("udp", "tcp"):
            rows.append(await endpoint_row(transport, concurrency, budget, cap))
    return rows


def profile(transport: str, budget: float, cap: int) -> None:
    """Print the top functions by own time of one endpoint row (50 in flight)."""
    profiler = cProfile.Profile()
    profiler.enable()
    row = asyncio.run(endpoint_row(transport, 50, budget, cap))
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
    stats.print_stats(25)
    print(f"cProfile of {row.name}: {row.count} transactions")
    print(out.getvalue())


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run every row and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (about 0.3 s per row)")
    parser.add_argument("--profile", choices=["udp", "tcp"], help="cProfile one endpoint row")
    args = parser.parse_args(argv)
    # The endpoint logs each start and close at info; keep the table readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    budget, cap = (0.3, 20_000) if args.quick else (3.0, 200_000)
    if args.profile:
        profile(args.profile, budget, cap)
        return
    rows = pure_rows(budget, cap * 5)
    rows += asyncio.run(network_rows(budget, cap))
    print_table(rows)


if __name__ == "__main__":
    main()
