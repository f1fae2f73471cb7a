"""What every part of presence works with: the book and the ports, approvals, sending presence."""

from __future__ import annotations

from dataclasses import dataclass

from component.addresses import AddressBook
from component.logs import get_logger
from component.ports import SipPort, XmppPort
from component.store import ApprovalDirection, ApprovalState, StorePort
from component.values import Presence

log = get_logger("component.presence")

__all__ = ["RESOURCE", "Ports", "is_approved", "send_presence"]

RESOURCE = "sip"  # DESIGN 3.1: the resource of SIP users on XMPP


@dataclass(frozen=True, slots=True)
class Ports:
    """The address book and the ports the parts of presence act through."""

    book: AddressBook
    sip: SipPort
    xmpp: XmppPort
    store: StorePort


async def is_approved(
    store: StorePort, sip_jid: str, xmpp_jid: str, direction: ApprovalDirection
) -> bool:
    """True when the stored approval between the two JIDs, one way, is granted."""
    approval = await store.approval(sip_jid, xmpp_jid, direction)
    return approval is not None and approval.state is ApprovalState.APPROVED


def send_presence(xmpp: XmppPort, presence: Presence) -> None:
    """Send ``presence`` on the XMPP link; a link that is down only costs a debug line."""
    if not xmpp.send_presence(presence):
        # Link down: the re-announce on link up (DESIGN 8) brings it across.
        log.debug("presence_not_sent", jid=presence.recipient, type=presence.type)
