"""The one refusal type and the SIP status -> XMPP error mapping (RFC 7247 8, DESIGN 4.2)."""

from __future__ import annotations

import pytest

from component.errors import (
    RETRYABLE,
    Refusal,
    busy,
    forbidden,
    malformed,
    not_found,
    refusal_for_sip_status,
)


@pytest.mark.parametrize(
    ("status", "condition"),
    [
        (404, "item-not-found"),
        (604, "item-not-found"),
        (403, "forbidden"),
        (603, "forbidden"),
        (413, "not-acceptable"),
        (480, "recipient-unavailable"),
        (302, "redirect"),
        (499, "bad-request"),
        (599, "internal-server-error"),
    ],
)
def test_status_to_condition(status: int, condition: str) -> None:
    refusal = refusal_for_sip_status(status)
    assert refusal.xmpp_condition == condition
    assert (refusal.sip_status, refusal.text) == (status, f"SIP {status}")


@pytest.mark.parametrize(
    ("status", "kind"), [(403, "auth"), (404, "cancel"), (413, "modify"), (480, "wait")]
)
def test_status_to_error_type(status: int, kind: str) -> None:
    assert refusal_for_sip_status(status).xmpp_type == kind


def test_retryable_statuses_are_the_offline_ones() -> None:
    assert {408, 480, 503} == RETRYABLE


@pytest.mark.parametrize(
    ("refusal", "sip", "xmpp"),
    [
        (malformed("x"), (400, "Bad Request"), ("jid-malformed", "modify")),
        (not_found("x"), (404, "Not Found"), ("item-not-found", "cancel")),
        (forbidden("x"), (403, "Forbidden"), ("forbidden", "auth")),
        (busy("x", 5), (503, "Service Unavailable"), ("resource-constraint", "wait")),
    ],
)
def test_helpers(refusal: object, sip: tuple[int, str], xmpp: tuple[str, str]) -> None:
    assert isinstance(refusal, Refusal)
    assert (refusal.sip_status, refusal.sip_reason) == sip
    assert (refusal.xmpp_condition, refusal.xmpp_type, refusal.text) == (*xmpp, "x")
