"""The SIP adapter's edge: what it answers itself, and what reaches the core."""

from __future__ import annotations

from typing import Any

import pytest

from component.sip.gate import SipGate
from component.values import SipAnswer, SipText
from sipside.message import SipRequest


class FakeIncoming:
    def __init__(self, request: SipRequest) -> None:
        self.request = request
        self.answered = False
        self.responses: list[tuple[int, dict[str, str]]] = []

    def respond(self, status: int, reason: str | None = None, *, headers: Any = ()) -> None:
        self.answered = True
        self.responses.append((status, dict(headers)))


class FakeEndpoint:
    handler: Any = None


class Core:
    def __init__(self) -> None:
        self.seen: list[SipText] = []

    def on_sip_message(self, msg: SipText) -> SipAnswer:
        self.seen.append(msg)
        return SipAnswer(202, "Accepted")


def _request(
    method: str, *, to_tag: str | None = None, ctype: str = "text/plain", body: bytes = b"hi"
) -> SipRequest:
    to = "<sip:bob*xmpp.test@jabber.sip.test>" + (f";tag={to_tag}" if to_tag else "")
    return SipRequest(
        method,
        "sip:bob*xmpp.test@jabber.sip.test",
        (
            ("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1"),
            ("From", '"Alice" <sip:alice@sip.test>;tag=a'),
            ("To", to),
            ("Call-ID", "c1"),
            ("CSeq", f"1 {method}"),
            ("Content-Type", ctype),
        ),
        body,
    )


def _gate() -> tuple[SipGate, Core, list[FakeIncoming]]:
    gate = SipGate(FakeEndpoint())  # type: ignore[arg-type]
    core = Core()
    gate.core = core
    handled: list[FakeIncoming] = []

    def other(incoming: Any) -> SipAnswer:
        handled.append(incoming)
        return SipAnswer(200)

    gate.others["NOTIFY"] = other
    return gate, core, handled


def test_message_reaches_core_with_decoded_text() -> None:
    gate, core, _ = _gate()
    incoming = FakeIncoming(_request("MESSAGE"))
    gate.handle(incoming)  # type: ignore[arg-type]
    assert incoming.responses[0][0] == 202
    [text] = core.seen
    assert (text.from_uri, text.from_display, text.body) == ("sip:alice@sip.test", "Alice", "hi")


@pytest.mark.parametrize(
    ("ctype", "status", "header"),
    [("image/png", 415, "Accept"), ("text/plain; charset=nope", 400, None)],
)
def test_bad_bodies_answered_at_the_edge(ctype: str, status: int, header: str | None) -> None:
    gate, core, _ = _gate()
    incoming = FakeIncoming(_request("MESSAGE", ctype=ctype))
    gate.handle(incoming)  # type: ignore[arg-type]
    assert incoming.responses[0][0] == status
    if header:
        assert header in incoming.responses[0][1]
    assert core.seen == []


def test_stopping_refuses_new_work_but_lets_in_dialog_requests_through() -> None:
    gate, core, handled = _gate()
    gate.accepting = False
    message = FakeIncoming(_request("MESSAGE"))
    gate.handle(message)  # type: ignore[arg-type]
    assert message.responses == [(503, {"Retry-After": "30"})]
    assert core.seen == []
    notify = FakeIncoming(_request("NOTIFY", to_tag="t1"))
    gate.handle(notify)  # type: ignore[arg-type]
    assert notify.responses[0][0] == 200 and handled == [notify]
    out_of_dialog = FakeIncoming(_request("NOTIFY"))
    gate.handle(out_of_dialog)  # type: ignore[arg-type]
    assert out_of_dialog.responses[0][0] == 503


def test_unknown_event_methods_without_handler() -> None:
    gate, _, _ = _gate()
    incoming = FakeIncoming(_request("PUBLISH"))
    gate.handle(incoming)  # type: ignore[arg-type]
    assert incoming.responses[0][0] == 489
