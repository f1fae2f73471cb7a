"""Stanza text in and out of the XMPP adapter: pure functions, no stream, no clock.

Outbound stanzas are formatted as text here, with our own escaping, instead of building slixmpp
stanza objects: formatting a message costs a few microseconds this way against tens through
slixmpp's ElementBase and ``tostring`` (the gateway's budget is 150 us per message per direction,
DESIGN 8 and SERVERS.md). Whatever goes out is well-formed XML 1.0 with JIDs valid per RFC 7622,
and its ``from`` is inside the component domain; anything else is our bug (:class:`LocalError`).

Inbound stanzas arrive as ElementTree elements straight from slixmpp's parser. They are read
without recursion and never turned into text (``str()`` of a stanza thousands of levels deep
raises RecursionError, SERVERS.md): only direct children, plus a bounded walk over an XHTML-IM
body. A stanza the gateway must refuse raises a :class:`Refusal` (here :class:`Rejected`, or the
address book's ``AddressError``), and :func:`error_for` is the one place one becomes an error.
"""

from __future__ import annotations

import datetime
import xml.etree.ElementTree as ET
from collections.abc import Iterator

from component.addresses import AddressError, Jid, parse_jid
from component.errors import Refusal
from component.values import ChatMessage, Presence, StanzaError
from sipside.errors import LocalError, PeerError
from sipside.xmlsafe import XmlLimits, attr_escape, parse_xml, text_escape, xml_safe_text

NS_COMPONENT = "jabber:component:accept"
NS_CLIENT = "jabber:client"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_XHTML_IM = "http://jabber.org/protocol/xhtml-im"
NS_XHTML = "http://www.w3.org/1999/xhtml"
NS_CHATSTATES = "http://jabber.org/protocol/chatstates"
NS_RECEIPTS = "urn:xmpp:receipts"
NS_DELAY = "urn:xmpp:delay"
NS_MUC = "http://jabber.org/protocol/muc"
NS_MUC_USER = "http://jabber.org/protocol/muc#user"
NS_SID = "urn:xmpp:sid:0"  # XEP-0359 stanza ids (origin-id)
NS_MARKERS = "urn:xmpp:chat-markers:0"  # XEP-0333
NS_CORRECT = "urn:xmpp:message-correct:0"  # XEP-0308
NS_OOB = "jabber:x:oob"  # XEP-0066, the link XEP-0363 uploads are shared by
_XHTML_PREFIX = "{" + NS_XHTML + "}"

#: Bodies longer than this (characters) are refused with not-acceptable, both ways.
MAX_BODY = 64 * 1024
#: A longer XEP-0100 prompt can name no JID (three parts of 1023 bytes at most, RFC 7622 3.1).
MAX_PROMPT = 3 * 1023
#: XHTML-IM bodies deeper or larger than this are dropped (the plain body still goes through).
XHTML_LIMITS = XmlLimits(max_bytes=MAX_BODY, max_depth=32, max_elements=1024)

MESSAGE_TYPES = frozenset({"chat", "normal", "groupchat", "headline"})
CHAT_STATES = frozenset({"active", "composing", "paused", "inactive", "gone"})
PRESENCE_TYPES = frozenset(
    {"unavailable", "subscribe", "subscribed", "unsubscribe", "unsubscribed", "probe"}
)
SHOWS = frozenset({"chat", "away", "xa", "dnd"})
ERROR_TYPES = frozenset({"auth", "cancel", "continue", "modify", "wait"})
# RFC 6120 8.3.3: the defined conditions; anything else would be a schema violation.
CONDITIONS = frozenset(
    {
        "bad-request",
        "conflict",
        "feature-not-implemented",
        "forbidden",
        "gone",
        "internal-server-error",
        "item-not-found",
        "jid-malformed",
        "not-acceptable",
        "not-allowed",
        "not-authorized",
        "policy-violation",
        "recipient-unavailable",
        "redirect",
        "registration-required",
        "remote-server-not-found",
        "remote-server-timeout",
        "resource-constraint",
        "service-unavailable",
        "subscription-required",
        "undefined-condition",
        "unexpected-request",
    }
)


