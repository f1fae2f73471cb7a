"""The UDP socket reads every datagram already queued after the one asyncio hands it, up to its
bound, in order, without another event-loop wake-up; none is lost or read twice."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sipside.peer import Peer
from sipside.transport import Burst, DatagramSocket


async def _bound(
    got: list[bytes], burst: Burst | None = None
) -> tuple[asyncio.DatagramTransport, DatagramSocket]:
    """A DatagramSocket on a loopback port, handing what it reads to ``got``."""
    return await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: DatagramSocket(
            Peer("udp", "127.0.0.1", 0), lambda data, _peer: got.append(data), burst
        ),
        local_addr=("127.0.0.1", 0),
    )


class Marks:
    """A Burst that writes its begin and end into the same list as the datagrams."""

    def __init__(self, got: list[bytes]) -> None:
        self.got = got

    def begin(self) -> None:
        self.got.append(b"<begin>")

    def end(self) -> None:
        self.got.append(b"<end>")


async def test_queued_datagrams_are_read_in_the_same_wakeup() -> None:
    got: list[bytes] = []
    transport, protocol = await _bound(got)
    port = transport.get_extra_info("sockname")[1]
    queued = DatagramSocket.DRAIN + 10
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for number in range(queued):
            sender.sendto(b"%d" % number, ("127.0.0.1", port))  # queued at once on loopback
        # What asyncio does when the socket is readable: read one and hand it over. No await
        # since the sends, so the event loop has read nothing yet.
        protocol.datagram_received(b"first", sender.getsockname())
    assert got == [b"first", *(b"%d" % n for n in range(DatagramSocket.DRAIN))]
    # The rest come through the event loop as usual, in order.
    for _ in range(200):
        if len(got) == queued + 1:
            break
        await asyncio.sleep(0.01)
    assert got[1:] == [b"%d" % n for n in range(queued)]
    transport.close()
    await asyncio.sleep(0)
    assert protocol._reader is None  # its handle on the socket is closed with the transport


async def test_nothing_queued_reads_nothing_more() -> None:
    got: list[bytes] = []
    transport, protocol = await _bound(got)
    protocol.datagram_received(b"only", ("127.0.0.1", 9))
    assert got == [b"only"]
    transport.close()


async def test_a_lone_datagram_after_a_pause_reads_nothing_more_and_loses_nothing() -> None:
    got: list[bytes] = []
    transport, protocol = await _bound(got)
    port = transport.get_extra_info("sockname")[1]
    protocol.datagram_received(b"earlier", ("127.0.0.1", 9))
    await asyncio.sleep(DatagramSocket.DRAIN_GAP * 10)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for number in range(3):
            sender.sendto(b"%d" % number, ("127.0.0.1", port))
        # After a pause no read is tried: the queued ones wait for the event loop.
        protocol.datagram_received(b"lone", sender.getsockname())
    assert got == [b"earlier", b"lone"]
    for _ in range(200):
        if len(got) == 5:
            break
        await asyncio.sleep(0.01)
    assert got == [b"earlier", b"lone", b"0", b"1", b"2"]
    transport.close()


async def test_datagrams_read_together_are_handled_inside_one_burst() -> None:
    got: list[bytes] = []
    transport, protocol = await _bound(got, Marks(got))
    port = transport.get_extra_info("sockname")[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for number in range(3):
            sender.sendto(b"%d" % number, ("127.0.0.1", port))
        protocol.datagram_received(b"first", sender.getsockname())
    assert got == [b"<begin>", b"first", b"0", b"1", b"2", b"<end>"]
    transport.close()


async def test_a_lone_datagram_is_handled_outside_any_burst() -> None:
    got: list[bytes] = []
    transport, protocol = await _bound(got, Marks(got))
    protocol.datagram_received(b"earlier", ("127.0.0.1", 9))
    got.clear()
    await asyncio.sleep(DatagramSocket.DRAIN_GAP * 10)
    protocol.datagram_received(b"lone", ("127.0.0.1", 9))
    assert got == [b"lone"]
    transport.close()


async def test_a_burst_ends_even_when_a_datagrams_handling_raises() -> None:
    got: list[bytes] = []

    def fail(data: bytes, _peer: Peer) -> None:
        got.append(data)
        raise RuntimeError("handler failed")

    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: DatagramSocket(Peer("udp", "127.0.0.1", 0), fail, Marks(got)),
        local_addr=("127.0.0.1", 0),
    )
    with pytest.raises(RuntimeError):
        protocol.datagram_received(b"first", ("127.0.0.1", 9))
    assert got == [b"<begin>", b"first", b"<end>"]
    transport.close()
