"""XMPP users watching SIP users (DESIGN 5.3): what Bob asks, and what he is told.

``XmppWatchers`` turns ``<presence type="subscribe">`` to a SIP user's component JID into a
subscription at the SIP presence server (through ``SipPort``), and what that server
says into ``subscribed`` / ``unsubscribed`` and presence for Bob. Without a SIP presence server
the gateway approves by itself and the state of DESIGN 5.4 answers instead. The subscriptions
themselves live in ``component.sip.presence_subscriptions``.
"""

from __future__ import annotations

from component.logs import get_logger
from component.presence.approvals import Ports, is_approved, send_presence
from component.presence.sip_users import SipUsers
from component.store import ApprovalDirection, ApprovalState, RosterApproval
from component.values import (
    Presence,
    PresenceServerNews,
    SipSubscription,
    SubscribeOutcome,
    SubscriptionActive,
    SubscriptionPending,
    SubscriptionRefused,
)

log = get_logger("component.presence")

__all__ = ["XmppWatchers"]


class XmppWatchers:
    """The decisions about XMPP watchers of SIP users (DESIGN 5.3)."""

    def __init__(self, ports: Ports, *, users: SipUsers, sip_server: bool) -> None:
        self.book, self.sip, self.xmpp, self.store = ports.book, ports.sip, ports.xmpp, ports.store
        self.users = users
        self.sip_server = sip_server

    # --- what Bob asks on XMPP ------------------------------------------------------------

    async def subscribe(self, bob: str, sip_jid: str, now: float) -> None:
        """Bob asks to see a SIP user's presence (DESIGN 5.3)."""
        aor = self.book.sip_uri_for_component_jid(sip_jid)
        if not self.sip_server:
            # DESIGN 5.3: no presence server on the SIP side: approve and derive the state.
            await self._grant(bob, sip_jid, now, again=True)
            await self._send_state(bob, sip_jid, aor)
            return
        sub = SipSubscription(bob, self.book.sip_uri_for_jid(bob), sip_jid, aor)
        match await self.sip.subscribe(sub, now):
            case SubscribeOutcome.ACTIVE:
                # A repeated request for a live subscription: confirm it again.
                send_presence(self.xmpp, Presence(sender=sip_jid, recipient=bob, type="subscribed"))
                await self._send_state(bob, sip_jid, aor)
            case SubscribeOutcome.STARTED:
                await self.store.save_approval(
                    RosterApproval(
                        sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP, ApprovalState.PENDING, now
                    )
                )
            case SubscribeOutcome.PENDING:
                pass  # asked already; Bob waits for the decision

    async def unsubscribe(self, bob: str, sip_jid: str, now: float) -> None:
        """Bob no longer watches the SIP user: the subscription ends (RFC 6665 4.1.2.3)."""
        aor = self.book.sip_uri_for_component_jid(sip_jid)
        await self.store.delete_approval(sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP)
        await self.sip.unsubscribe(bob, aor, now)

    async def probe(self, bob: str, sip_jid: str) -> None:
        """RFC 6121 4.3: answer a probe from the last known state, if Bob is approved."""
        if not await is_approved(self.store, sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP):
            return
        await self._send_state(bob, sip_jid, self.book.sip_uri_for_component_jid(sip_jid))

    async def _send_state(self, bob: str, sip_jid: str, aor: str) -> None:
        state = await self.users.state_of(sip_jid, aor)
        send_presence(self.xmpp, self.users.presence_to(sip_jid, bob, state))

    async def _grant(self, bob: str, sip_jid: str, now: float, *, again: bool = False) -> None:
        """Approve Bob (RFC 6121 3.1.5); ``subscribed`` goes once, or ``again`` on request."""
        news = not await is_approved(self.store, sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP)
        if news:
            await self.store.save_approval(
                RosterApproval(
                    sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP, ApprovalState.APPROVED, now
                )
            )
        if news or again:
            send_presence(self.xmpp, Presence(sender=sip_jid, recipient=bob, type="subscribed"))

    # --- what the SIP presence server says ------------------------------------------------

    async def presence_server_said(self, news: PresenceServerNews, now: float) -> None:
        """The server's word, as XMPP presence to Bob (DESIGN 5.3)."""
        match news:
            case SubscriptionActive(bob, sip_jid, document):
                await self._grant(bob, sip_jid, now)
                state = self.users.state_from_document(document)
                changed = await self.users.remember(sip_jid, state, now)
                send_presence(self.xmpp, self.users.presence_to(sip_jid, bob, state))
                if changed and state.available:
                    self.users.shown_online(sip_jid)
            case SubscriptionPending():
                pass  # RFC 6665 4.1.3: not decided yet; Bob waits (DESIGN 5.3)
            case SubscriptionRefused(bob, sip_jid):
                # Rejected, no such user, or the SUBSCRIBE failed: Bob is refused.
                await self.store.save_approval(
                    RosterApproval(
                        sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP, ApprovalState.REFUSED, now
                    )
                )
                send_presence(
                    self.xmpp, Presence(sender=sip_jid, recipient=bob, type="unsubscribed")
                )
