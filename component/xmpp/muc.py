"""Chat-room stanzas (XEP-0045, XEP-0249, XEP-0359) in and out of the XMPP adapter.

Like :mod:`component.xmpp.stanzas`: pure functions over ElementTree elements straight from the
parser (direct children and one level below only, never ``str()``), and outbound stanzas as
text. Only what the room core reads is parsed: status codes, the ``<item>``, the actor, the
reason, ``<destroy>``, the error, groupchat bodies and subjects, origin-ids, delay stamps and
invitations. JIDs in the stanza's attributes were checked by the link; JIDs read from inside a
stanza (an inviter, a real JID) are checked here with the one validator.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from component.values import RoomInvitation, RoomMessage, RoomPresence, ServiceInfo, ServiceKind
from component.xmpp.iq import NS_DISCO_INFO
from component.xmpp.stanzas import (
    MAX_BODY,
    NS_CLIENT,
    NS_COMPONENT,
    NS_DELAY,
    NS_MUC_USER,
    NS_SID,
    SHOWS,
    Rejected,
    attr,
    elem,
    format_iq,
    jid_or_none,
    parse_error,
)
from sipside.xmlsafe import attr_escape

NS_MUC_OWNER = "http://jabber.org/protocol/muc#owner"
NS_CONFERENCE = "jabber:x:conference"  # XEP-0249 direct invitations
NS_DATA = "jabber:x:data"
NS_MUC_FEATURE = "http://jabber.org/protocol/muc"


def _local(tag: object) -> str:
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def _ns(tag: object) -> str:
    return tag[1:].partition("}")[0] if isinstance(tag, str) and tag.startswith("{") else ""


def _client_child(xml: ET.Element, local: str) -> ET.Element | None:
    for ns in (NS_COMPONENT, NS_CLIENT):
        found = xml.find(f"{{{ns}}}{local}")
        if found is not None:
            return found
    return None


def _codes(x: ET.Element) -> tuple[int, ...]:
    codes: list[int] = []
    for child in x:
        code = child.get("code", "")
        if _local(child.tag) == "status" and code.isdigit() and len(code) == 3:
            codes.append(int(code))
    return tuple(codes)


def _valid_jid(text: str | None) -> str | None:
    jid = jid_or_none(text or "") if text else None
    return jid.full if jid is not None else None


# --- inbound -------------------------------------------------------------------------------------


def parse_room_presence(xml: ET.Element, sender: str, recipient: str) -> RoomPresence:
    """The RoomPresence of a ``<presence>`` from a room occupant (XEP-0045 7.2, 7.6, 9, 10.9)."""
    ptype = xml.get("type")
    show_el = _client_child(xml, "show")
    status_el = _client_child(xml, "status")
    show = show_el.text if show_el is not None and show_el.text in SHOWS else None
    fields: dict[str, object] = {}
    if ptype == "error":
        err = parse_error(xml, "presence", sender, recipient)
        fields = {"error_condition": err.condition, "error_text": err.text}
    x = xml.find(f"{{{NS_MUC_USER}}}x")
    if x is not None:
        fields["status_codes"] = _codes(x)
        for child in x:
            local = _local(child.tag)
            if local == "item":
                fields["affiliation"] = child.get("affiliation")
                fields["role"] = child.get("role")
                fields["real_jid"] = _valid_jid(child.get("jid"))
                fields["item_nick"] = child.get("nick")
                for part in child:
                    if _local(part.tag) == "actor":
                        fields["actor"] = part.get("nick") or _valid_jid(part.get("jid"))
                    elif _local(part.tag) == "reason":
                        fields["reason"] = part.text
            elif local == "destroy":
                fields["destroyed"] = True
                fields["alternate_venue"] = _valid_jid(child.get("jid"))
                for part in child:
                    if _local(part.tag) == "reason":
                        fields["reason"] = part.text
    return RoomPresence(
        sender=sender,
        recipient=recipient,
        type=ptype if ptype in ("unavailable", "error") else None,
        show=show,
        status=status_el.text if status_el is not None else None,
        **fields,  # type: ignore[arg-type]
    )


def parse_room_message(xml: ET.Element, sender: str, recipient: str) -> RoomMessage:
    """The RoomMessage of a groupchat or private ``<message>`` from a room or an occupant."""
    body_el = _client_child(xml, "body")
    subject_el = _client_child(xml, "subject")
    body = (body_el.text or "") if body_el is not None else None
    if body is not None and len(body) > MAX_BODY:
        raise Rejected("not-acceptable", "modify", f"message body over {MAX_BODY} characters")
    origin = xml.find(f"{{{NS_SID}}}origin-id")
    delay = xml.find(f"{{{NS_DELAY}}}delay")
    x = xml.find(f"{{{NS_MUC_USER}}}x")
    mtype = xml.get("type", "normal")
    return RoomMessage(
        sender=sender,
        recipient=recipient,
        body=body,
        type=mtype if mtype in ("groupchat", "chat", "normal", "headline") else "normal",
        subject=(subject_el.text or "") if subject_el is not None else None,
        id=xml.get("id"),
        origin_id=origin.get("id") if origin is not None else None,
        delay_stamp=delay.get("stamp") if delay is not None else None,
        status_codes=_codes(x) if x is not None else (),
    )


def parse_invitation(xml: ET.Element, sender: str, recipient: str) -> RoomInvitation | None:
    """A XEP-0249 direct or XEP-0045 7.8.2 mediated invitation in a ``<message>``, else None."""
    # Mediated first: a room that passes an invitation on (Prosody) may add a XEP-0249 element
    # for older clients, which names neither the inviter nor the reason.
    x = xml.find(f"{{{NS_MUC_USER}}}x")
    invite = x.find(f"{{{NS_MUC_USER}}}invite") if x is not None else None
    if x is not None and invite is not None:
        reason = invite.find(f"{{{NS_MUC_USER}}}reason")
        password = x.find(f"{{{NS_MUC_USER}}}password")
        return RoomInvitation(
            room=sender.split("/", 1)[0],
            inviter=_valid_jid(invite.get("from")) or sender,
            invitee=recipient,
            reason=reason.text if reason is not None else None,
            password=password.text if password is not None else None,
            mediated=True,
        )
    direct = xml.find(f"{{{NS_CONFERENCE}}}x")
    if direct is None:
        return None
    room = _valid_jid(direct.get("jid"))
    if room is None:
        return None
    return RoomInvitation(
        room=room,
        inviter=sender,
        invitee=recipient,
        reason=direct.get("reason"),
        password=direct.get("password"),
    )


def service_info(domain: str, iq: ET.Element) -> ServiceInfo:
    """What a disco#info result says about ``domain``: a MUC service or something else."""
    query = iq.find(f"{{{NS_DISCO_INFO}}}query")
    if query is not None:
        for item in query:
            if _local(item.tag) == "identity" and (
                item.get("category"),
                item.get("type"),
            ) == ("conference", "text"):
                return ServiceInfo(domain, ServiceKind.MUC)
            if _local(item.tag) == "feature" and item.get("var") == NS_MUC_FEATURE:
                return ServiceInfo(domain, ServiceKind.MUC)
    return ServiceInfo(domain, ServiceKind.OTHER)


# --- outbound ------------------------------------------------------------------------------------


def format_invitation(sender: str, room: str, invitee: str, reason: str | None, msg_id: str) -> str:
    """A XEP-0045 7.8.2 mediated invitation, sent to the room; its error comes back with
    ``msg_id``."""
    return (
        f'<message from="{attr_escape(sender)}" to="{attr_escape(room)}"{attr("id", msg_id)}>'
        f'<x xmlns="{NS_MUC_USER}"><invite{attr("to", invitee)}>{elem("reason", reason)}'
        "</invite></x></message>"
    )


def format_instant_room(sender: str, room: str, iq_id: str) -> str:
    """XEP-0045 10.1.2: accept the default configuration (an empty submitted form)."""
    payload = f'<query xmlns="{NS_MUC_OWNER}"><x xmlns="{NS_DATA}" type="submit"/></query>'
    return format_iq("set", sender, room, iq_id, payload)


__all__ = [
    "NS_CONFERENCE",
    "NS_MUC_OWNER",
    "NS_SID",
    "format_instant_room",
    "format_invitation",
    "parse_invitation",
    "parse_room_message",
    "parse_room_presence",
    "service_info",
]
