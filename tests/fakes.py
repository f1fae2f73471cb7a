"""A typed base for the SIP-side fakes: each fake overrides what its test uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from component.values import (
    ImdnAsk,
    ImdnStatus,
    SipSubscription,
    SubscribeOutcome,
    Watch,
)
from sipside.pidf import PresenceDocument


def _unused(name: str) -> NoReturn:
    raise AssertionError(f"the test's SIP fake was asked to {name}, which it does not fake")


class UnusedSip:
    """Every ``SipPort`` method, each failing the test when called; a fake subclasses it and
    overrides the methods its test expects, so that it is a ``SipPort`` to the type checker."""

    async def send_text(
        self,
        *,
        from_uri: str,
        to_uri: str,
        body: str,
        from_display: str | None = None,
        imdn: ImdnAsk | None = None,
        sent_at: float | None = None,
    ) -> int:
        _unused("send_text")

    def start_text(
        self, *, from_uri: str, to_uri: str, body: str, done: Callable[[int], None]
    ) -> bool:
        return False  # the fakes answer in send_text

    async def send_composing(
        self, *, from_uri: str, to_uri: str, active: bool, refresh: int | None
    ) -> int:
        _unused("send_composing")

    async def send_notification(
        self, *, from_uri: str, to_uri: str, message_id: str, sent_at: float, status: ImdnStatus
    ) -> int:
        _unused("send_notification")

    async def notify_watch(self, watch: Watch, document: PresenceDocument, now: float) -> None:
        _unused("notify_watch")

    async def activate_watch(self, watch: Watch, document: PresenceDocument, now: float) -> None:
        _unused("activate_watch")

    async def end_watch(self, watch: Watch, reason: str, now: float, *, pending_only: bool) -> None:
        _unused("end_watch")

    def active_watches(self) -> list[Watch]:
        _unused("active_watches")

    async def subscribe(self, sub: SipSubscription, now: float) -> SubscribeOutcome:
        _unused("subscribe")

    async def unsubscribe(self, watcher_jid: str, sip_aor: str, now: float) -> None:
        _unused("unsubscribe")
