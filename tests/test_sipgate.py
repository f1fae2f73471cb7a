"""The SIP adapter's edge: what it answers itself, and what reaches the core."""

from __future__ import annotations

from typing import Any

import pytest

from component.errors import Refusal, not_found
from component.sip.gate import SipGate
from component.store import StoreUnavailable
from component.values import SipAnswer, SipText
from sipside.errors import PeerError
from sipside.message import SipRequest


class FakeIncoming:
    def __init__(self, request: SipRequest) -> None:
        self.request = request
        self.answered = False
        self.responses: list[tuple[int, dict[str, str]]] = []

    def respond(self, status: int, reason: str | None = None, *, headers: Any = ()) -> None:
        self.answered = True
        self.responses.append((status, dict(headers)))


class Core:
    """A message core: answers at once, or later with ``later`` (or raising it)."""

    def __init__(self) -> None:
        self.seen: list[SipText] = []
        self.now: SipAnswer | Exception | None = SipAnswer(202, "Accepted")
        self.later: SipAnswer | Exception = SipAnswer(202, "Accepted")

    def answer_now(self, msg: SipText) -> SipAnswer | None:
        self.seen.append(msg)
        if isinstance(self.now, Exception):
            raise self.now
        return self.now

    async def answer_later(self, msg: SipText) -> SipAnswer:
        if isinstance(self.later, Exception):
            raise self.later
        return self.later


class Presence:
    """A presence handler: answers 200 itself, or raises ``error`` before answering."""

    def __init__(self) -> None:
        self.handled: list[FakeIncoming] = []
        self.error: Exception | None = None
        self.answers = True

    async def handle_request(self, incoming: Any) -> None:
        self.handled.append(incoming)
        if self.error is not None:
            raise self.error
        if self.answers:
            incoming.respond(200)


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


def _gate() -> tuple[SipGate, Core, Presence]:
    core, presence = Core(), Presence()
    return SipGate(core, presence), core, presence


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


async def test_stopping_refuses_new_work_but_lets_in_dialog_requests_through() -> None:
    gate, core, presence = _gate()
    gate.accepting = False
    message = FakeIncoming(_request("MESSAGE"))
    gate.handle(message)  # type: ignore[arg-type]
    assert message.responses == [(503, {"Retry-After": "30"})]
    assert core.seen == []
    notify = FakeIncoming(_request("NOTIFY", to_tag="t1"))
    gate.handle(notify)  # type: ignore[arg-type]
    await gate.drain(5.0)
    assert notify.responses[0][0] == 200 and presence.handled == [notify]
    out_of_dialog = FakeIncoming(_request("NOTIFY"))
    gate.handle(out_of_dialog)  # type: ignore[arg-type]
    assert out_of_dialog.responses[0][0] == 503


@pytest.mark.parametrize(("method", "status"), [("PUBLISH", 489), ("REGISTER", 405)])
def test_presence_methods_without_presence(method: str, status: int) -> None:
    gate = SipGate(Core())
    incoming = FakeIncoming(_request(method))
    gate.handle(incoming)  # type: ignore[arg-type]
    assert incoming.responses[0][0] == status


def test_other_methods_not_allowed() -> None:
    gate, core, presence = _gate()
    incoming = FakeIncoming(_request("INFO"))
    gate.handle(incoming)  # type: ignore[arg-type]
    assert incoming.responses[0][0] == 405
    assert core.seen == [] and presence.handled == []


@pytest.mark.parametrize("method", ["SUBSCRIBE", "NOTIFY", "PUBLISH", "REGISTER"])
async def test_presence_methods_reach_the_presence_handler(method: str) -> None:
    gate, core, presence = _gate()
    incoming = FakeIncoming(_request(method))
    gate.handle(incoming)  # type: ignore[arg-type]
    await gate.drain(5.0)
    assert presence.handled == [incoming] and incoming.responses == [(200, {})]
    assert core.seen == []


@pytest.mark.parametrize(
    ("error", "status", "headers"),
    [
        (not_found("no such user"), 404, {"Warning": '399 sipxmpp "no such user"'}),
        (
            PeerError(481, "Call/Transaction Does Not Exist", 'no "dialog"'),
            481,
            {"Warning": '399 sipxmpp "no \\"dialog\\""'},
        ),
        (StoreUnavailable("down"), 503, {"Retry-After": "30"}),
        (RuntimeError("bug"), 500, {}),
    ],
)
async def test_presence_errors_become_responses(
    error: Exception, status: int, headers: dict[str, str]
) -> None:
    gate, _, presence = _gate()
    presence.error = error
    incoming = FakeIncoming(_request("SUBSCRIBE"))
    gate.handle(incoming)  # type: ignore[arg-type]
    await gate.drain(5.0)
    assert incoming.responses == [(status, headers)]


async def test_presence_handler_that_does_not_answer_gets_500() -> None:
    gate, _, presence = _gate()
    presence.answers = False
    incoming = FakeIncoming(_request("NOTIFY"))
    gate.handle(incoming)  # type: ignore[arg-type]
    await gate.drain(5.0)
    assert incoming.responses == [(500, {})]


def test_refusal_on_the_hot_path_is_answered_at_once() -> None:
    gate, core, _ = _gate()
    core.now = Refusal(403, "Forbidden", "forbidden", "no relaying")
    incoming = FakeIncoming(_request("MESSAGE"))
    gate.handle(incoming)  # type: ignore[arg-type]
    assert incoming.responses == [(403, {"Warning": '399 sipxmpp "no relaying"'})]


@pytest.mark.parametrize(
    ("later", "status", "headers"),
    [
        (SipAnswer(202, "Accepted"), 202, {}),
        (Refusal(503, "Service Unavailable", "x", retry_after=30), 503, {"Retry-After": "30"}),
    ],
)
async def test_slow_path_answers_when_done(
    later: SipAnswer | Exception, status: int, headers: dict[str, str]
) -> None:
    gate, core, _ = _gate()
    core.now, core.later = None, later
    incoming = FakeIncoming(_request("MESSAGE"))
    gate.handle(incoming)  # type: ignore[arg-type]
    assert incoming.responses == []
    await gate.drain(5.0)
    assert incoming.responses == [(status, headers)]


async def test_overload_refuses_before_starting_work() -> None:
    core, presence = Core(), Presence()
    gate = SipGate(core, presence, max_pending=1)
    core.now = None
    first, second = FakeIncoming(_request("MESSAGE")), FakeIncoming(_request("MESSAGE"))
    gate.handle(first)  # type: ignore[arg-type]
    gate.handle(second)  # type: ignore[arg-type]
    assert second.responses == [(503, {"Retry-After": "5"})]
    await gate.drain(5.0)
    assert first.responses == [(202, {})]
