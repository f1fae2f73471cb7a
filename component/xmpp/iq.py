"""The iq requests the XMPP adapter answers itself (disco#info, ping, version, XEP-0100) and the
disco#info queries it sends: pure functions and one responder, no stream.

The core never sees an iq: a SIP user's JID answers service discovery as a phone would, and the
component domain as a SIP gateway (XEP-0100). A request we do not serve raises a
:class:`~component.errors.Refusal`, answered as an error by the link.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from component.addresses import Jid
from component.xmpp.stanzas import (
    MAX_PROMPT,
    NS_CHATSTATES,
    NS_COMPONENT,
    NS_MARKERS,
    NS_RECEIPTS,
    NS_XHTML_IM,
    Rejected,
    attr,
    elem,
    jid_or_none,
)
from sipside.xmlsafe import attr_escape, text_escape

NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
NS_PING = "urn:xmpp:ping"
NS_VERSION = "jabber:iq:version"
NS_GATEWAY = "jabber:iq:gateway"


@dataclass(frozen=True, slots=True)
class DiscoIdentity:
    """One ``<identity>`` of a disco#info answer (XEP-0030 3.1)."""

    category: str
    type: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class DiscoInfo:
    """What an entity says it is and does (XEP-0030 disco#info)."""

    jid: str
    identities: tuple[DiscoIdentity, ...]
    features: frozenset[str]

    def has_identity(self, category: str, type_: str | None = None) -> bool:
        """Whether one identity has this category (and type, if given)."""
        return any(
            i.category == category and (type_ is None or i.type == type_) for i in self.identities
        )


class QueryFailed(Exception):
    """An iq we sent got an error, no answer in time, or could not be sent (link down)."""

    def __init__(self, condition: str, text: str | None = None) -> None:
        super().__init__(condition + (f": {text}" if text else ""))
        self.condition = condition
        self.text = text


def parse_disco_info(jid: str, iq: ET.Element) -> DiscoInfo:
    """The DiscoInfo in a disco#info result iq (unknown children are ignored)."""
    identities: list[DiscoIdentity] = []
    features: set[str] = set()
    query = iq.find(f"{{{NS_DISCO_INFO}}}query")
    if query is not None:
        for item in query:
            if item.tag == f"{{{NS_DISCO_INFO}}}identity":
                category, type_ = item.get("category"), item.get("type")
                if category and type_:
                    identities.append(DiscoIdentity(category, type_, item.get("name")))
            elif item.tag == f"{{{NS_DISCO_INFO}}}feature" and item.get("var"):
                features.add(item.get("var", ""))
    return DiscoInfo(jid, tuple(identities), frozenset(features))


def _query_text(ns: str, inner: str = "", node: str | None = None) -> str:
    return f'<query xmlns="{ns}"{attr("node", node)}>{inner}</query>'


# The component domain is the gateway itself: XEP-0100 wants category gateway, and the SIP type
# is in the XEP-0030 registry. A user JID under it stands for a SIP user: its bare JID is an
# account (account/registered, as a server answers for its own users' bare JIDs), its full JID a
# SIP user agent, and SIP user agents are phones or softphones (client/phone).
_DOMAIN_IDENTITY = DiscoIdentity("gateway", "sip", "SIP gateway")
_ACCOUNT_IDENTITY = DiscoIdentity("account", "registered")
_UA_IDENTITY = DiscoIdentity("client", "phone")
_COMMON_FEATURES = (
    NS_DISCO_INFO,
    NS_PING,
    NS_VERSION,
    NS_CHATSTATES,
    NS_RECEIPTS,
    NS_MARKERS,
    NS_XHTML_IM,
)


def _disco_text(identity: DiscoIdentity, features: Iterable[str]) -> str:
    ident = (
        f'<identity category="{attr_escape(identity.category)}"'
        f' type="{attr_escape(identity.type)}"{attr("name", identity.name)}/>'
    )
    feats = "".join(f'<feature var="{attr_escape(f)}"/>' for f in sorted(set(features)))
    return ident + feats


