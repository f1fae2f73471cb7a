"""CPU cost of the SIP hot path per message, in process, with no real socket I/O.

Run ``python -m bench.hotpath`` from the repository root (``--profile ROW`` prints the cProfile
hot spots of one row: parse, validate, server, gateway or client; ``--rows`` picks rows;
``--rounds`` and ``--count`` size the run). Every row feeds pre-built, distinct messages (fresh
branch, Call-ID and tag each, so no retransmission matching short-cuts the work) and measures
``time.process_time()``:

- ``parse``: ``parse_message`` of a relayed MESSAGE;
- ``parse+validate``: the same plus ``validate_request``;
- ``server``: the datagram through ``Endpoint._on_datagram`` -> transaction layer -> a handler
  answering 202 -> the response serialised and written to a fake UDP transport;
- ``gateway``: the whole SIP -> XMPP chat path of a real gateway (``bench.gateway_path``): the
  datagram into the endpoint -> SIP gate -> router -> the stanza written to a fake XMPP stream,
  the 202 to a fake UDP transport, the barrier's pings answered as the server would;
- ``client``: ``await endpoint.request(MESSAGE)`` -> bytes written to the fake transport -> a
  200 datagram fed back -> the future resolved, driven in batches of concurrent requests. The
  time spent making up the 200s (the far end's work) is not counted.

The figure printed is the best of ``--rounds`` rounds, because the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import logging
import pstats
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from bench.gateway_path import FakeUdp, fake_udp, run_gateway
from bench.gateway_path import relayed_message as message_datagram
from sipside.endpoint import Endpoint, IncomingRequest, make_request
from sipside.message import SipRequest, parse_message
from sipside.peer import Peer
from sipside.validate import validate_request

SOURCE = Peer("udp", "127.0.0.1", 5060)
BATCH = 200  # client requests in flight at once


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: the best round of a measurement."""

    name: str
    count: int
    cpu: float

    def cells(self) -> tuple[str, str, str, str]:
        """Name, messages, CPU microseconds per message, messages per CPU second."""
        per = self.cpu / self.count
        return (self.name, str(self.count), f"{per * 1e6:.1f}", f"{1 / per:,.0f}")


