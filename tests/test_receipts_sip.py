"""The SIP edge of DESIGN 4.3: bodies in (isComposing, CPIM with an IMDN request, IMDN
notifications) and MESSAGEs out (CPIM, 415 fallback remembered for cache_time)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from component.sip.bodies import decode_body
from component.sip.media import MediaSupport, accepts
from component.sip.sender import SipSender
from component.values import Composing, ImdnAsk, ImdnNews, ImdnStatus
from sipside import cpim, imdn, iscomposing
from sipside.errors import PeerError, TransactionTimeout
from sipside.message import SipRequest, SipResponse

UTC = datetime.UTC
WHEN = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _cpim_with_request(notify: tuple[str, ...], text: str = "hi") -> bytes:
    headers = imdn.request_headers("m-42", WHEN, notify)
    message = cpim.wrap(
        "sip:alice@sip.test",
        "sip:bob*xmpp.test@jabber.sip.test",
        text.encode(),
        extra_headers=headers,
    )
    return cpim.build(message)


# --- bodies in -----------------------------------------------------------------------------------


def test_iscomposing_body_is_composing_not_text() -> None:
    body = iscomposing.encode(iscomposing.IsComposing(iscomposing.ComposingState.ACTIVE, 30))
    got = decode_body(iscomposing.ISCOMPOSING_CONTENT_TYPE, body)
    assert (got.text, got.composing) == ("", Composing(True, 30))
    idle = iscomposing.encode(iscomposing.IsComposing(iscomposing.ComposingState.IDLE))
    assert decode_body(iscomposing.ISCOMPOSING_CONTENT_TYPE, idle).composing == Composing(False)


@pytest.mark.parametrize(
    ("notify", "delivery", "display"),
    [
        (("positive-delivery", "negative-delivery"), True, False),
        (("positive-delivery", "display"), True, True),
        (("display",), False, True),
    ],
)
def test_cpim_imdn_request(notify: tuple[str, ...], delivery: bool, display: bool) -> None:
    got = decode_body("message/cpim", _cpim_with_request(notify))
    assert got.text == "hi"
    assert got.imdn == ImdnAsk("m-42", WHEN.timestamp(), delivery=delivery, display=display)
    assert got.sent_at == WHEN.timestamp()


def test_cpim_asking_processing_only_asks_nothing() -> None:
    assert decode_body("message/cpim", _cpim_with_request(("processing",))).imdn is None


@pytest.mark.parametrize(
    ("kind", "disposition", "status"),
    [
        (imdn.NotificationKind.DELIVERY, imdn.Disposition.DELIVERED, ImdnStatus.DELIVERED),
        (imdn.NotificationKind.DELIVERY, imdn.Disposition.FAILED, ImdnStatus.FAILED),
        (imdn.NotificationKind.DELIVERY, imdn.Disposition.FORBIDDEN, ImdnStatus.FAILED),
        (imdn.NotificationKind.DISPLAY, imdn.Disposition.DISPLAYED, ImdnStatus.DISPLAYED),
        (imdn.NotificationKind.PROCESSING, imdn.Disposition.STORED, ImdnStatus.PROCESSED),
    ],
)
def test_imdn_notification_in_cpim(
    kind: imdn.NotificationKind, disposition: imdn.Disposition, status: ImdnStatus
) -> None:
    note = imdn.DispositionNotification("m-7", WHEN, kind, disposition)
    message = imdn.notification_message(note, "sip:alice@sip.test", "sip:b@x", "n-1", WHEN)
    got = decode_body("message/cpim", cpim.build(message))
    assert got.notification == ImdnNews("m-7", status, WHEN.timestamp())
    assert got.text == "" and got.imdn is None


def test_bad_iscomposing_is_400() -> None:
    with pytest.raises(PeerError) as err:
        decode_body(iscomposing.ISCOMPOSING_CONTENT_TYPE, b"<nope/>")
    assert err.value.status == 400


# --- media refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "media", "ok"),
    [
        (None, "message/cpim", True),
        ("text/plain", "message/cpim", False),
        ("text/plain, message/cpim", "message/cpim", True),
        ("message/*", "message/cpim", True),
        ("*/*", "application/im-iscomposing+xml", True),
        ("text/plain;q=0.5, ;;, @@", "message/cpim", False),
    ],
)
def test_accepts(accept: str | None, media: str, ok: bool) -> None:
    assert accepts(accept, media) is ok


def test_support_expires_and_is_bounded() -> None:
    memory = MediaSupport(600.0, max_entries=2)
    memory.remember("sip:a@x", "message/cpim", False, 0.0)
    assert memory.takes("sip:a@x", "message/cpim", 599.0) is False
    assert memory.takes("sip:a@x", "message/cpim", 600.0) is None
    for n in range(3):
        memory.remember(f"sip:{n}@x", "message/cpim", True, 1.0)
    assert len(memory) == 2 and memory.takes("sip:0@x", "message/cpim", 2.0) is None
    assert memory.takes("sip:2@x", "message/cpim", 2.0) is True


# --- MESSAGEs out --------------------------------------------------------------------------------


EVERYTHING = "text/plain, message/cpim, application/im-iscomposing+xml"


class FakeEndpoint:
    """Answers each MESSAGE with the next scripted (status, headers), OPTIONS with ``options``
    (status, Accept); records the requests."""

    def __init__(
        self,
        *answers: tuple[int, tuple[tuple[str, str], ...]],
        options: tuple[int, str | None] = (200, EVERYTHING),
    ) -> None:
        self.answers = list(answers)
        self.options = options
        self.requests: list[SipRequest] = []

    async def request(self, request: SipRequest) -> SipResponse:
        self.requests.append(request)
        if request.method == "OPTIONS":
            status, accept = self.options
            if status == 0:
                raise TransactionTimeout("no answer")  # a client or proxy that drops OPTIONS
            return SipResponse(status, "X", () if accept is None else (("Accept", accept),))
        status, headers = self.answers.pop(0) if self.answers else (200, ())
        return SipResponse(status, "X", headers)

    @property
    def messages(self) -> list[SipRequest]:
        return [r for r in self.requests if r.method == "MESSAGE"]

    @property
    def probes(self) -> int:
        return sum(r.method == "OPTIONS" for r in self.requests)


class Clock:
    now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _sender(endpoint: FakeEndpoint, clock: Clock) -> SipSender:
    return SipSender(endpoint, cache_time=600.0, clock=clock)  # type: ignore[arg-type]


def _content_types(endpoint: FakeEndpoint) -> list[str | None]:
    return [r.header("Content-Type") for r in endpoint.messages]


async def test_imdn_request_goes_in_cpim() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    ask = ImdnAsk("o-1", WHEN.timestamp(), delivery=True, display=True)
    status = await _sender(endpoint, clock).send_text(
        from_uri="sip:b*x@j", to_uri="sip:alice@sip.test", body="héllo", imdn=ask
    )
    assert status == 200
    [request] = endpoint.messages
    assert request.header("Content-Type") == "message/cpim"
    parsed = cpim.parse(request.body)
    assert parsed.text() == "héllo"
    wanted = imdn.requested(parsed)
    assert wanted is not None and wanted.message_id == "o-1" and wanted.date_time == WHEN
    assert wanted.notifications == {"positive-delivery", "negative-delivery", "display"}


async def test_late_text_carries_its_datetime() -> None:
    endpoint = FakeEndpoint()
    await _sender(endpoint, Clock()).send_text(
        from_uri="sip:b*x@j", to_uri="sip:alice@sip.test", body="late", sent_at=WHEN.timestamp()
    )
    parsed = cpim.parse(endpoint.messages[0].body)
    assert parsed.date_time() == WHEN and parsed.text() == "late"
    assert imdn.requested(parsed) is None


@pytest.mark.parametrize(("waited", "stamped"), [(30.0, False), (3600.0, True)])
async def test_late_text_to_a_client_without_cpim_says_when_in_its_text(
    waited: float, stamped: bool
) -> None:
    endpoint, clock = FakeEndpoint(options=(200, "text/plain")), Clock()
    clock.now = WHEN.timestamp() + waited
    await _sender(endpoint, clock).send_text(
        from_uri="sip:b*x@j", to_uri="sip:alice@sip.test", body="late", sent_at=WHEN.timestamp()
    )
    text = endpoint.messages[0].body.decode()
    assert text == ("[sent 2026-01-02 03:04 UTC] late" if stamped else "late")


async def test_415_to_cpim_resends_plain_and_remembers_for_cache_time() -> None:
    endpoint, clock = FakeEndpoint((415, (("Accept", "text/plain"),))), Clock()
    sender = _sender(endpoint, clock)
    ask = ImdnAsk("o-2", 1.0)
    args: dict[str, Any] = {"from_uri": "sip:b*x@j", "to_uri": "sip:alice@sip.test"}
    assert await sender.send_text(body="one", imdn=ask, **args) == 200
    assert _content_types(endpoint) == ["message/cpim", "text/plain; charset=UTF-8"]
    assert endpoint.messages[1].body == b"one"  # the same text, nothing lost
    clock.now += 599
    await sender.send_text(body="two", imdn=ask, **args)
    assert _content_types(endpoint)[2:] == ["text/plain; charset=UTF-8"]
    assert (
        await sender.send_notification(
            message_id="x", sent_at=1.0, status=ImdnStatus.DELIVERED, **args
        )
        == 415
    )  # receipts quietly off for that client: nothing sent
    assert len(endpoint.messages) == 3 and endpoint.probes == 1
    clock.now += 1  # cache_time over: CPIM is tried again
    await sender.send_text(body="three", imdn=ask, **args)
    assert _content_types(endpoint)[3:] == ["message/cpim"]


async def test_415_that_accepts_cpim_is_not_a_media_refusal() -> None:
    endpoint = FakeEndpoint((415, (("Accept", "message/cpim"),)))
    status = await _sender(endpoint, Clock()).send_text(
        from_uri="sip:b*x@j", to_uri="sip:alice@sip.test", body="x", imdn=ImdnAsk("o", 1.0)
    )
    assert status == 415 and len(endpoint.messages) == 1


async def test_415_to_iscomposing_stops_typing_to_that_client() -> None:
    endpoint, clock = FakeEndpoint((415, (("Accept", "text/plain, message/cpim"),))), Clock()
    sender = _sender(endpoint, clock)
    args: dict[str, Any] = {"from_uri": "sip:b*x@j", "to_uri": "sip:alice@sip.test"}
    assert await sender.send_composing(active=True, refresh=60, **args) == 415
    assert await sender.send_composing(active=False, refresh=None, **args) == 415
    assert len(endpoint.messages) == 1
    # text and CPIM still go to that client
    await sender.send_text(body="x", imdn=ImdnAsk("o", 1.0), **args)
    assert _content_types(endpoint)[1:] == ["message/cpim"]


async def test_composing_and_notification_bodies() -> None:
    endpoint = FakeEndpoint()
    sender = _sender(endpoint, Clock())
    await sender.send_composing(
        from_uri="sip:b*x@j", to_uri="sip:alice@sip.test", active=True, refresh=60
    )
    await sender.send_notification(
        from_uri="sip:b*x@j",
        to_uri="sip:alice@sip.test",
        message_id="m-9",
        sent_at=WHEN.timestamp(),
        status=ImdnStatus.DISPLAYED,
    )
    typing, note = endpoint.messages
    doc = iscomposing.decode(typing.body, typing.header("Content-Type"))
    assert (doc.state, doc.refresh) == (iscomposing.ComposingState.ACTIVE, 60)
    wrapper = cpim.parse(note.body)
    assert wrapper.sender() == "sip:b*x@j" and wrapper.recipients() == ("sip:alice@sip.test",)
    assert imdn.requested(wrapper) is None  # RFC 5438: a notification asks for none
    parsed = imdn.decode_notification(wrapper.body, wrapper.content_type)
    assert (parsed.message_id, parsed.date_time, parsed.status) == (
        "m-9",
        WHEN,
        imdn.Disposition.DISPLAYED,
    )


@pytest.mark.parametrize(
    ("options", "cpim_ok", "typing_ok", "remembered"),
    [
        ((200, EVERYTHING), True, True, True),
        # PJSIP's answer: it takes isComposing, and shows CPIM as raw text, so gets none
        ((200, "application/sdp, text/plain, application/im-iscomposing+xml"), False, True, True),
        ((200, None), False, False, True),  # says nothing of what it takes: plain only
        ((405, None), False, False, True),  # no OPTIONS: plain only
        ((404, None), False, False, False),  # offline now: plain this time, asked again later
        ((408, None), False, False, False),
        ((0, None), False, False, True),  # no answer at all: plain, not asked per message
    ],
)
async def test_options_decides_cpim_and_typing(
    options: tuple[int, str | None], cpim_ok: bool, typing_ok: bool, remembered: bool
) -> None:
    endpoint, clock = FakeEndpoint(options=options), Clock()
    sender = _sender(endpoint, clock)
    args: dict[str, Any] = {"from_uri": "sip:b*x@j", "to_uri": "sip:alice@sip.test"}
    for body in ("one", "two"):
        await sender.send_text(body=body, imdn=ImdnAsk("o", 1.0), **args)
    typing = await sender.send_composing(active=True, refresh=60, **args)
    expected = "message/cpim" if cpim_ok else "text/plain; charset=UTF-8"
    assert _content_types(endpoint)[:2] == [expected, expected]
    assert (typing != 415) is typing_ok
    assert endpoint.probes == (1 if remembered else 3)
    clock.now += 600  # cache_time over: asked again
    await sender.send_text(body="three", imdn=ImdnAsk("o", 1.0), **args)
    assert endpoint.probes == (2 if remembered else 4)


async def test_plain_text_needs_no_probe() -> None:
    endpoint = FakeEndpoint(options=(200, "text/plain"))
    await _sender(endpoint, Clock()).send_text(
        from_uri="sip:b*x@j", to_uri="sip:alice@sip.test", body="plain"
    )
    assert endpoint.probes == 0 and endpoint.messages[0].body == b"plain"