class Rejected(Refusal):
    """An inbound stanza we refuse; only its XMPP side (condition, type, text) is used."""

    def __init__(self, condition: str, type_: str, text: str) -> None:
        super().__init__(400, "Bad Request", condition, text, xmpp_type=type_)


# --- JIDs ----------------------------------------------------------------------------------------


def jid_or_none(text: str) -> Jid | None:
    """The JID ``text`` stands for, by the one validator (:func:`parse_jid`); None if it is none.

    Stanzas carry JIDs from anywhere: an invalid one is an answer (or a drop), not an exception.
    """
    try:
        return parse_jid(text)
    except AddressError:
        return None


def outbound_jids(sender: str, recipient: str, component: str) -> None:
    """Refuse (LocalError) a sender outside ``component`` or any JID that is not valid."""
    src = jid_or_none(sender)
    if src is None:
        raise LocalError(f"refusing to send from an invalid JID {sender[:80]!r}")
    if src.domain != component:
        # Servers close the stream of a component that sends from elsewhere (DESIGN 3.1).
        raise LocalError(f"refusing to send from {sender[:80]!r}: outside {component}")
    if jid_or_none(recipient) is None:
        raise LocalError(f"refusing to send to an invalid JID {recipient[:80]!r}")


# --- outbound ------------------------------------------------------------------------------------


def attr(name: str, value: str | None) -> str:
    """`` name="value"`` escaped, or nothing for None."""
    return f' {name}="{attr_escape(value)}"' if value is not None else ""


def elem(name: str, text: str | None) -> str:
    """``<name>text</name>`` escaped, or nothing for None."""
    return f"<{name}>{text_escape(text)}</{name}>" if text is not None else ""


def origin_id(id_: str | None) -> str:
    """XEP-0359 ``<origin-id/>`` with our stanza id: a message re-sent after a lost link
    (DESIGN 8) carries the same one, so a receiver can tell the duplicate."""
    return f'<origin-id xmlns="{NS_SID}" id="{attr_escape(id_)}"/>' if id_ is not None else ""