def print_table(rows: list[Row]) -> None:
    """An aligned text table."""
    header = ("row", "msgs", "us/msg", "msgs/s")
    lines = [header, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        print("  ".join(cells))
        if index == 0:
            print("  ".join("-" * w for w in widths))


# --- the rows: each returns CPU seconds for ``count`` messages ---------------------------------


def run_parse(count: int) -> float:
    """parse_message alone."""
    data = [message_datagram(i) for i in range(count)]
    t0 = time.process_time()
    for item in data:
        parse_message(item)
    return time.process_time() - t0


def run_validate(count: int) -> float:
    """parse_message then validate_request."""
    data = [message_datagram(i) for i in range(count)]
    t0 = time.process_time()
    for item in data:
        request = parse_message(item)
        assert isinstance(request, SipRequest)
        validate_request(request)
    return time.process_time() - t0


async def _endpoint(handler: Callable[[IncomingRequest], None]) -> tuple[Endpoint, FakeUdp]:
    endpoint = Endpoint(["udp:127.0.0.1:0"], handler)
    await endpoint.start()
    return endpoint, fake_udp(endpoint)


def answer_202(incoming: IncomingRequest) -> None:
    """The application: accept every request."""
    incoming.respond(202)


async def run_server(count: int) -> float:
    """Datagram in -> transaction -> handler answers 202 -> response bytes written."""
    endpoint, fake = await _endpoint(answer_202)
    data = [message_datagram(i) for i in range(count)]
    try:
        t0 = time.process_time()
        for item in data:
            endpoint._on_datagram(item, SOURCE)
        cpu = time.process_time() - t0
    finally:
        await endpoint.close()
    if len(fake.sent) != count or not fake.sent[-1].startswith(b"SIP/2.0 202 "):
        raise RuntimeError(f"server row: {len(fake.sent)} responses for {count} requests")
    return cpu


def answer_200(request: bytes) -> bytes:
    """The far end's 200 to one of our requests: its Via, From, To, Call-ID and CSeq copied."""
    head = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    keep = (b"Via:", b"From:", b"To:", b"Call-ID:", b"CSeq:")
    lines = [b"SIP/2.0 200 OK"]
    lines += [line for line in head[1:] if line.startswith(keep)]
    lines += [b"Content-Length: 0", b"", b""]
    return b"\r\n".join(lines)


async def run_client(count: int) -> float:
    """endpoint.request(MESSAGE) -> bytes out -> 200 datagram in -> future resolved."""
    endpoint, fake = await _endpoint(lambda incoming: None)
    dest = Peer("udp", "127.0.0.1", 5060)
    requests = [
        make_request(
            "MESSAGE",
            "sip:alice@sip.test",
            from_=f"<sip:bob*xmpp.test@jabber.sip.test>;tag=f{i:06d}",
            to="<sip:alice@sip.test>",
            call_id=f"c{i:06d}@sip.xmpp.test",
            headers=[("Content-Type", "text/plain")],
            body=b"Hello Alice, this is Bob over XMPP",
        )
        for i in range(count)
    ]
    loop = asyncio.get_running_loop()
    cpu = 0.0
    done = 0
    try:
        for start in range(0, count, BATCH):
            batch = requests[start : start + BATCH]
            fake.sent.clear()
            t0 = time.process_time()
            tasks = [loop.create_task(endpoint.request(r, dest)) for r in batch]
            await asyncio.sleep(0)  # each task runs up to its await on the future
            cpu += time.process_time() - t0
            if len(fake.sent) != len(batch):
                raise RuntimeError(f"client row: {len(fake.sent)} sent of {len(batch)}")
            answers = [answer_200(data) for data in fake.sent]  # the far end: not counted
            t0 = time.process_time()
            for answer in answers:
                endpoint._on_datagram(answer, dest)
            responses = await asyncio.gather(*tasks)
            cpu += time.process_time() - t0
            done += sum(1 for response in responses if response.status == 200)
    finally:
        await endpoint.close()
    if done != count:
        raise RuntimeError(f"client row: {done} of {count} requests got their 200")
    return cpu


ROWS: dict[str, tuple[str, Callable[[int], float]]] = {
    "parse": ("parse_message", run_parse),
    "validate": ("parse + validate_request", run_validate),
    "server": ("server: datagram -> 202 written", lambda n: asyncio.run(run_server(n))),
    "gateway": ("gateway: datagram -> stanza + 202", lambda n: asyncio.run(run_gateway(n))),
    "client": ("client: request() -> 200 -> future", lambda n: asyncio.run(run_client(n))),
    "xmpp-in-1": ("xmpp -> sip, 1 conversation", lambda n: _xmpp_in(n, 1)),
    "xmpp-in-10": ("xmpp -> sip, 10 conversations", lambda n: _xmpp_in(n, 10)),
}


def _xmpp_in(count: int, conversations: int) -> float:
    from bench import xmpp_in  # it builds on this module's fakes

    return xmpp_in.run(count, conversations)


def measure(key: str, count: int) -> float:
    """CPU seconds of one round of row ``key``."""
    return ROWS[key][1](count)


def main(argv: list[str] | None = None) -> None:
    """Print the table (or the profile of one row)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--count", type=int, default=10000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per row; best is shown")
    parser.add_argument(
        "--profile", nargs="?", const="server", choices=sorted(ROWS), help="profile one row"
    )
    parser.add_argument(
        "--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS), help="rows to measure"
    )
    parser.add_argument(
        "--gc",
        choices=("default", "frozen", "off"),
        default="default",
        help="garbage collector: as is; gc.freeze() after imports and a gen0 threshold of "
        "50000 (what a long-running gateway can do); or disabled (to see its share)",
    )
    args = parser.parse_args(argv)
    if args.gc == "off":
        gc.disable()
    elif args.gc == "frozen":
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
    # Logging as in production at "warning": the hot path must not pay for debug events (the
    # gateway row sets up the gateway's own logging, at its default level).
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        cpu = measure(args.profile, args.count)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        print(f"{ROWS[args.profile][0]}: {cpu / args.count * 1e6:.1f} us/msg under the profiler")
        return
    rows = []
    for key in args.rows:
        name = ROWS[key][0]
        best = min(measure(key, args.count) for _ in range(args.rounds))
        rows.append(Row(name, args.count, best))
    print_table(rows)


if __name__ == "__main__":
    main()
