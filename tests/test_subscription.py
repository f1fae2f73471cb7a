"""Dialogs and RFC 6665 subscriptions: subscriber and notifier cores on a fake clock."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import fields, replace
from typing import Any

import pytest

from sipside.dialog import Dialog, strip_tag
from sipside.digest import Credentials, DigestClient, parse_auth_params
from sipside.errors import PeerError
from sipside.message import SipMessage, SipRequest, SipResponse, make_response, parse_message
from sipside.notifier import Notifier, NotifierPolicy, NotifierSnapshot, NotifierState
from sipside.subscription import (
    NOTIFY_TIMEOUT_FACTOR,
    EventHeader,
    SendRequest,
    SendResponse,
    StateChanged,
    Subscriber,
    SubscriberState,
    SubscriptionEffect,
    SubscriptionEnded,
    SubscriptionState,
    SubscriptionStateHeader,
    parse_event,
    parse_subscription_state,
    refresh_delay,
    resubscribe_delay,
)

GW = "sip:gw@127.0.0.1:5070"
PEER = "sip:ps@127.0.0.1:5060"
BOB = "<sip:bob*xmpp.test@jabber.sip.test>"
ALICE = "<sip:alice@sip.test>"
T1 = 0.5
NOTIFY_WAIT = NOTIFY_TIMEOUT_FACTOR * T1


def wire(message: SipMessage) -> SipMessage:
    """What the peer receives: with a Via added by the transport, through bytes and back."""
    if isinstance(message, SipRequest) and not message.header("Via"):
        message = message.add_header(
            "Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKt", first=True
        )
    return parse_message(bytes(message))


def wire_request(message: SipMessage) -> SipRequest:
    request = wire(message)
    assert isinstance(request, SipRequest)
    return request


def reply(
    request: SipRequest, status: int, headers: Iterable[tuple[str, str]] = (), tag: str = "nt"
) -> SipResponse:
    response = wire(make_response(wire_request(request), status, to_tag=tag, headers=headers))
    assert isinstance(response, SipResponse)
    return response


def sent(effects: Sequence[SubscriptionEffect]) -> list[SipRequest]:
    return [wire_request(e.request) for e in effects if isinstance(e, SendRequest)]


def answered(effects: Sequence[SubscriptionEffect]) -> list[int]:
    return [e.response.status for e in effects if isinstance(e, SendResponse)]


def changes(effects: Sequence[SubscriptionEffect]) -> list[StateChanged]:
    return [e for e in effects if isinstance(e, StateChanged)]


# -- dialog ----------------------------------------------------------------------------------


def _invite_like() -> tuple[SipRequest, SipResponse]:
    request = wire_request(
        SipRequest(
            "SUBSCRIBE",
            "sip:alice@sip.test",
            (
                ("From", f"{BOB};tag=a1"),
                ("To", ALICE),
                ("Call-ID", "cid"),
                ("CSeq", "7 SUBSCRIBE"),
                ("Contact", f"<{GW}>"),
                ("Record-Route", "<sip:p1;lr>, <sip:p2;lr>"),
            ),
        )
    )
    response = reply(
        request, 200, [("Contact", f"<{PEER}>"), ("Record-Route", "<sip:p1;lr>, <sip:p2;lr>")]
    )
    return request, response


def test_dialog_from_uac_and_uas() -> None:
    request, response = _invite_like()
    uac = Dialog.from_uac(request, response)
    assert (uac.call_id, uac.local_tag, uac.remote_tag) == ("cid", "a1", "nt")
    assert (uac.local_uri, uac.remote_uri) == (BOB, ALICE)
    assert (uac.local_cseq, uac.remote_cseq, uac.remote_target) == (7, None, PEER)
    assert uac.route_set == ("<sip:p2;lr>", "<sip:p1;lr>")  # RFC 3261 12.1.2: reversed
    uas = Dialog.from_uas(request, "b2")
    assert (uas.local_tag, uas.remote_tag, uas.remote_cseq, uas.local_cseq) == ("b2", "a1", 7, 0)
    assert (uas.local_uri, uas.remote_uri, uas.remote_target) == (ALICE, BOB, GW)
    assert uas.route_set == ("<sip:p1;lr>", "<sip:p2;lr>")  # RFC 3261 12.1.1: in order


def test_dialog_request_routes_and_numbers() -> None:
    request, response = _invite_like()
    dialog = Dialog.from_uac(request, response)
    dialog, first = dialog.request("SUBSCRIBE", headers=[("Expires", "0")])
    dialog, second = dialog.request("NOTIFY")
    assert first.uri == PEER
    assert first.header_values("Route") == ["<sip:p2;lr>", "<sip:p1;lr>"]
    assert first.header("Via") is None
    assert [first.cseq, second.cseq] == [(8, "SUBSCRIBE"), (9, "NOTIFY")]
    assert (first.from_tag, first.to_tag, first.call_id) == ("a1", "nt", "cid")
    assert first.header("Expires") == "0"
    assert dialog.local_cseq == 9


def test_dialog_receive_checks_cseq_and_refreshes_target() -> None:
    request, _ = _invite_like()
    dialog = Dialog.from_uas(request, "b2")
    newer = wire_request(
        request.replace_headers("CSeq", ["8 SUBSCRIBE"]).replace_headers("Contact", ["<sip:n@x>"])
    )
    assert dialog.receive(newer, target_refresh=True).remote_target == "sip:n@x"
    assert dialog.receive(newer).remote_target == GW
    older = request.replace_headers("CSeq", ["6 SUBSCRIBE"])
    with pytest.raises(PeerError) as info:
        dialog.receive(older)
    assert info.value.status == 500


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<sip:a@b>;tag=x", "<sip:a@b>"),
        ('"A;tag=q" <sip:a@b;tag=u>;x=1;tag=9', '"A;tag=q" <sip:a@b;tag=u>;x=1'),
        ("sip:a@b;tag=1;foo", "sip:a@b;foo"),
        ("sip:a@b", "sip:a@b"),
    ],
)
def test_strip_tag(value: str, expected: str) -> None:
    assert strip_tag(value) == expected


# -- header helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("active;expires=60", SubscriptionStateHeader(SubscriptionState.ACTIVE, expires=60)),
        ("Pending", SubscriptionStateHeader(SubscriptionState.PENDING)),
        (
            "terminated;reason=probation;retry-after=30",
            SubscriptionStateHeader(SubscriptionState.TERMINATED, None, "probation", 30),
        ),
        ("frobbed; expires = 5", SubscriptionStateHeader(None, expires=5)),
    ],
)
def test_parse_subscription_state(value: str, expected: SubscriptionStateHeader) -> None:
    assert parse_subscription_state(value) == expected


@pytest.mark.parametrize("value", ["", "active;expires=soon", "active;expires=-1"])
def test_parse_subscription_state_errors(value: str) -> None:
    with pytest.raises(PeerError) as info:
        parse_subscription_state(value)
    assert info.value.status == 400


def test_parse_event() -> None:
    assert parse_event("presence;id=7") == EventHeader("presence", "7")
    assert parse_event("Presence").matches(EventHeader("presence"))
    assert not parse_event("presence;id=1").matches(EventHeader("presence"))
    for bad in (None, " ;id=2"):
        with pytest.raises(PeerError) as info:
            parse_event(bad)
        assert info.value.status == 489


@pytest.mark.parametrize(
    ("expires", "offset", "delay"),
    [
        (3600, 0.0, 3568.0),
        (60, 0.0, 30.0),
        (3600, 100.0, 3468.0),
        (3600, 10_000.0, 900.0),
        (3600, -50.0, 3568.0),
        (10, 0.0, 5.0),
    ],
)
def test_refresh_delay(expires: int, offset: float, delay: float) -> None:
    assert refresh_delay(expires, offset) == delay


@pytest.mark.parametrize(
    ("reason", "retry_after", "delay"),
    [
        ("deactivated", None, 0.0),
        ("timeout", None, 0.0),
        ("probation", 30, 30.0),
        ("giveup", 600, 600.0),
        ("rejected", 30, None),
        ("noresource", None, None),
        ("invariant", None, None),
        ("something-new", 7, 7.0),
    ],
)
def test_resubscribe_delay(reason: str, retry_after: int | None, delay: float | None) -> None:
    assert resubscribe_delay(reason, retry_after) == delay


# -- subscriber ------------------------------------------------------------------------------


def subscriber(**kwargs: object) -> Subscriber:
    return Subscriber(
        local_uri=BOB,
        remote_uri=ALICE,
        contact=GW,
        event="presence",
        expires=600,
        accept=("application/pidf+xml",),
        call_id="call-1",
        local_tag="sub",
        t1=T1,
        **kwargs,  # type: ignore[arg-type]
    )


def state_of(sub: Subscriber) -> SubscriberState:
    """The state read afresh (keeps mypy from narrowing across calls that change it)."""
    return sub.state


def notify_for(
    subscribe: SipRequest,
    state: str,
    body: bytes = b"",
    cseq: int = 1,
    event: str = "presence",
) -> SipRequest:
    """A NOTIFY as the notifier would send it in the dialog of ``subscribe``."""
    dialog = Dialog.from_uas(wire_request(subscribe), "nt")
    headers = [("Event", event), ("Subscription-State", state), ("Contact", f"<{PEER}>")]
    if body:
        headers.append(("Content-Type", "application/pidf+xml"))
    _, request = dialog.request("NOTIFY", headers=headers, body=body, cseq=cseq)
    return wire_request(request)


def established(now: float = 0.0) -> tuple[Subscriber, SipRequest]:
    """A subscriber that got its 2xx (Expires 600) and an active NOTIFY at ``now``."""
    sub = subscriber()
    [initial] = sent(sub.start(now))
    sub.handle_response(reply(initial, 200, [("Expires", "600"), ("Contact", f"<{PEER}>")]), now)
    sub.handle_notify(notify_for(initial, "active;expires=600", b"<x/>"), now)
    assert sub.state is SubscriberState.ACTIVE
    return sub, initial


def test_initial_subscribe() -> None:
    sub = subscriber()
    [request] = sent(sub.start(0.0))
    assert (request.method, request.uri, request.to_tag) == (
        "SUBSCRIBE",
        "sip:alice@sip.test",
        None,
    )
    assert request.header("Event") == "presence"
    assert request.header("Expires") == "600"
    assert request.header("Accept") == "application/pidf+xml"
    assert request.header("Contact") == f"<{GW}>"
    assert request.cseq == (1, "SUBSCRIBE")
    assert sub.state is SubscriberState.SUBSCRIBING and sub.next_deadline() is None


@pytest.mark.parametrize("notify_first", [False, True])
def test_2xx_and_first_notify_in_either_order(notify_first: bool) -> None:
    sub = subscriber()
    [initial] = sent(sub.start(0.0))
    ok = reply(initial, 202, [("Expires", "300"), ("Contact", f"<{PEER}>")])
    notify = notify_for(initial, "pending")
    effects: list[SubscriptionEffect] = []
    for step in ("notify", "ok") if notify_first else ("ok", "notify"):
        if step == "ok":
            effects += sub.handle_response(ok, 10.0)
        else:
            effects += sub.handle_notify(notify, 10.0)
    assert answered(effects) == [200]
    assert [c.state for c in changes(effects)] == [SubscriptionState.PENDING]
    assert sub.state is SubscriberState.PENDING
    assert (sub.dialog.remote_tag, sub.dialog.remote_target) == ("nt", PEER)
    assert sub.expires_at == 310.0
    assert sub.next_deadline() == 10.0 + refresh_delay(300)


def test_no_notify_after_2xx_fails_the_subscription() -> None:
    sub = subscriber()
    [initial] = sent(sub.start(0.0))
    sub.handle_response(reply(initial, 200, [("Expires", "600")]), 1.0)
    assert sub.state is SubscriberState.ACCEPTED
    assert sub.next_deadline() == 1.0 + NOTIFY_WAIT
    assert sub.handle_timer(1.0 + NOTIFY_WAIT - 0.1) == []
    [change] = changes(sub.handle_timer(1.0 + NOTIFY_WAIT))
    assert (change.state, change.reason) == (SubscriptionState.TERMINATED, "timeout")
    assert state_of(sub) is SubscriberState.TERMINATED and sub.next_deadline() is None


def test_refresh_is_sent_in_dialog_and_extends() -> None:
    sub, _ = established()
    at = sub.next_deadline()
    assert at == refresh_delay(600)
    assert sub.handle_timer(at - 1) == []
    [refresh] = sent(sub.handle_timer(at))
    assert (refresh.to_tag, refresh.cseq, refresh.uri) == ("nt", (2, "SUBSCRIBE"), PEER)
    assert refresh.header("Expires") == "600"
    assert sub.next_deadline() == 600.0  # expiry only while the refresh is in flight
    sub.handle_response(reply(refresh, 200, [("Expires", "500")]), at)
    assert sub.expires_at == at + 500
    assert sub.next_deadline() == at + refresh_delay(500)


@pytest.mark.parametrize(
    ("status", "ends"),
    [(481, True), (404, True), (408, True), (489, True), (500, False), (503, False)],
)
def test_refresh_failure(status: int, ends: bool) -> None:
    sub, _ = established()
    at = sub.next_deadline()
    assert at is not None
    [refresh] = sent(sub.handle_timer(at))
    if status == 408:
        effects = sub.handle_timeout(refresh.cseq[0], at + 32)
    else:
        effects = sub.handle_response(reply(refresh, status), at + 1)
    if ends:
        [change] = changes(effects)
        assert (change.state, change.status) == (SubscriptionState.TERMINATED, status)
        assert sub.state is SubscriberState.TERMINATED
    else:
        # RFC 6665 4.1.2.2: still valid until it expires, then over.
        assert effects == [] and sub.state is SubscriberState.ACTIVE
        assert sub.next_deadline() == 600.0
        [change] = changes(sub.handle_timer(600.0))
        assert (change.state, change.reason) == (SubscriptionState.TERMINATED, "timeout")


@pytest.mark.parametrize(
    ("value", "reason", "retry_after"),
    [
        ("terminated;reason=rejected", "rejected", None),
        ("terminated;reason=probation;retry-after=30", "probation", 30),
        ("terminated;reason=deactivated", "deactivated", None),
        ("terminated", None, None),
    ],
)
def test_terminating_notify(value: str, reason: str | None, retry_after: int | None) -> None:
    sub, initial = established()
    effects = sub.handle_notify(notify_for(initial, value, cseq=2), 5.0)
    assert answered(effects) == [200]
    [change] = changes(effects)
    assert (change.state, change.reason, change.retry_after) == (
        SubscriptionState.TERMINATED,
        reason,
        retry_after,
    )
    assert sub.next_deadline() is None
    assert answered(sub.handle_notify(notify_for(initial, "active", cseq=3), 6.0)) == [481]


def test_notify_expires_param_moves_expiry() -> None:
    sub, initial = established()
    effects = sub.handle_notify(notify_for(initial, "active;expires=100", b"<y/>", cseq=2), 50.0)
    [change] = changes(effects)
    assert (change.body, change.content_type) == (b"<y/>", "application/pidf+xml")
    assert sub.expires_at == 150.0
    assert sub.next_deadline() == 50.0 + refresh_delay(100)


def test_bad_notifies_are_answered_with_errors() -> None:
    sub, initial = established()
    good = notify_for(initial, "active", cseq=5)
    assert answered(sub.handle_notify(good, 4.0)) == [200]
    cases = {
        489: notify_for(initial, "active", cseq=6, event="dialog"),
        481: good.replace_headers("Call-ID", ["other"]),
        400: good.replace_headers("Subscription-State", []),
        500: notify_for(initial, "active", cseq=3),  # lower than the 5 already seen
    }
    for status, request in cases.items():
        assert answered(sub.handle_notify(request, 5.0)) == [status], status
    assert sub.state is SubscriberState.ACTIVE


def test_unsubscribe_then_final_notify_or_timeout() -> None:
    for final_notify in (True, False):
        sub, initial = established()
        [unsub] = sent(sub.unsubscribe(20.0))
        assert unsub.header("Expires") == "0" and unsub.to_tag == "nt"
        assert sub.state is SubscriberState.UNSUBSCRIBING
        assert sub.handle_response(reply(unsub, 200, [("Expires", "0")]), 20.1) == []
        if final_notify:
            effects = sub.handle_notify(
                notify_for(initial, "terminated;reason=timeout", cseq=2), 21
            )
            assert [c.state for c in changes(effects)] == [SubscriptionState.TERMINATED]
        else:
            assert sub.next_deadline() == 20.0 + NOTIFY_WAIT
            assert changes(sub.handle_timer(20.0 + NOTIFY_WAIT))[0].reason == "timeout"
        assert state_of(sub) is SubscriberState.TERMINATED


def test_unsubscribe_before_answer_waits_for_the_dialog() -> None:
    sub = subscriber()
    [initial] = sent(sub.start(0.0))
    assert sub.unsubscribe(0.5) == []
    [unsub] = sent(sub.handle_response(reply(initial, 200, [("Expires", "600")]), 1.0))
    assert (unsub.header("Expires"), unsub.to_tag) == ("0", "nt")


@pytest.mark.parametrize(("status", "resent"), [(403, False), (423, True), (489, False)])
def test_initial_failure(status: int, resent: bool) -> None:
    sub = subscriber()
    [initial] = sent(sub.start(0.0))
    effects = sub.handle_response(reply(initial, status, [("Min-Expires", "1200")]), 1.0)
    if resent:
        [again] = sent(effects)
        assert (again.header("Expires"), again.cseq[0]) == ("1200", 2)
        assert sub.state is SubscriberState.SUBSCRIBING
    else:
        [change] = changes(effects)
        assert change.status == status and sub.state is SubscriberState.TERMINATED


def test_proxy_challenge_is_answered_once() -> None:
    sub = subscriber(digest=DigestClient(Credentials("gw", "pw")))
    [initial] = sent(sub.start(0.0))
    challenge = ("Proxy-Authenticate", 'Digest realm="sip.test", nonce="n1", qop="auth"')
    [retry] = sent(sub.handle_response(reply(initial, 407, [challenge]), 0.1))
    assert retry.cseq == (2, "SUBSCRIBE")
    assert parse_auth_params(retry.header("Proxy-Authorization") or "")[1]["username"] == "gw"
    [change] = changes(sub.handle_response(reply(retry, 407, [challenge]), 0.2))
    assert change.status == 407


def test_snapshot_restore_spreads_overdue_refresh() -> None:
    sub, _ = established()
    snap = sub.snapshot()
    assert snap.state == "active" and snap.remote_tag == "nt" and snap.local_cseq == 1
    later = snap.refresh_at + 100.0 if snap.refresh_at else 0.0
    restored = Subscriber.restore(snap, later, spread=7.0, t1=T1)
    assert restored.state is SubscriberState.ACTIVE
    assert restored.next_deadline() == later + 7.0
    [refresh] = sent(restored.handle_timer(later + 7.0))
    assert (refresh.cseq, refresh.to_tag, refresh.call_id) == ((2, "SUBSCRIBE"), "nt", "call-1")
    # A snapshot whose refresh is still ahead keeps its time.
    assert Subscriber.restore(snap, 10.0, spread=7.0).next_deadline() == snap.refresh_at


def test_restore_while_subscribing_resends_initial() -> None:
    sub = subscriber()
    sub.start(0.0)
    restored = Subscriber.restore(sub.snapshot(), 50.0, spread=3.0)
    assert restored.next_deadline() == 53.0
    [again] = sent(restored.handle_timer(53.0))
    assert again.to_tag is None and again.cseq == (2, "SUBSCRIBE")


# -- notifier --------------------------------------------------------------------------------


def incoming_subscribe(expires: str | None = "600", event: str = "presence") -> SipRequest:
    headers = [
        ("From", f"{ALICE};tag=w1"),
        ("To", BOB),
        ("Call-ID", "n-call"),
        ("CSeq", "1 SUBSCRIBE"),
        ("Contact", "<sip:alice@127.0.0.1:5080>"),
        ("Event", event),
    ]
    if expires is not None:
        headers.append(("Expires", expires))
    return wire_request(
        SipRequest("SUBSCRIBE", "sip:bob*xmpp.test@jabber.sip.test", tuple(headers))
    )


POLICY = NotifierPolicy(min_expires=60, max_expires=3600, accept_status=202)


def accept(
    request: SipRequest | None = None, now: float = 0.0, **kw: object
) -> tuple[Notifier | None, list[SubscriptionEffect]]:
    return Notifier.accept(
        request or incoming_subscribe(),
        now,
        events=["presence"],
        contact=GW,
        policy=POLICY,
        local_tag="nt",
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("request_", "status", "header"),
    [
        (incoming_subscribe(event="dialog"), 489, ("Allow-Events", "presence")),
        (incoming_subscribe(expires="30"), 423, ("Min-Expires", "60")),
        (incoming_subscribe(expires="soon"), 400, None),
        (incoming_subscribe().replace_headers("Contact", []), 400, None),
        (incoming_subscribe().replace_headers("Event", []), 489, ("Allow-Events", "presence")),
    ],
)
def test_accept_refusals(request_: SipRequest, status: int, header: tuple[str, str] | None) -> None:
    notifier, effects = accept(request_)
    assert notifier is None
    [effect] = effects
    assert isinstance(effect, SendResponse) and effect.response.status == status
    if header is not None:
        assert effect.response.header(header[0]) == header[1]


@pytest.mark.parametrize(("asked", "granted"), [("600", 600), ("99999", 3600), (None, 3600)])
def test_accept_grants_bounded_expires_and_notifies_pending(
    asked: str | None, granted: int
) -> None:
    notifier, effects = accept(incoming_subscribe(asked), 100.0)
    assert notifier is not None and notifier.state is NotifierState.PENDING
    [response] = [e.response for e in effects if isinstance(e, SendResponse)]
    assert (response.status, response.to_tag) == (202, "nt")
    assert response.header("Expires") == str(granted)
    [notify] = sent(effects)
    assert notify.uri == "sip:alice@127.0.0.1:5080"
    assert notify.header("Subscription-State") == f"pending;expires={granted}"
    assert (notify.body, notify.header("Content-Type")) == (b"", None)
    assert (notify.from_tag, notify.to_tag) == ("nt", "w1")
    assert notifier.next_deadline() == 100.0 + granted


def test_activate_notify_and_coalescing() -> None:
    notifier, effects = accept()
    assert notifier is not None
    [pending] = sent(effects)
    assert notifier.notify(1.0, b"<early/>", "application/pidf+xml") == []  # pending: hidden
    # Only one NOTIFY in flight: activation waits for the answer to the pending one.
    assert notifier.activate(2.0) == []
    [active] = sent(notifier.handle_response(reply(pending, 200, tag="w1"), 2.0))
    assert active.header("Subscription-State") == "active;expires=598"
    assert (active.body, active.header("Content-Type")) == (b"<early/>", "application/pidf+xml")
    # Later changes while it is in flight merge into one NOTIFY with the latest state.
    assert notifier.notify(3.0, b"<a/>") == []
    assert notifier.notify(4.0, b"<b/>") == []
    [merged] = sent(notifier.handle_response(reply(active, 200, tag="w1"), 5.0))
    assert merged.body == b"<b/>" and merged.cseq == (3, "NOTIFY")
    assert notifier.handle_response(reply(merged, 200, tag="w1"), 5.0) == []


def test_refresh_and_unsubscribe_in_dialog() -> None:
    notifier, effects = accept()
    assert notifier is not None
    [first] = sent(effects)
    notifier.handle_response(reply(first, 200, tag="w1"), 0.1)
    request = incoming_subscribe("1200")
    refresh = wire_request(
        request.replace_headers("To", [f"{BOB};tag=nt"]).replace_headers("CSeq", ["2 SUBSCRIBE"])
    )
    effects = notifier.handle_subscribe(refresh, 100.0)
    assert answered(effects) == [200] and len(sent(effects)) == 1
    assert notifier.expires_at == 1300.0
    brief = refresh.replace_headers("CSeq", ["3 SUBSCRIBE"]).replace_headers("Expires", ["5"])
    assert answered(notifier.handle_subscribe(brief, 101.0)) == [423]
    assert answered(notifier.handle_subscribe(refresh, 102.0)) == [500]  # CSeq 2 again < 3
    unsub = refresh.replace_headers("CSeq", ["4 SUBSCRIBE"]).replace_headers("Expires", ["0"])
    effects = notifier.handle_subscribe(unsub, 103.0)
    assert answered(effects) == [200]
    [final] = sent(effects)
    assert final.header("Subscription-State") == "terminated;reason=timeout"
    assert SubscriptionEnded("timeout") in effects
    assert notifier.state is NotifierState.TERMINATED and notifier.next_deadline() is None
    assert answered(notifier.handle_subscribe(unsub, 104.0)) == [481]


def test_expiry_and_terminate() -> None:
    notifier, _ = accept(state=NotifierState.ACTIVE, body=b"<p/>", content_type="x/y")
    assert notifier is not None
    assert notifier.handle_timer(599.0) == []
    effects = notifier.handle_timer(600.0)
    [final] = sent(effects)
    assert final.header("Subscription-State") == "terminated;reason=timeout"
    assert effects[-1] == SubscriptionEnded("timeout")
    other, _ = accept()
    assert other is not None
    effects = other.terminate(5.0, "rejected", retry_after=60)
    [final] = sent(effects)
    assert final.header("Subscription-State") == "terminated;reason=rejected;retry-after=60"
    assert other.terminate(6.0, "rejected") == []


@pytest.mark.parametrize(
    ("status", "retry_after", "ended"),
    [(481, None, True), (408, None, True), (500, None, True), (503, "10", False)],
)
def test_notify_failure(status: int, retry_after: str | None, ended: bool) -> None:
    notifier, effects = accept()
    assert notifier is not None
    [notify] = sent(effects)
    if status == 408:
        effects = notifier.handle_timeout(notify.cseq[0], 32.0)
    else:
        headers = [("Retry-After", retry_after)] if retry_after else []
        effects = notifier.handle_response(reply(notify, status, headers, tag="w1"), 1.0)
    if ended:
        assert len(effects) == 1 and isinstance(effects[0], SubscriptionEnded)
        assert notifier.state is NotifierState.TERMINATED
    else:
        assert effects == [] and notifier.next_deadline() == 11.0
        [again] = sent(notifier.handle_timer(11.0))
        assert again.header("Subscription-State") == "pending;expires=589"


def test_fetch_gets_one_terminated_notify_with_state() -> None:
    notifier, effects = accept(
        incoming_subscribe("0"), state=NotifierState.ACTIVE, body=b"<now/>", content_type="a/b"
    )
    assert notifier is not None and notifier.state is NotifierState.TERMINATED
    assert answered(effects) == [202]
    [notify] = sent(effects)
    assert notify.header("Subscription-State") == "terminated;reason=timeout"
    assert notify.body == b"<now/>"


def test_notifier_snapshot_round_trip() -> None:
    notifier, _ = accept(state=NotifierState.ACTIVE, body=b"<p/>", content_type="x/y")
    assert notifier is not None
    restored = Notifier.restore(notifier.snapshot(), policy=POLICY)
    assert restored.snapshot() == notifier.snapshot()
    [notify] = sent(restored.notify(10.0, b"<q/>"))
    assert notify.cseq == (2, "NOTIFY") and notify.to_tag == "w1"


# -- both ends -------------------------------------------------------------------------------


def test_subscriber_and_notifier_talk() -> None:
    """A whole subscription life over the wire: subscribe, activate, refresh, unsubscribe."""
    now = 0.0
    sub = subscriber()
    [subscribe] = sent(sub.start(now))
    notifier, effects = Notifier.accept(subscribe, now, events=["presence"], contact=PEER)
    assert notifier is not None
    notifier_out = list(effects)
    seen: list[tuple[SubscriptionState, bytes]] = []

    def deliver(effects: Iterable[SubscriptionEffect]) -> None:
        """Hand each effect of the notifier to the subscriber and the answers back."""
        pending = list(effects)
        while pending:
            effect = pending.pop(0)
            assert notifier is not None
            if isinstance(effect, SendResponse):
                response = wire(effect.response)
                assert isinstance(response, SipResponse)
                sub.handle_response(response, now)
            elif isinstance(effect, SendRequest):
                for back in sub.handle_notify(wire_request(effect.request), now):
                    if isinstance(back, SendResponse):
                        response = wire(back.response)
                        assert isinstance(response, SipResponse)
                        pending += notifier.handle_response(response, now)
                    elif isinstance(back, StateChanged):
                        seen.append((back.state, back.body))

    # The NOTIFY overtakes the 2xx, as RFC 6665 4.1.2.4 allows.
    deliver(reversed(notifier_out))
    deliver(notifier.activate(now, b"<pidf/>", "application/pidf+xml"))
    assert seen == [(SubscriptionState.PENDING, b""), (SubscriptionState.ACTIVE, b"<pidf/>")]
    now = sub.next_deadline() or 0.0
    [refresh] = sent(sub.handle_timer(now))
    deliver(notifier.handle_subscribe(refresh, now))
    assert sub.expires_at == now + 600 and notifier.expires_at == now + 600
    [unsub] = sent(sub.unsubscribe(now))
    deliver(notifier.handle_subscribe(unsub, now))
    assert seen[-1][0] is SubscriptionState.TERMINATED
    assert sub.state is SubscriberState.TERMINATED
    assert notifier.state is NotifierState.TERMINATED


def test_response_to_an_endpoint_auth_retry_is_adopted() -> None:
    """The endpoint answered a 407 itself and resent with CSeq + 1; the core follows."""
    sub = subscriber()
    [initial] = sent(sub.start(0.0))
    retried = wire_request(initial.replace_headers("CSeq", ["2 SUBSCRIBE"]))
    sub.handle_response(reply(retried, 200, [("Expires", "600")]), 1.0)
    assert sub.state is SubscriberState.ACCEPTED and sub.dialog.local_cseq == 2
    sub.handle_notify(notify_for(initial, "active"), 1.5)
    at = sub.next_deadline()
    assert at is not None
    [refresh] = sent(sub.handle_timer(at))
    assert refresh.cseq == (3, "SUBSCRIBE")
    # A CSeq two ahead is not ours.
    assert (
        sub.handle_response(reply(refresh.replace_headers("CSeq", ["5 SUBSCRIBE"]), 481), at) == []
    )


def test_unchanged_since_compares_every_field_a_restart_needs() -> None:
    notifier, _ = accept(body=b"<a/>", content_type="application/pidf+xml")
    assert notifier is not None
    snap = notifier.snapshot()
    ahead = replace(snap, local_cseq=snap.local_cseq + 64)
    assert notifier.unchanged_since(snap) and notifier.unchanged_since(ahead)
    # the body is rebuilt on a restart: not compared
    assert notifier.unchanged_since(replace(snap, body=b"<other/>"))
    assert not notifier.unchanged_since(replace(snap, local_cseq=snap.local_cseq - 1))
    others: dict[str, Any] = {"route_set": ("<sip:p.test;lr>",), "secure": True}
    for f in fields(NotifierSnapshot):
        if f.name in ("body", "local_cseq"):
            continue
        value: Any = getattr(snap, f.name)
        other = others.get(f.name, f"{value}x" if isinstance(value, str) else (value or 0) + 7)
        assert not notifier.unchanged_since(replace(snap, **{f.name: other})), f.name
    # what the notifier changes itself is seen too: here its state
    notifier.activate(1.0)
    assert not notifier.unchanged_since(snap) and not notifier.unchanged_since(ahead)
