"""RFC 3903 publications: the publisher (EPA) and the compositor store (ESC), fake clock."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import pytest

from sipside.digest import Credentials, DigestClient
from sipside.message import SipMessage, SipRequest, SipResponse, make_response, parse_message
from sipside.publication import (
    Publication,
    PublicationChanged,
    PublicationRemoved,
    PublicationStore,
    Published,
    Publisher,
    PublisherState,
    PublishFailed,
    StoreEffect,
    Unpublished,
)
from sipside.subscription import SendRequest, SendResponse, refresh_delay

ALICE = "<sip:alice@sip.test>"
PIDF = "application/pidf+xml"


def wire(message: SipMessage) -> SipMessage:
    """Through bytes and back, with the Via the transport would add."""
    if isinstance(message, SipRequest) and not message.header("Via"):
        message = message.add_header(
            "Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKp", first=True
        )
    return parse_message(bytes(message))


def sent(effects: Sequence[object]) -> list[SipRequest]:
    out = []
    for effect in effects:
        if isinstance(effect, SendRequest):
            request = wire(effect.request)
            assert isinstance(request, SipRequest)
            out.append(request)
    return out


def reply(request: SipRequest, status: int, headers: Iterable[tuple[str, str]] = ()) -> SipResponse:
    response = wire(make_response(request, status, to_tag="esc", headers=headers))
    assert isinstance(response, SipResponse)
    return response


def publisher(**kwargs: object) -> Publisher:
    return Publisher(
        local_uri=ALICE,
        remote_uri=ALICE,
        expires=3600,
        call_id="pub-call",
        local_tag="pt",
        **kwargs,  # type: ignore[arg-type]
    )


def published(now: float = 0.0) -> tuple[Publisher, SipRequest]:
    """A publisher whose initial PUBLISH got 200 with SIP-ETag e1 and Expires 1800."""
    pub = publisher()
    [initial] = sent(pub.publish(b"<open/>", PIDF, now))
    effects = pub.handle_response(
        reply(initial, 200, [("SIP-ETag", "e1"), ("Expires", "1800")]), now
    )
    assert effects == [Published("e1", 1800)]
    return pub, initial


# -- publisher -------------------------------------------------------------------------------


def test_initial_publish() -> None:
    pub, initial = published(10.0)
    assert (initial.method, initial.uri, initial.to_tag) == ("PUBLISH", "sip:alice@sip.test", None)
    assert (initial.header("Event"), initial.header("Expires")) == ("presence", "3600")
    assert (initial.body, initial.header("Content-Type")) == (b"<open/>", PIDF)
    assert initial.header("SIP-If-Match") is None
    assert pub.state is PublisherState.PUBLISHED and pub.etag == "e1"
    assert pub.next_deadline() == 10.0 + refresh_delay(1800)


def test_refresh_modify_remove() -> None:
    pub, _ = published()
    at = pub.next_deadline()
    assert at is not None and pub.handle_timer(at - 1) == []
    [refresh] = sent(pub.handle_timer(at))
    assert (refresh.header("SIP-If-Match"), refresh.body, refresh.header("Content-Type")) == (
        "e1",
        b"",
        None,
    )
    assert refresh.cseq == (2, "PUBLISH") and pub.next_deadline() is None
    pub.handle_response(reply(refresh, 200, [("SIP-ETag", "e2"), ("Expires", "1800")]), at)
    [modify] = sent(pub.publish(b"<closed/>", PIDF, at + 1))
    assert (modify.header("SIP-If-Match"), modify.body) == ("e2", b"<closed/>")
    pub.handle_response(reply(modify, 200, [("SIP-ETag", "e3"), ("Expires", "1800")]), at + 1)
    [remove] = sent(pub.remove(at + 2))
    assert (remove.header("Expires"), remove.header("SIP-If-Match"), remove.body) == (
        "0",
        "e3",
        b"",
    )
    assert pub.handle_response(reply(remove, 200), at + 2) == [Unpublished()]
    assert pub.state is PublisherState.IDLE and pub.etag is None and pub.next_deadline() is None


def test_412_starts_over_with_full_state() -> None:
    pub, _ = published()
    [modify] = sent(pub.publish(b"<away/>", PIDF, 5.0))
    [fresh] = sent(pub.handle_response(reply(modify, 412), 5.0))
    assert fresh.header("SIP-If-Match") is None and fresh.body == b"<away/>"
    assert pub.state is PublisherState.PUBLISHING


def test_423_retries_with_min_expires() -> None:
    pub = publisher()
    [initial] = sent(pub.publish(b"<open/>", PIDF, 0.0))
    [again] = sent(pub.handle_response(reply(initial, 423, [("Min-Expires", "7200")]), 0.0))
    assert (again.header("Expires"), again.body, again.cseq[0]) == ("7200", b"<open/>", 2)


@pytest.mark.parametrize(("status", "expected"), [(500, 500), (403, 403), (None, 408)])
def test_failures_report_and_go_idle(status: int | None, expected: int) -> None:
    pub, _ = published()
    [modify] = sent(pub.publish(b"<x/>", PIDF, 1.0))
    if status is None:
        effects = pub.handle_timeout(modify.cseq[0], 33.0)
    else:
        effects = pub.handle_response(reply(modify, status, [("Retry-After", "20")]), 1.0)
    assert effects == [PublishFailed(expected, None if status is None else 20)]
    assert pub.state is PublisherState.IDLE and pub.next_deadline() is None


def test_one_publish_at_a_time_latest_wins() -> None:
    pub = publisher()
    [initial] = sent(pub.publish(b"<1/>", PIDF, 0.0))
    assert pub.publish(b"<2/>", PIDF, 0.1) == [] and pub.publish(b"<3/>", PIDF, 0.2) == []
    effects = pub.handle_response(reply(initial, 200, [("SIP-ETag", "e1")]), 0.3)
    [modify] = sent(effects)
    assert (modify.body, modify.header("SIP-If-Match")) == (b"<3/>", "e1")
    assert pub.remove(0.4) == []
    effects = pub.handle_response(reply(modify, 200, [("SIP-ETag", "e2")]), 0.5)
    [remove] = sent(effects)
    assert remove.header("Expires") == "0" and remove.header("SIP-If-Match") == "e2"


def test_response_to_an_old_request_is_ignored() -> None:
    pub, initial = published()
    [modify] = sent(pub.publish(b"<x/>", PIDF, 1.0))
    assert pub.handle_response(reply(initial, 500), 1.0) == []
    assert pub.state is PublisherState.PUBLISHED
    assert modify.cseq[0] == 2


def test_www_authenticate_is_answered() -> None:
    pub = publisher(digest=DigestClient(Credentials("alice", "pw")))
    [initial] = sent(pub.publish(b"<open/>", PIDF, 0.0))
    challenge = ("WWW-Authenticate", 'Digest realm="sip.test", nonce="n", qop="auth"')
    [retry] = sent(pub.handle_response(reply(initial, 401, [challenge]), 0.0))
    assert retry.cseq == (2, "PUBLISH") and retry.header("Authorization") is not None
    assert retry.body == b"<open/>"
    assert pub.handle_response(reply(retry, 401, [challenge]), 0.0) == [PublishFailed(401)]


def test_publisher_snapshot_restore() -> None:
    pub, _ = published()
    snap = pub.snapshot()
    assert (snap.etag, snap.body, snap.state) == ("e1", b"<open/>", "published")
    late = Publisher.restore(snap, 5000.0, spread=4.0)
    assert late.next_deadline() == 5004.0
    [refresh] = sent(late.handle_timer(5004.0))
    assert (refresh.header("SIP-If-Match"), refresh.cseq, refresh.call_id) == (
        "e1",
        (2, "PUBLISH"),
        "pub-call",
    )
    assert Publisher.restore(snap, 10.0).next_deadline() == snap.refresh_at


def test_publisher_restore_keeps_request_uri_and_route_set() -> None:
    pub = publisher(request_uri="sip:alice@esc.test", route_set=["<sip:proxy.test;lr>"])
    [initial] = sent(pub.publish(b"<open/>", PIDF, 0.0))
    pub.handle_response(reply(initial, 200, [("SIP-ETag", "e1"), ("Expires", "1800")]), 0.0)
    restored = Publisher.restore(pub.snapshot(), 5000.0)
    [refresh] = sent(restored.handle_timer(5000.0))
    assert (refresh.uri, refresh.header_values("Route")) == (
        "sip:alice@esc.test",
        ["<sip:proxy.test;lr>"],
    )


# -- compositor ------------------------------------------------------------------------------


def store(**kwargs: object) -> PublicationStore:
    counter = itertools.count(1)
    return PublicationStore(
        min_expires=60,
        max_expires=3600,
        etag_factory=lambda: f"e{next(counter)}",
        **kwargs,  # type: ignore[arg-type]
    )


def publish_request(
    *,
    body: bytes = b"<open/>",
    etag: str | None = None,
    expires: str | None = "600",
    event: str | None = "presence",
    uri: str = "sip:alice@sip.test",
    cseq: int = 1,
) -> SipRequest:
    headers = [
        ("From", f"{ALICE};tag=x"),
        ("To", ALICE),
        ("Call-ID", "c"),
        ("CSeq", f"{cseq} PUBLISH"),
    ]
    if event is not None:
        headers.append(("Event", event))
    if expires is not None:
        headers.append(("Expires", expires))
    if etag is not None:
        headers.append(("SIP-If-Match", etag))
    if body:
        headers.append(("Content-Type", PIDF))
    request = wire(SipRequest("PUBLISH", uri, tuple(headers), body))
    assert isinstance(request, SipRequest)
    return request


def response_of(effects: Sequence[StoreEffect]) -> SipResponse:
    [response] = [e.response for e in effects if isinstance(e, SendResponse)]
    return response


@pytest.mark.parametrize(
    ("request_", "status", "header"),
    [
        (publish_request(event=None), 489, ("Allow-Events", "presence")),
        (publish_request(event="dialog"), 489, ("Allow-Events", "presence")),
        (publish_request(etag="nope", body=b""), 412, None),
        (publish_request(expires="10"), 423, ("Min-Expires", "60")),
        (publish_request(body=b""), 400, None),
        (publish_request(expires="0"), 400, None),
        (publish_request(expires="x"), 400, None),
    ],
)
def test_store_refusals(request_: SipRequest, status: int, header: tuple[str, str] | None) -> None:
    esc = store()
    effects = esc.handle_publish(request_, 0.0)
    assert len(effects) == 1
    response = response_of(effects)
    assert response.status == status
    if header is not None:
        assert response.header(header[0]) == header[1]
    assert esc.next_deadline() is None


def test_store_content_type_check() -> None:
    esc = store(content_types=["application/pidf+xml"])
    other = publish_request().replace_headers("Content-Type", ["text/plain"])
    response = response_of(esc.handle_publish(other, 0.0))
    assert (response.status, response.header("Accept")) == (415, "application/pidf+xml")
    assert response_of(esc.handle_publish(publish_request(), 0.0)).status == 200


def test_store_lifecycle() -> None:
    esc = store()
    entity = "sip:alice@sip.test"
    effects = esc.handle_publish(publish_request(), 0.0)
    response = response_of(effects)
    assert (response.status, response.header("SIP-ETag"), response.header("Expires")) == (
        200,
        "e1",
        "600",
    )
    first = Publication(entity, "presence", "e1", b"<open/>", PIDF, 600.0)
    assert effects[1] == PublicationChanged(first, None, True)
    # Refresh: same state, new entity-tag (RFC 3903 6 step 5).
    effects = esc.handle_publish(publish_request(etag="e1", body=b"", expires=None), 100.0)
    assert response_of(effects).header("SIP-ETag") == "e2"
    refreshed = Publication(entity, "presence", "e2", b"<open/>", PIDF, 3700.0)
    assert effects[1] == PublicationChanged(refreshed, "e1", False)
    # The old tag is gone.
    assert response_of(esc.handle_publish(publish_request(etag="e1"), 101.0)).status == 412
    # Modify.
    effects = esc.handle_publish(publish_request(etag="e2", body=b"<closed/>"), 102.0)
    changed = effects[1]
    assert isinstance(changed, PublicationChanged) and changed.state_changed
    assert esc.publications(entity, "presence") == [changed.publication]
    # An entity-tag of another entity does not match (RFC 3903 6 step 3).
    other = publish_request(etag="e3", body=b"", uri="sip:bob@sip.test")
    assert response_of(esc.handle_publish(other, 103.0)).status == 412
    # Remove.
    effects = esc.handle_publish(publish_request(etag="e3", body=b"", expires="0"), 104.0)
    assert response_of(effects).header("Expires") == "0"
    assert effects[1] == PublicationRemoved(changed.publication, "removed")
    assert esc.publications(entity, "presence") == [] and esc.next_deadline() is None


def test_store_expiry_and_caps() -> None:
    esc = store()
    esc.handle_publish(publish_request(expires="99999"), 0.0)  # capped at 3600
    esc.handle_publish(publish_request(uri="sip:bob@sip.test", expires="600"), 10.0)
    assert esc.next_deadline() == 610.0
    # Refreshing bob moves his deadline; the stale heap entry is skipped.
    esc.handle_publish(publish_request(uri="sip:bob@sip.test", etag="e2", body=b""), 500.0)
    assert esc.next_deadline() == 1100.0
    assert esc.handle_timer(1099.0) == []
    [gone] = esc.handle_timer(1100.0)
    assert isinstance(gone, PublicationRemoved) and gone.reason == "expired"
    assert gone.publication.entity == "sip:bob@sip.test"
    assert esc.next_deadline() == 3600.0


def test_store_snapshot_restore_and_entity_key() -> None:
    esc = store()
    esc.handle_publish(publish_request(uri="sip:alice@sip.test;transport=udp"), 0.0, entity="alice")
    saved = esc.snapshot()
    assert [p.entity for p in saved] == ["alice"]
    again = store()
    again.restore(saved)
    assert again.publications("alice", "presence") == list(saved)
    refresh = publish_request(etag="e1", body=b"")
    assert response_of(again.handle_publish(refresh, 1.0, entity="alice")).status == 200


# -- both ends -------------------------------------------------------------------------------


def test_publisher_against_store() -> None:
    """Publish, refresh, lose the ESC's state (restart), recover by 412, remove."""
    esc = store()
    pub = publisher()

    def exchange(effects: Sequence[object], now: float) -> list[object]:
        out: list[object] = []
        for request in sent(effects):
            answers = esc.handle_publish(request, now)
            out += answers
            response = wire(response_of(answers))
            assert isinstance(response, SipResponse)
            back = pub.handle_response(response, now)
            out += back + exchange(back, now)
            out += pub.handle_response(response, now)  # a duplicate answer changes nothing
        return out

    log = exchange(pub.publish(b"<open/>", PIDF, 0.0), 0.0)
    assert Published("e1", 3600) in log
    at = pub.next_deadline()
    assert at is not None
    log = exchange(pub.handle_timer(at), at)
    assert Published("e2", 3600) in log
    esc = store()  # the ESC forgot everything
    log = exchange(pub.publish(b"<closed/>", PIDF, at + 1), at + 1)
    assert any(isinstance(e, Published) for e in log) and pub.etag == "e1"
    [pub_now] = esc.snapshot()
    assert pub_now.body == b"<closed/>"
    log = exchange(pub.remove(at + 2), at + 2)
    assert Unpublished() in log and esc.snapshot() == ()


def test_response_to_an_endpoint_auth_retry_is_adopted() -> None:
    pub = publisher()
    [initial] = sent(pub.publish(b"<open/>", PIDF, 0.0))
    retried = initial.replace_headers("CSeq", ["2 PUBLISH"])
    assert pub.handle_response(reply(retried, 200, [("SIP-ETag", "e1")]), 0.0) == [
        Published("e1", 3600)
    ]
    [modify] = sent(pub.publish(b"<x/>", PIDF, 1.0))
    assert modify.cseq == (3, "PUBLISH")
