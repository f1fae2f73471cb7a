"""StreamFramer: byte-at-a-time feeding, pipelining, keep-alives and the buffer cap."""

from __future__ import annotations

import pytest

from sipside.errors import LocalError
from sipside.framing import FrameEvent, FramerState, FramingError, KeepAlive, StreamFramer


def msg(
    body: bytes = b"", *, length: bytes | None = None, name: bytes = b"Content-Length"
) -> bytes:
    cl = b"%s: %s\r\n" % (name, length if length is not None else str(len(body)).encode())
    return b"MESSAGE sip:a@b SIP/2.0\r\nCall-ID: x\r\n" + cl + b"\r\n" + body


def feed_in_chunks(framer: StreamFramer, data: bytes, size: int) -> list[FrameEvent]:
    events: list[FrameEvent] = []
    for i in range(0, len(data), size):
        events += framer.feed(data[i : i + size])
        if events and isinstance(events[-1], FramingError):
            break
    return events


STREAMS: list[tuple[bytes, list[FrameEvent]]] = [
    (msg(b"hello"), [msg(b"hello")]),
    (msg(b"a") + msg(b"bc"), [msg(b"a"), msg(b"bc")]),
    (b"\r\n\r\n", [KeepAlive()]),
    (b"\r\n", []),
    (b"\r\n\r\n\r\n\r\n", [KeepAlive(), KeepAlive()]),
    (b"\r\n" + msg(), [msg()]),
    (msg() + b"\r\n\r\n" + msg(b"x"), [msg(), KeepAlive(), msg(b"x")]),
    (msg(b"\r\n\r\n"), [msg(b"\r\n\r\n")]),
    (msg(b"1", name=b"l"), [msg(b"1", name=b"l")]),
    (msg(b"12", name=b"content-length"), [msg(b"12", name=b"content-length")]),
]


@pytest.mark.parametrize(("data", "expected"), STREAMS)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_chunked_feeding(data: bytes, expected: list[FrameEvent], size: int) -> None:
    framer = StreamFramer()
    assert feed_in_chunks(framer, data, size) == expected
    assert framer.pending == 0
    assert framer.state is FramerState.BETWEEN


def test_partial_message_is_kept() -> None:
    framer = StreamFramer()
    data = msg(b"hello")
    assert framer.feed(data[:-1]) == []
    assert framer.state is FramerState.BODY
    assert framer.pending == len(data) - 1
    assert framer.feed(data[-1:]) == [data]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"MESSAGE sip:a SIP/2.0\r\nCall-ID: x\r\n\r\n", 400),  # RFC 3261 18.3
        (msg(length=b"-1"), 400),
        (msg(length=b"abc"), 400),
        (b"MESSAGE sip:a SIP/2.0\r\nl: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"\r\r", 400),
        (msg(length=b"100000"), 413),
        (b"MESSAGE sip:a SIP/2.0\r\n" + b"X: y\r\n" * 20000, 513),
    ],
    ids=["no-length", "negative", "letters", "conflict", "bare-cr", "body-cap", "header-cap"],
)
def test_errors(data: bytes, status: int) -> None:
    framer = StreamFramer()
    events = feed_in_chunks(framer, data, 4096)
    assert len(events) == 1
    (event,) = events
    assert isinstance(event, FramingError)
    assert event.error.status == status
    assert framer.state is FramerState.FAILED
    with pytest.raises(LocalError):
        framer.feed(b"more")


def test_messages_before_an_error_are_delivered() -> None:
    events = StreamFramer().feed(msg(b"ok") + b"\r\n\r\n" + msg(length=b"-5"))
    assert events[:2] == [msg(b"ok"), KeepAlive()]
    assert isinstance(events[2], FramingError)


def test_cap_counts_header_and_body() -> None:
    data = msg(b"x" * 100)
    assert StreamFramer(max_buffer=len(data)).feed(data) == [data]
    (event,) = StreamFramer(max_buffer=len(data) - 1).feed(data)
    assert isinstance(event, FramingError)
    assert event.error.status == 413


def test_header_cap_without_end_of_headers() -> None:
    framer = StreamFramer(max_buffer=100)
    assert framer.feed(b"MESSAGE sip:a SIP/2.0\r\n" + b"X: y\r\n" * 10) == []
    (event,) = framer.feed(b"X: y\r\n" * 10)
    assert isinstance(event, FramingError)
    assert event.error.status == 513