@dataclass(slots=True)
class IqResponder:
    """Answers the iq requests the adapter handles itself; the core never sees them."""

    component: str
    version: str
    extra_features: tuple[str, ...] = ()
    gateway_jid_for: Callable[[str], str] | None = None
    gateway_desc: str = "Enter the SIP address of the person you want to contact."
    gateway_prompt: str = "SIP address"
    #: (JID, name) of the items the component domain lists (the alias transports, DESIGN 9).
    disco_items: Callable[[], list[tuple[str, str]]] | None = None
    _domain_disco: str = field(init=False, default="")
    _user_disco: str = field(init=False, default="")
    _ua_disco: str = field(init=False, default="")

    def __post_init__(self) -> None:
        domain = [*_COMMON_FEATURES, NS_DISCO_ITEMS, *self.extra_features]
        if self.gateway_jid_for is not None:
            domain.append(NS_GATEWAY)
        self._domain_disco = _disco_text(_DOMAIN_IDENTITY, domain)
        self._user_disco = _disco_text(_ACCOUNT_IDENTITY, _COMMON_FEATURES)
        self._ua_disco = _disco_text(_UA_IDENTITY, _COMMON_FEATURES)

    def answer(self, iq: ET.Element, type_: str, to: Jid) -> str:
        """The payload of the result for a get/set ``iq`` addressed to ``to``; Rejected if none.

        RFC 6120 8.2.3: every get or set gets a result or an error, never silence.
        """
        payload = next(iter(iq), None)
        tag = payload.tag if payload is not None else ""
        at_domain = not to.local and not to.resource
        if type_ == "get" and tag == f"{{{NS_PING}}}ping":
            return ""  # XEP-0199 4.2: an empty result
        if type_ == "get" and tag == f"{{{NS_DISCO_INFO}}}query":
            assert payload is not None
            node = payload.get("node")
            if node:  # XEP-0030 3.2: we publish no nodes
                raise Rejected("item-not-found", "cancel", "no such node")
            disco = (
                self._domain_disco
                if at_domain
                else self._ua_disco
                if to.resource
                else self._user_disco
            )
            return _query_text(NS_DISCO_INFO, disco)
        if type_ == "get" and tag == f"{{{NS_DISCO_ITEMS}}}query":
            assert payload is not None
            if payload.get("node"):
                raise Rejected("item-not-found", "cancel", "no such node")
            if not at_domain or self.disco_items is None:
                return _query_text(NS_DISCO_ITEMS)  # XEP-0030 4: no items to list
            items = "".join(
                f'<item jid="{attr_escape(jid)}"{attr("name", name)}/>'
                for jid, name in self.disco_items()
            )
            return _query_text(NS_DISCO_ITEMS, items)
        if type_ == "get" and tag == f"{{{NS_VERSION}}}query":
            inner = f"<name>sipxmpp</name><version>{text_escape(self.version)}</version>"
            return _query_text(NS_VERSION, inner)
        if tag == f"{{{NS_GATEWAY}}}query" and at_domain and self.gateway_jid_for is not None:
            assert payload is not None
            return self._gateway(type_, payload)
        # RFC 6120 8.4: a namespace we do not serve.
        raise Rejected("service-unavailable", "cancel", "not served here")

    def _gateway(self, type_: str, query: ET.Element) -> str:
        """XEP-0100 6.3: get -> desc and prompt; set with a prompt -> the JID it maps to."""
        if type_ == "get":
            inner = elem("desc", self.gateway_desc) + elem("prompt", self.gateway_prompt)
            return _query_text(NS_GATEWAY, inner)
        prompt = query.find(f"{{{NS_GATEWAY}}}prompt")
        if prompt is None:
            prompt = query.find(f"{{{NS_COMPONENT}}}prompt")
        text = (prompt.text or "").strip() if prompt is not None else ""
        if not text or len(text) > MAX_PROMPT:
            raise Rejected("not-acceptable", "modify", "a SIP address is required")
        assert self.gateway_jid_for is not None
        try:
            # The address book refuses with AddressError, which is a Refusal: answered as is.
            jid = self.gateway_jid_for(text)
        except ValueError as exc:
            raise Rejected("jid-malformed", "modify", str(exc)[:200]) from None
        if jid_or_none(jid) is None:
            raise Rejected("jid-malformed", "modify", "no JID for this address")
        return _query_text(NS_GATEWAY, elem("jid", jid))