def delay_stamp(when: float) -> str:
    """XEP-0082 date-time of ``when`` (seconds since the epoch), as XEP-0203 stamps want it."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_message(msg: ChatMessage) -> str:
    """The ``<message>`` text for ``msg`` (JIDs already checked with :func:`outbound_jids`)."""
    if msg.type not in MESSAGE_TYPES:
        raise LocalError(f"message type {msg.type!r} is not one of {sorted(MESSAGE_TYPES)}")
    if msg.body is not None and len(msg.body) > MAX_BODY:
        raise LocalError(f"message body over {MAX_BODY} characters")
    # The id is escaped once for both places it goes; absent parts cost no call (this runs for
    # every message both ways).
    ident = None if msg.id is None else attr_escape(msg.id)
    parts = [
        '<message from="',
        attr_escape(msg.sender),
        '" to="',
        attr_escape(msg.recipient),
        '" type="',
        msg.type,
        '"' if ident is None else f'" id="{ident}"',
        ">",
    ]
    if msg.body is not None:
        parts.append(f"<body>{text_escape(msg.body)}</body>")
    if msg.subject is not None:
        parts.append(f"<subject>{text_escape(msg.subject)}</subject>")
    if msg.thread is not None:
        parts.append(f"<thread>{text_escape(msg.thread)}</thread>")
    if ident is not None:
        parts.append(f'<origin-id xmlns="{NS_SID}" id="{ident}"/>')
    if msg.html is not None:
        inner = clean_xhtml(msg.html)
        if inner is not None:  # an unusable html part is dropped; the body says it all
            parts.append(
                f'<html xmlns="{NS_XHTML_IM}"><body xmlns="{NS_XHTML}">{inner}</body></html>'
            )
    if msg.chat_state is not None:
        if msg.chat_state not in CHAT_STATES:
            raise LocalError(f"chat state {msg.chat_state!r} is not one of XEP-0085's")
        parts.append(f'<{msg.chat_state} xmlns="{NS_CHATSTATES}"/>')
    if msg.receipt_request:
        parts.append(f'<request xmlns="{NS_RECEIPTS}"/>')
    if msg.receipt_for is not None:
        parts.append(f'<received xmlns="{NS_RECEIPTS}"{attr("id", msg.receipt_for)}/>')
    if msg.markable:
        parts.append(f'<markable xmlns="{NS_MARKERS}"/>')
    if msg.displayed_for is not None:
        parts.append(f'<displayed xmlns="{NS_MARKERS}"{attr("id", msg.displayed_for)}/>')
    if msg.origin_id is not None:
        parts.append(f'<origin-id xmlns="{NS_SID}"{attr("id", msg.origin_id)}/>')
    if msg.delay_stamp is not None:
        parts.append(
            f'<delay xmlns="{NS_DELAY}"{attr("stamp", msg.delay_stamp)}'
            f"{attr('from', msg.delay_from)}/>"
        )
    parts.append("</message>")
    return "".join(parts)


def format_presence(p: Presence) -> str:
    """The ``<presence>`` text for ``p``; errors go through :func:`format_error`."""
    if p.type is not None and p.type not in PRESENCE_TYPES:
        raise LocalError(f"presence type {p.type!r} is not one of {sorted(PRESENCE_TYPES)}")
    if p.show is not None and p.show not in SHOWS:
        raise LocalError(f"presence show {p.show!r} is not one of {sorted(SHOWS)}")
    if not -128 <= p.priority <= 127:  # RFC 6121 4.7.2.3
        raise LocalError(f"presence priority {p.priority} outside -128..127")
    parts = [
        '<presence from="',
        attr_escape(p.sender),
        '" to="',
        attr_escape(p.recipient),
        '"',
        attr("type", p.type),
        attr("id", p.id),
        ">",
        elem("show", p.show),
        elem("status", p.status),
    ]
    if p.priority and p.type is None:
        parts.append(f"<priority>{p.priority}</priority>")
    if p.muc:
        history = "" if p.muc_history is None else f'<history maxstanzas="{int(p.muc_history)}"/>'
        parts.append(f'<x xmlns="{NS_MUC}">{history}{elem("password", p.muc_password)}</x>')
    parts.append("</presence>")
    return "".join(parts)


def format_error(err: StanzaError) -> str:
    """An error stanza (RFC 6120 8.3) of kind message, presence or iq."""
    if err.kind not in ("message", "presence", "iq"):
        raise LocalError(f"error stanza kind {err.kind!r}")
    if err.condition not in CONDITIONS:
        raise LocalError(f"{err.condition!r} is not an RFC 6120 8.3.3 condition")
    if err.type not in ERROR_TYPES:
        raise LocalError(f"error type {err.type!r} is not one of {sorted(ERROR_TYPES)}")
    text = "" if err.text is None else f'<text xmlns="{NS_STANZAS}">{text_escape(err.text)}</text>'
    return (
        f'<{err.kind} from="{attr_escape(err.sender)}" to="{attr_escape(err.recipient)}"'
        f'{attr("id", err.id)} type="error"><error type="{err.type}">'
        f'<{err.condition} xmlns="{NS_STANZAS}"/>{text}</error></{err.kind}>'
    )


def error_for(
    refusal: Refusal, kind: str, *, sender: str, recipient: str, id_: str | None
) -> StanzaError:
    """The error (RFC 6120 8.3) answering a stanza with ``refusal``: its XMPP condition, type and
    text; ``sender`` is who the refused stanza was addressed to."""
    text = refusal.text or None
    return StanzaError(
        sender, recipient, id_, refusal.xmpp_condition, refusal.xmpp_type, text, kind
    )


def format_iq(type_: str, sender: str, recipient: str, id_: str, payload: str = "") -> str:
    """An ``<iq>`` of type get, set or result around an already formatted payload."""
    return (
        f'<iq type="{type_}" from="{attr_escape(sender)}" to="{attr_escape(recipient)}"'
        f' id="{attr_escape(id_)}">{payload}</iq>'
    )


# --- XHTML-IM ------------------------------------------------------------------------------------


def clean_xhtml(html: str) -> str | None:
    """Re-serialise XHTML-IM inner XML from the core, or None if it is not well-formed.

    Re-serialising (not just checking) matters: comments, processing instructions and entity
    references parse fine but are forbidden in XMPP (RFC 6120 11.1) and would close the stream.
    """
    wrapped = f'<body xmlns="{NS_XHTML}">{xml_safe_text(html)}</body>'.encode()
    try:
        body = parse_xml(wrapped, XHTML_LIMITS)
    except PeerError:
        return None
    return xhtml_inner(body)


def xhtml_inner(body: ET.Element) -> str | None:
    """The inner XML of an XHTML ``<body>``, without recursion; None when too deep or large.

    Elements outside the XHTML namespace are dropped with their content (XEP-0071 allows only
    XHTML there); their tails are kept, as is all text.
    """
    out: list[str] = [text_escape(body.text)] if body.text else []
    # (tag name, remaining children, tail to write after the close tag)
    stack: list[tuple[str, Iterator[ET.Element], str | None]] = [("", iter(body), None)]
    count = 0
    while stack:
        name, children, tail = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            if stack:
                out.append(f"</{name}>")
                if tail:
                    out.append(text_escape(tail))
            continue
        count += 1
        if count > XHTML_LIMITS.max_elements or len(stack) > XHTML_LIMITS.max_depth:
            return None
        tag = child.tag
        if isinstance(tag, str) and tag.startswith(_XHTML_PREFIX):
            local = tag[len(_XHTML_PREFIX) :]
            attrs = "".join(
                f' {k}="{attr_escape(v)}"' for k, v in child.attrib.items() if "}" not in k
            )
            out.append(f"<{local}{attrs}>")
            if child.text:
                out.append(text_escape(child.text))
            stack.append((local, iter(child), child.tail))
        elif child.tail:
            out.append(text_escape(child.tail))
    return "".join(out)


# --- inbound -------------------------------------------------------------------------------------


def _local_tags(local: str) -> frozenset[str]:
    return frozenset({f"{{{NS_COMPONENT}}}{local}", f"{{{NS_CLIENT}}}{local}"})


#: Child tag -> what it is, for one dict lookup per child on the hot path.
_MESSAGE_CHILDREN: dict[str, str] = {
    **dict.fromkeys(_local_tags("body"), "body"),
    **dict.fromkeys(_local_tags("thread"), "thread"),
    **dict.fromkeys(_local_tags("subject"), "subject"),
    **dict.fromkeys(_local_tags("error"), "error"),
    f"{{{NS_XHTML_IM}}}html": "html",
    f"{{{NS_RECEIPTS}}}request": "request",
    f"{{{NS_RECEIPTS}}}received": "received",
    f"{{{NS_DELAY}}}delay": "delay",
    **{f"{{{NS_CHATSTATES}}}{s}": "state" for s in CHAT_STATES},
    f"{{{NS_MARKERS}}}markable": "markable",
    f"{{{NS_MARKERS}}}displayed": "displayed",
    f"{{{NS_CORRECT}}}replace": "replace",
    f"{{{NS_OOB}}}x": "oob",
    f"{{{NS_SID}}}origin-id": "origin",
}
_OOB_URL = f"{{{NS_OOB}}}url"
_PRESENCE_CHILDREN: dict[str, str] = {
    **dict.fromkeys(_local_tags("show"), "show"),
    **dict.fromkeys(_local_tags("status"), "status"),
    **dict.fromkeys(_local_tags("priority"), "priority"),
    **dict.fromkeys(_local_tags("error"), "error"),
    f"{{{NS_MUC}}}x": "muc",
    f"{{{NS_MUC_USER}}}x": "muc_user",
}
_XHTML_BODY = f"{{{NS_XHTML}}}body"
_STANZA_PREFIX = "{" + NS_STANZAS + "}"


def parse_error(xml: ET.Element, kind: str, sender: str, recipient: str) -> StanzaError:
    """The StanzaError of an inbound ``type="error"`` stanza (RFC 6120 8.3.2)."""
    condition, etype, text = "undefined-condition", "cancel", None
    for child in xml:
        if child.tag in _MESSAGE_CHILDREN and _MESSAGE_CHILDREN[child.tag] == "error":
            etype = child.get("type", "cancel")
            for item in child:
                tag = item.tag
                if isinstance(tag, str) and tag.startswith(_STANZA_PREFIX):
                    local = tag[len(_STANZA_PREFIX) :]
                    if local == "text":
                        text = item.text
                    elif local in CONDITIONS:
                        condition = local
            break
    if etype not in ERROR_TYPES:
        etype = "cancel"
    return StanzaError(sender, recipient, xml.get("id"), condition, etype, text, kind)


def parse_message(xml: ET.Element, sender: str, recipient: str) -> ChatMessage:
    """The ChatMessage of an inbound non-error ``<message>``; Rejected if the body is too long."""
    body = thread = subject = html = state = receipt_for = stamp = delay_from = None
    displayed = replaces = link = origin = None
    request = markable = False
    kinds = _MESSAGE_CHILDREN
    for child in xml:
        kind = kinds.get(child.tag)
        if kind is None:
            continue
        if kind == "body":
            if body is None:
                body = child.text or ""
        elif kind == "thread":
            thread = child.text
        elif kind == "subject":
            subject = child.text or ""
        elif kind == "state":
            state = child.tag.rpartition("}")[2]
        elif kind == "request":
            request = True
        elif kind == "received":
            receipt_for = child.get("id")
        elif kind == "delay":
            stamp, delay_from = child.get("stamp"), child.get("from")
        elif kind == "markable":
            markable = True
        elif kind == "displayed":
            displayed = child.get("id")
        elif kind == "replace":
            replaces = child.get("id")
        elif kind == "origin":
            origin = child.get("id")
        elif kind == "oob" and link is None:
            url = child.find(_OOB_URL)
            link = (url.text or "").strip() or None if url is not None else None
        elif kind == "html":
            for part in child:
                if part.tag == _XHTML_BODY:
                    html = xhtml_inner(part)
                    break
    if body is not None and len(body) > MAX_BODY:
        raise Rejected("not-acceptable", "modify", f"message body over {MAX_BODY} characters")
    mtype = xml.get("type", "normal")
    if mtype not in MESSAGE_TYPES:
        mtype = "normal"  # RFC 6121 5.2.2: an unknown type is treated as normal
    return ChatMessage(
        sender=sender,
        recipient=recipient,
        body=body,
        id=xml.get("id"),
        type=mtype,
        thread=thread,
        subject=subject,
        html=html,
        chat_state=state,
        receipt_request=request,
        receipt_for=receipt_for,
        delay_stamp=stamp,
        delay_from=delay_from,
        origin_id=origin,
        markable=markable,
        displayed_for=displayed,
        replaces=replaces,
        link=link,
    )


def _priority(text: str | None) -> int:
    try:
        value = int((text or "0").strip())
    except ValueError:
        return 0
    return max(-128, min(127, value))  # RFC 6121 4.7.2.3


def parse_presence(xml: ET.Element, sender: str, recipient: str) -> Presence:
    """The Presence of an inbound non-error ``<presence>``; Rejected for an unknown type."""
    ptype = xml.get("type")
    if ptype is not None and ptype not in PRESENCE_TYPES:
        raise Rejected("bad-request", "modify", f"unknown presence type {ptype[:40]!r}")
    show = status = password = nick = None
    priority = 0
    muc = False
    history: int | None = None
    codes: list[int] = []
    kinds = _PRESENCE_CHILDREN
    for child in xml:
        kind = kinds.get(child.tag)
        if kind is None:
            continue
        if kind == "show":
            show = child.text if child.text in SHOWS else None
        elif kind == "status":
            if status is None:
                status = child.text or ""
        elif kind == "priority":
            priority = _priority(child.text)
        elif kind == "muc":
            muc = True
            for item in child:
                local = item.tag.rpartition("}")[2] if isinstance(item.tag, str) else ""
                if local == "history":
                    raw = item.get("maxstanzas")
                    history = int(raw) if raw is not None and raw.isdigit() else history
                elif local == "password":
                    password = item.text or ""
        elif kind == "muc_user":
            for item in child:
                local = item.tag.rpartition("}")[2] if isinstance(item.tag, str) else ""
                code = item.get("code", "")
                if local == "status" and code.isdigit() and len(code) == 3:
                    codes.append(int(code))
                elif local == "item" and nick is None:
                    nick = item.get("nick")
    return Presence(
        sender=sender,
        recipient=recipient,
        type=ptype,
        show=show,
        status=status,
        priority=priority,
        id=xml.get("id"),
        muc=muc,
        muc_history=history,
        muc_password=password,
        muc_status_codes=tuple(codes),
        muc_nick=nick,
    )
