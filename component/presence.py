"""Presence across the networks (DESIGN 5): the gateway's presence core.

``PresenceCore`` routes SUBSCRIBE / NOTIFY / PUBLISH / REGISTER and XMPP ``<presence>``. It
owns one RFC 6665 notifier per SIP watcher of an XMPP entity (5.2), one subscriber per XMPP
watcher of a SIP user (5.3), the PUBLISH compositor and the online state of SIP users (5.4).
It talks to the outside only through ports: ``SipPort`` (send a request, get the outcome back
via ``on_sip_response`` / ``on_sip_timeout``), ``XmppPort`` and the ``StorePort``. Every call
takes ``now``; the asyncio driving (one timer, owned tasks, serialised calls) is in
``component.presence_runtime``. Every state change is written to the store (DESIGN 8), and
``resume`` rebuilds the machines from it after a restart.
"""

from __future__ import annotations

import base64
import enum
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from component.addresses import AddressBook, AddressError, HomeUser, XmppTarget
from component.events import Presence, SipText
from component.logs import get_logger
from component.presence_map import (
    SHOW_VALUES,
    XmppPresence,
    XmppPresenceSet,
    pidf_for_xmpp,
    xmpp_for_pidf,
)
from component.store import (
    ApprovalDirection,
    ApprovalState,
    JsonObject,
    SipWatcherSubscription,
    StorePort,
    SubscriptionState,
    XmppWatcherSubscription,
)
from component.store import Publication as StoredPublication
from sipside import pidf
from sipside.dialog import DialogId, address_uri
from sipside.endpoint import peer_for_uri
from sipside.errors import LocalError, PeerError
from sipside.message import SipRequest, SipResponse, make_response
from sipside.notifier import Notifier, NotifierPolicy, NotifierSnapshot, NotifierState
from sipside.peer import Peer
from sipside.publication import (
    Publication,
    PublicationChanged,
    PublicationRemoved,
    PublicationStore,
)
from sipside.subscription import (
    SendRequest,
    SendResponse,
    StateChanged,
    Subscriber,
    SubscriberSnapshot,
    SubscriberState,
    SubscriptionEffect,
    SubscriptionEnded,
    resubscribe_delay,
)
from sipside.subscription import SubscriptionState as SipSubState

log = get_logger("component.presence")

__all__ = [
    "HELP_TEXT",
    "IncomingLike",
    "MachineKind",
    "PresenceCore",
    "ReplyTo",
    "SipPort",
    "UserState",
    "XmppPort",
]

PIDF = pidf.PIDF_CONTENT_TYPE  # sent bare: baresip refuses parameters (SERVERS.md)
RESOURCE = "sip"  # DESIGN 3.1: the resource of SIP users on XMPP
_NO_RETRY = frozenset({"rejected", "noresource", "invariant"})
_TRANSIENT = frozenset({408, 480, 500, 503, 504})  # RFC 3261 21: worth another try later
TRANSIENT_RETRY = 30.0

HELP_TEXT = (
    "Commands: online, offline, away [text], dnd [text], help. "
    "They set the presence your XMPP contacts see."
)


class UserState(enum.Enum):
    """What a SIP user asked to look like with a command to ``sip.registrar`` (DESIGN 5.4)."""

    ONLINE = "online"
    OFFLINE = "offline"
    AWAY = "away"
    DND = "dnd"


_COMMAND_REPLY = {
    UserState.ONLINE: "You are online for your XMPP contacts.",
    UserState.OFFLINE: "You are offline for your XMPP contacts.",
    UserState.AWAY: "You are away for your XMPP contacts.",
    UserState.DND: "You are busy (do not disturb) for your XMPP contacts.",
}


class MachineKind(enum.Enum):
    """Which of the core's machines a SIP transaction belongs to."""

    NOTIFIER = "notifier"
    SUBSCRIBER = "subscriber"


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where the outcome of a request the core sent goes back: machine kind, key, Call-ID."""

    kind: MachineKind
    key: DialogId | tuple[str, str]
    call_id: str


class SipPort(Protocol):
    """What the core needs of the SIP side."""

    def send_request(self, request: SipRequest, peer: Peer | None, reply: ReplyTo) -> None:
        """Send in a client transaction; report via ``on_sip_response`` / ``on_sip_timeout``."""
        ...

    def contact_for(self, transport: str) -> str:
        """Our Contact URI for ``transport``."""
        ...


class XmppPort(Protocol):
    """What the core needs of the XMPP link."""

    @property
    def connected(self) -> bool:
        """True while the component stream is up."""
        ...

    def send_presence(self, presence: Presence) -> bool:
        """Write a presence stanza; False when the link is down."""
        ...


class IncomingLike(Protocol):
    """An incoming SIP request to answer (``sipside.endpoint.IncomingRequest``)."""

    request: SipRequest
    source: Peer

    def send(self, response: SipResponse) -> None:
        """Send a final response."""
        ...


@dataclass(slots=True)
class _Watch:
    """A SIP user watching an XMPP entity: the notifier and who is who."""

    notifier: Notifier
    watcher_jid: str
    watcher_aor: str
    target_jid: str


@dataclass(slots=True)
class _Held:
    """An XMPP user watching a SIP user: our subscriber, or a resubscribe owed at ``retry_at``."""

    subscriber: Subscriber
    watcher_jid: str
    sip_jid: str
    sip_aor: str
    unsubscribing: bool = False
    retry_at: float | None = None


def _dialog_key(key: DialogId) -> str:
    return f"{key.call_id};{key.local_tag};{key.remote_tag}"


def _bare(jid: str) -> str:
    return jid.split("/", 1)[0]


def _resource(jid: str) -> str | None:
    _, slash, resource = jid.partition("/")
    return resource if slash else None


def _json(snap: NotifierSnapshot | SubscriberSnapshot) -> JsonObject:
    data: dict[str, Any] = asdict(snap)
    for name, value in data.items():
        if isinstance(value, bytes):
            data[name] = base64.b64encode(value).decode("ascii")
        elif isinstance(value, tuple):
            data[name] = list(value)
    return data


def _notifier_snapshot(data: JsonObject) -> NotifierSnapshot:
    values = dict(data)
    values["body"] = base64.b64decode(values["body"])
    values["route_set"] = tuple(values["route_set"])
    return NotifierSnapshot(**values)


def _subscriber_snapshot(data: JsonObject) -> SubscriberSnapshot:
    values = dict(data)
    values["route_set"] = tuple(values["route_set"])
    values["accept"] = tuple(values["accept"])
    return SubscriberSnapshot(**values)


def _peer_for(request: SipRequest) -> Peer | None:
    """Where an in-dialog request goes: its first Route, else its remote target.

    A stock Kamailio does not relay an in-dialog request that carries no Route, so such
    requests go straight to the peer; an unroutable host name falls back to the proxy.
    """
    routes = request.header_values("Route")
    uri = address_uri(routes[0]) if routes else request.uri
    try:
        return peer_for_uri(uri)
    except LocalError:
        return None


def _contact_expires(contact: str) -> int | None:
    # The parameters after the name-addr (RFC 3261 10.2.1.1 "expires" contact parameter).
    tail = contact[contact.rfind(">") + 1 :] if ">" in contact else contact
    for param in tail.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "expires" and value.strip().isdigit():
            return int(value.strip())
    return None


class PresenceCore:
    """Presence both ways between SIP and XMPP users (DESIGN 5), with persistence (DESIGN 8)."""

    def __init__(
        self,
        book: AddressBook,
        *,
        sip: SipPort,
        xmpp: XmppPort,
        store: StorePort,
        sip_server: bool = True,
        priority: int = 9,
        expires: int = 3600,
        restore_spread: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.book = book
        self.sip = sip
        self.xmpp = xmpp
        self.store = store
        self.sip_server = sip_server
        self.priority = priority
        self.expires = expires
        self.restore_spread = restore_spread
        self.rng = rng or random.Random()
        # RFC 6665 8.3.1 deprecates 202, DESIGN 5.2 asks for it.
        self.policy = NotifierPolicy(accept_status=202)
        self.publications = PublicationStore(events=("presence",), content_types=(PIDF,))
        self.on_user_online: Callable[[str], None] | None = None
        self._watches: dict[DialogId, _Watch] = {}
        self._held: dict[tuple[str, str], _Held] = {}
        self._held_by_dialog: dict[tuple[str, str], tuple[str, str]] = {}
        self._xmpp_presence: dict[str, XmppPresenceSet] = {}

    # =========================================================================================
    # SIP requests in

    async def on_sip_request(self, incoming: IncomingLike, now: float) -> None:
        """Answer SUBSCRIBE, NOTIFY, PUBLISH or REGISTER; peer errors are answered here, once."""
        request = incoming.request
        try:
            match request.method:
                case "SUBSCRIBE":
                    await self._on_subscribe(incoming, now)
                case "NOTIFY":
                    await self._on_notify(incoming, now)
                case "PUBLISH":
                    await self._on_publish(incoming, now)
                case "REGISTER":
                    await self._on_register(incoming, now)
                case _:
                    incoming.send(make_response(request, 405, headers=[("Allow", "SUBSCRIBE")]))
        except PeerError as exc:
            headers = [("Warning", f'399 sipxmpp "{exc.warning}"')] if exc.warning else []
            incoming.send(make_response(request, exc.status, exc.reason, headers=headers))

    async def _on_subscribe(self, incoming: IncomingLike, now: float) -> None:
        request = incoming.request
        if request.to_tag:
            key = DialogId(request.call_id, request.to_tag, request.from_tag or "")
            watch = self._watches.get(key)
            if watch is None:
                # RFC 6665 4.2.1.2: a refresh for a subscription we do not know.
                incoming.send(make_response(request, 481))
                return
            effects = watch.notifier.handle_subscribe(request, now)
            await self._run_notifier(watch, effects, now, incoming)
            if watch.notifier.state is NotifierState.TERMINATED:
                await self._maybe_unsubscribe_xmpp(watch)
            return
        target = self.book.classify_request_uri(request.uri)
        if not isinstance(target, XmppTarget) or target.nick:
            raise PeerError(404, "Not Found", "presence is served for XMPP users only")
        watcher_aor = address_uri(request.header("From") or "")
        watcher_jid = self.book.jid_for_sip_uri(watcher_aor)
        approval = await self.store.approval(
            watcher_jid, target.jid, ApprovalDirection.SIP_WATCHES_XMPP
        )
        approved = approval is not None and approval.state is ApprovalState.APPROVED
        body = await self._pidf_of(target.jid) if approved else b""
        notifier, effects = Notifier.accept(
            request,
            now,
            events=("presence",),
            contact=self.sip.contact_for(incoming.source.transport),
            state=NotifierState.ACTIVE if approved else NotifierState.PENDING,
            body=body,
            content_type=PIDF if approved else None,
            policy=self.policy,
        )
        if notifier is None:
            await self._run_notifier(None, effects, now, incoming)
            return
        watch = _Watch(notifier, watcher_jid, watcher_aor, target.jid)
        self._watches[notifier.dialog.id] = watch
        log.info("sip_watcher_subscribed", sip_uri=watcher_aor, jid=target.jid, approved=approved)
        await self._run_notifier(watch, effects, now, incoming)
        if notifier.state is NotifierState.TERMINATED:
            return  # a fetch (Expires: 0)
        me = f"{watcher_jid}/{RESOURCE}"
        if approved:
            # The server then sends Bob's current presence (RFC 6121 4.3).
            self._send_xmpp(Presence(sender=me, recipient=target.jid, type="probe"))
        else:
            await self.store.set_approval(
                watcher_jid,
                target.jid,
                ApprovalDirection.SIP_WATCHES_XMPP,
                ApprovalState.PENDING,
                now,
            )
            self._send_xmpp(Presence(sender=watcher_jid, recipient=target.jid, type="subscribe"))

    async def _maybe_unsubscribe_xmpp(self, gone: _Watch) -> None:
        """The last dialog of a watcher for a target ended: unsubscribe on XMPP too."""
        if any(
            w.watcher_jid == gone.watcher_jid and w.target_jid == gone.target_jid
            for w in self._watches.values()
        ):
            return
        await self.store.delete_approval(
            gone.watcher_jid, gone.target_jid, ApprovalDirection.SIP_WATCHES_XMPP
        )
        self._send_xmpp(
            Presence(sender=gone.watcher_jid, recipient=gone.target_jid, type="unsubscribe")
        )

    async def _on_notify(self, incoming: IncomingLike, now: float) -> None:
        request = incoming.request
        key = self._held_by_dialog.get((request.call_id, request.to_tag or ""))
        held = self._held.get(key) if key is not None else None
        if held is None:
            # RFC 6665 4.1.3: a NOTIFY for no subscription of ours.
            incoming.send(make_response(request, 481))
            return
        effects = held.subscriber.handle_notify(request, now)
        await self._run_subscriber(held, effects, now, incoming)

    async def _on_publish(self, incoming: IncomingLike, now: float) -> None:
        request = incoming.request
        user = self._home_user(request.uri)
        if request.body:
            # Hostile or malformed PIDF is refused before the compositor keeps it (DESIGN 5.1).
            pidf.decode(request.body, request.header("Content-Type"))
        for effect in self.publications.handle_publish(request, now, entity=user.uri):
            match effect:
                case SendResponse(response):
                    incoming.send(response)
                case PublicationChanged(pub, previous, changed):
                    await self._save_publication(pub, previous)
                    if changed:
                        await self.store.mark_user_seen(user.uri, now)
                        await self._announce(user.jid, self._pidf_state(pub), now)
                case PublicationRemoved(pub, _):
                    await self._publication_gone(pub, now)

    async def _on_register(self, incoming: IncomingLike, now: float) -> None:
        request = incoming.request
        user = self._home_user(address_uri(request.header("To") or ""))
        contacts = request.header_values("Contact")
        if not contacts:
            # RFC 3261 10.2.3: a REGISTER without Contact only asks; it changes nothing.
            incoming.send(make_response(request, 200))
            return
        header = request.header("Expires")
        default = int(header) if header is not None and header.strip().isdigit() else 3600
        # RFC 3261 10.2.1.1: a contact's expires parameter overrides the Expires header.
        contact = address_uri(contacts[0]) if contacts and contacts[0].strip() != "*" else None
        param = _contact_expires(contacts[0]) if contact is not None else None
        expires = param if param is not None else default
        headers = [("Expires", str(expires))]
        if contact is not None:
            headers.append(("Contact", f"<{contact}>;expires={expires}"))
        incoming.send(make_response(request, 200, headers=headers))
        seen = await self.store.seen_user(user.uri)
        was_online = seen is not None and seen.online
        if expires > 0:
            await self.store.mark_user_seen(user.uri, now, contact, expires)
            if not was_online:
                await self.went_online(user.uri, now)
        elif was_online:
            await self.store.set_user_offline(user.uri)
            await self.went_offline(user.uri, now)

    def _home_user(self, uri: str) -> HomeUser:
        target = self.book.classify_request_uri(uri)
        if not isinstance(target, HomeUser):
            raise PeerError(404, "Not Found", "not a user of the home SIP domain")
        return target

    # =========================================================================================
    # SIP users: online, offline, commands (DESIGN 5.4)

    async def went_online(self, aor: str, now: float) -> None:
        """A SIP user is online: their best known state to every approved XMPP watcher."""
        jid = self.book.jid_for_sip_uri(aor)
        state = await self._sip_state(jid, aor)
        if not state.available:
            state = XmppPresence(RESOURCE, True, priority=self.priority)
        log.info("sip_user_online", sip_uri=aor)
        await self._announce(jid, state, now)
        if self.on_user_online is not None:
            self.on_user_online(aor)

    async def went_offline(self, aor: str, now: float) -> None:
        """A SIP user is offline: unavailable to every approved XMPP watcher."""
        jid = self.book.jid_for_sip_uri(aor)
        log.info("sip_user_offline", sip_uri=aor)
        await self._announce(jid, XmppPresence(RESOURCE, False, priority=self.priority), now)

    async def command(self, msg: SipText, now: float) -> str | None:
        """A command MESSAGE to ``sip.registrar``: the notice text, None if not a command."""
        word, _, rest = msg.body.strip().partition(" ")
        if word.lower() == "help":
            return HELP_TEXT
        try:
            state = UserState(word.lower())
            user = self._home_user(msg.from_uri)
        except (ValueError, PeerError):
            return None
        status = rest.strip() or None
        show = {UserState.AWAY: "away", UserState.DND: "dnd"}.get(state)
        available = state is not UserState.OFFLINE
        if available:
            await self.store.mark_user_seen(user.uri, now)
        else:
            await self.store.set_user_offline(user.uri)
        presence = XmppPresence(RESOURCE, available, show, status, self.priority)
        await self._announce(user.jid, presence, now)
        if available and self.on_user_online is not None:
            self.on_user_online(user.uri)
        return _COMMAND_REPLY[state]

    async def sweep(self, now: float) -> None:
        """The sleep_time sweep: registrations that ran out make their users offline."""
        for user in await self.store.expire_registrations(now):
            await self.went_offline(user.aor, now)

    async def _sip_state(self, jid: str, aor: str) -> XmppPresence:
        """A SIP user's last known state: stored presence, else its registration."""
        for record in await self.store.presence_of(jid):
            return XmppPresence(
                RESOURCE, record.available, record.show, record.status, self.priority
            )
        seen = await self.store.seen_user(aor)
        return XmppPresence(RESOURCE, seen is not None and seen.online, priority=self.priority)

    async def _announce(self, sip_jid: str, state: XmppPresence, now: float) -> None:
        """Remember ``state`` and send it to every approved XMPP watcher of ``sip_jid``."""
        await self.store.set_presence(
            sip_jid,
            "",
            available=state.available,
            now=now,
            show=state.show,
            status=state.status,
            priority=state.priority,
        )
        for approval in await self.store.approvals(sip_jid=sip_jid):
            if (
                approval.direction is ApprovalDirection.XMPP_WATCHES_SIP
                and approval.state is ApprovalState.APPROVED
            ):
                self._send_xmpp(self._presence_from(sip_jid, approval.xmpp_jid, state))

    def _presence_from(self, sip_jid: str, watcher: str, state: XmppPresence) -> Presence:
        return Presence(
            sender=f"{sip_jid}/{RESOURCE}",
            recipient=watcher,
            type=None if state.available else "unavailable",
            show=state.show if state.available else None,
            status=state.status,
            priority=self.priority,
        )

    def _pidf_state(self, pub: Publication) -> XmppPresence:
        try:
            doc = pidf.decode(pub.body, pub.content_type)
        except PeerError:
            return XmppPresence(RESOURCE, False, priority=self.priority)
        return xmpp_for_pidf(doc, self.priority, RESOURCE)

    async def _save_publication(self, pub: Publication, previous: str | None) -> None:
        if previous is not None:
            await self.store.delete_publication(previous)
        await self.store.save_publication(
            StoredPublication(
                etag=pub.etag,
                entity=pub.entity,
                body=pub.body.decode("utf-8", "replace"),
                content_type=pub.content_type or PIDF,
                expires_at=pub.expires_at,
                event=pub.event,
            )
        )

    async def _publication_gone(self, pub: Publication, now: float) -> None:
        await self.store.delete_publication(pub.etag)
        jid = self.book.jid_for_sip_uri(pub.entity)
        left = self.publications.publications(pub.entity, pub.event)
        if left:
            await self._announce(jid, self._pidf_state(left[-1]), now)
            return
        # No published state any more: what the registration says (RFC 3903 6: gone).
        await self.store.clear_presence(jid)
        seen = await self.store.seen_user(pub.entity)
        online = seen is not None and seen.online
        await self._announce(jid, XmppPresence(RESOURCE, online, priority=self.priority), now)

    # =========================================================================================
    # XMPP presence in

    async def on_presence(self, presence: Presence, now: float) -> None:
        """A ``<presence>`` addressed to a component JID."""
        recipient = _bare(presence.recipient)
        sender = _bare(presence.sender)
        try:
            await self._on_presence(presence, sender, recipient, now)
        except AddressError as exc:
            # A component JID that names no SIP user (e.g. the bare domain): nothing to do.
            log.info("presence_unroutable", jid=presence.recipient, error=str(exc))

    async def _on_presence(
        self, presence: Presence, sender: str, recipient: str, now: float
    ) -> None:
        match presence.type:
            case None | "unavailable":
                await self._xmpp_state(presence, sender, recipient, now)
            case "subscribed":
                await self._approved(sender, recipient, now)
            case "unsubscribed":
                await self._refused(sender, recipient, now)
            case "subscribe":
                await self._xmpp_subscribe(sender, recipient, now)
            case "unsubscribe":
                await self._xmpp_unsubscribe(sender, recipient, now)
            case "probe":
                await self._probe(sender, recipient)
            case "error":
                await self._bounced(sender, recipient, now)
            case _:
                log.debug("presence_ignored", jid=presence.sender, type=presence.type)

    async def _xmpp_state(self, presence: Presence, bob: str, watcher: str, now: float) -> None:
        """RFC 6121 4.4: Bob's availability changed -> NOTIFY his SIP watchers."""
        current = await self._presence_set(bob)
        resource = _resource(presence.sender)
        available = presence.type is None
        show = presence.show if presence.show in SHOW_VALUES else None
        priority = max(-128, min(127, presence.priority))
        update = XmppPresence(resource, available, show, presence.status, priority)
        self._xmpp_presence[bob] = current.updated(update)
        if available:
            await self.store.set_presence(
                bob,
                resource or "",
                available=True,
                now=now,
                show=show,
                status=presence.status,
                priority=priority,
            )
        else:
            await self.store.clear_presence(bob, resource or "")
        body = await self._pidf_of(bob)
        for watch in list(self._watches.values()):
            if watch.target_jid == bob and watch.watcher_jid == watcher:
                effects = watch.notifier.notify(now, body, PIDF)
                await self._run_notifier(watch, effects, now)

    async def _approved(self, bob: str, watcher: str, now: float) -> None:
        """Bob approved the SIP watcher (RFC 6121 3.1.5): NOTIFY active, probe his presence."""
        await self.store.set_approval(
            watcher, bob, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, now
        )
        body = await self._pidf_of(bob)
        for watch in list(self._watches.values()):
            if watch.target_jid == bob and watch.watcher_jid == watcher:
                await self._run_notifier(watch, watch.notifier.activate(now, body, PIDF), now)
        self._send_xmpp(Presence(sender=f"{watcher}/{RESOURCE}", recipient=bob, type="probe"))

    async def _refused(self, bob: str, watcher: str, now: float) -> None:
        """Bob refused or cancelled: NOTIFY terminated;reason=rejected (RFC 6665 4.2.2)."""
        await self.store.set_approval(
            watcher, bob, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.REFUSED, now
        )
        for watch in list(self._watches.values()):
            if watch.target_jid == bob and watch.watcher_jid == watcher:
                await self._run_notifier(watch, watch.notifier.terminate(now, "rejected"), now)

    async def _bounced(self, bob: str, watcher: str, now: float) -> None:
        """Our subscribe bounced (no such user, server down): pending watches end."""
        for watch in list(self._watches.values()):
            pending = watch.notifier.state is NotifierState.PENDING
            if pending and watch.target_jid == bob and watch.watcher_jid == watcher:
                await self._run_notifier(watch, watch.notifier.terminate(now, "noresource"), now)

    async def _xmpp_subscribe(self, bob: str, sip_jid: str, now: float) -> None:
        """Bob asks to see a SIP user's presence (DESIGN 5.3)."""
        aor = self.book.sip_uri_for_component_jid(sip_jid)
        key = (bob, aor)
        if not self.sip_server:
            # DESIGN 5.3: no presence server on the SIP side: approve and derive the state.
            await self._grant(bob, sip_jid, now, again=True)
            state = await self._sip_state(sip_jid, aor)
            self._send_xmpp(self._presence_from(sip_jid, bob, state))
            return
        held = self._held.get(key)
        if held is not None and not held.unsubscribing and held.retry_at is None:
            if held.subscriber.state is SubscriberState.ACTIVE:
                # A repeated request for a live subscription: confirm it again.
                self._send_xmpp(Presence(sender=sip_jid, recipient=bob, type="subscribed"))
                state = await self._sip_state(sip_jid, aor)
                self._send_xmpp(self._presence_from(sip_jid, bob, state))
            return
        await self.store.set_approval(
            sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP, ApprovalState.PENDING, now
        )
        await self._start_subscriber(bob, sip_jid, aor, now)

    async def _start_subscriber(self, bob: str, sip_jid: str, aor: str, now: float) -> None:
        subscriber = Subscriber(
            local_uri=f"<{self.book.sip_uri_for_jid(bob)}>",
            remote_uri=f"<{aor}>",
            contact=self.sip.contact_for("udp"),
            event="presence",
            expires=self.expires,
            accept=(PIDF,),
            # Spread refreshes of many subscriptions over a few seconds.
            refresh_offset=self.rng.uniform(0.0, 10.0),
        )
        old = self._held.get((bob, aor))
        if old is not None:
            self._forget_dialog(old)
        held = _Held(subscriber, bob, sip_jid, aor)
        self._held[(bob, aor)] = held
        self._held_by_dialog[(subscriber.dialog.call_id, subscriber.dialog.local_tag)] = (bob, aor)
        log.info("xmpp_watcher_subscribing", jid=bob, sip_uri=aor)
        await self._run_subscriber(held, subscriber.start(now), now)

    async def _xmpp_unsubscribe(self, bob: str, sip_jid: str, now: float) -> None:
        """Bob no longer watches the SIP user: SUBSCRIBE Expires: 0 (RFC 6665 4.1.2.3)."""
        aor = self.book.sip_uri_for_component_jid(sip_jid)
        await self.store.delete_approval(sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP)
        held = self._held.get((bob, aor))
        if held is None:
            return
        held.unsubscribing = True
        if held.retry_at is not None:
            await self._drop_held(held)
            return
        await self._run_subscriber(held, held.subscriber.unsubscribe(now), now)

    async def _probe(self, bob: str, sip_jid: str) -> None:
        """RFC 6121 4.3: answer a probe from the last known state, if Bob is approved."""
        approval = await self.store.approval(sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP)
        if approval is None or approval.state is not ApprovalState.APPROVED:
            return
        aor = self.book.sip_uri_for_component_jid(sip_jid)
        state = await self._sip_state(sip_jid, aor)
        self._send_xmpp(self._presence_from(sip_jid, bob, state))

    async def _grant(self, bob: str, sip_jid: str, now: float, *, again: bool = False) -> None:
        """Approve Bob (RFC 6121 3.1.5); ``subscribed`` goes once, or ``again`` on request."""
        approval = await self.store.approval(sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP)
        news = approval is None or approval.state is not ApprovalState.APPROVED
        if news:
            await self.store.set_approval(
                sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP, ApprovalState.APPROVED, now
            )
        if news or again:
            self._send_xmpp(Presence(sender=sip_jid, recipient=bob, type="subscribed"))

    # =========================================================================================
    # Presence of XMPP entities, for NOTIFY bodies

    async def _presence_set(self, jid: str) -> XmppPresenceSet:
        cached = self._xmpp_presence.get(jid)
        if cached is not None:
            return cached
        found = XmppPresenceSet()
        for record in await self.store.presence_of(jid):
            if record.available:
                show = record.show if record.show in SHOW_VALUES else None
                found = found.updated(
                    XmppPresence(
                        record.resource or None, True, show, record.status, record.priority
                    )
                )
        self._xmpp_presence[jid] = found
        return found

    async def _pidf_of(self, jid: str) -> bytes:
        presences = await self._presence_set(jid)
        return pidf.encode(pidf_for_xmpp(self.book.sip_uri_for_jid(jid), presences))

    # =========================================================================================
    # Effects of the SIP machines

    async def _run_notifier(
        self,
        watch: _Watch | None,
        effects: Iterable[SubscriptionEffect],
        now: float,
        incoming: IncomingLike | None = None,
    ) -> None:
        ended = False
        for effect in effects:
            match effect:
                case SendResponse(response):
                    if incoming is not None:
                        incoming.send(response)
                case SendRequest(request) if watch is not None:
                    key = watch.notifier.dialog.id
                    reply = ReplyTo(MachineKind.NOTIFIER, key, key.call_id)
                    self.sip.send_request(request, _peer_for(request), reply)
                case SubscriptionEnded(reason):
                    ended = True
                    if watch is not None:
                        log.info("sip_watcher_ended", sip_uri=watch.watcher_aor, reason=reason)
        if watch is None:
            return
        key = watch.notifier.dialog.id
        if ended or watch.notifier.state is NotifierState.TERMINATED:
            self._watches.pop(key, None)
            await self.store.delete_sip_watcher_subscription(_dialog_key(key))
            return
        await self.store.save_sip_watcher_subscription(
            SipWatcherSubscription(
                dialog_id=_dialog_key(key),
                watcher_aor=watch.watcher_aor,
                target_jid=watch.target_jid,
                state=SubscriptionState(watch.notifier.state.value),
                dialog=_json(watch.notifier.snapshot()),
                expires_at=watch.notifier.expires_at,
            )
        )

    async def _run_subscriber(
        self,
        held: _Held,
        effects: Iterable[SubscriptionEffect],
        now: float,
        incoming: IncomingLike | None = None,
    ) -> None:
        sub = held.subscriber
        for effect in effects:
            match effect:
                case SendResponse(response):
                    if incoming is not None:
                        incoming.send(response)
                case SendRequest(request):
                    peer = _peer_for(request) if sub.dialog.confirmed else None
                    key = (held.watcher_jid, held.sip_aor)
                    self.sip.send_request(
                        request, peer, ReplyTo(MachineKind.SUBSCRIBER, key, sub.dialog.call_id)
                    )
                case StateChanged() as change:
                    await self._subscriber_changed(held, change, now)
        if self._held.get((held.watcher_jid, held.sip_aor)) is not held:
            return
        if held.retry_at is None and sub.state is SubscriberState.TERMINATED:
            await self._drop_held(held)
            return
        self._held_by_dialog[(sub.dialog.call_id, sub.dialog.local_tag)] = (
            held.watcher_jid,
            held.sip_aor,
        )
        await self.store.save_xmpp_watcher_subscription(
            XmppWatcherSubscription(
                watcher_jid=held.watcher_jid,
                sip_aor=held.sip_aor,
                state=_stored_state(sub.state),
                dialog=_json(sub.snapshot()),
                expires_at=sub.expires_at,
            )
        )

    async def _subscriber_changed(self, held: _Held, change: StateChanged, now: float) -> None:
        """What the SIP presence server said, as XMPP presence to Bob (DESIGN 5.3)."""
        bob, sip_jid = held.watcher_jid, held.sip_jid
        match change.state:
            case SipSubState.ACTIVE:
                await self._grant(bob, sip_jid, now)
                state = self._notify_state(change)
                await self.store.set_presence(
                    sip_jid,
                    "",
                    available=state.available,
                    now=now,
                    show=state.show,
                    status=state.status,
                    priority=state.priority,
                )
                self._send_xmpp(self._presence_from(sip_jid, bob, state))
            case SipSubState.PENDING:
                pass  # RFC 6665 4.1.3: not decided yet; Bob waits (DESIGN 5.3)
            case SipSubState.TERMINATED:
                await self._subscriber_ended(held, change, now)

    def _notify_state(self, change: StateChanged) -> XmppPresence:
        if not change.body:
            # Kamailio's first NOTIFY before any PUBLISH has no body: unknown, shown offline.
            return XmppPresence(RESOURCE, False, priority=self.priority)
        try:
            doc = pidf.decode(change.body, change.content_type)
        except PeerError as exc:
            log.info("notify_body_unreadable", error=str(exc))
            return XmppPresence(RESOURCE, False, priority=self.priority)
        return xmpp_for_pidf(doc, self.priority, RESOURCE)

    async def _subscriber_ended(self, held: _Held, change: StateChanged, now: float) -> None:
        bob, sip_jid = held.watcher_jid, held.sip_jid
        if held.unsubscribing:
            return
        if change.status in _TRANSIENT:
            # The presence server or the path is down for now: not Bob's refusal, try later.
            delay: float | None = float(change.retry_after or TRANSIENT_RETRY)
        elif change.reason in _NO_RETRY or (change.status is not None and change.status >= 400):
            delay = None
        else:
            delay = resubscribe_delay(change.reason, change.retry_after)
        if delay is None:
            # RFC 6665 4.1.3 rejected/noresource, or the SUBSCRIBE failed: Bob is refused.
            await self.store.set_approval(
                sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP, ApprovalState.REFUSED, now
            )
            self._send_xmpp(Presence(sender=sip_jid, recipient=bob, type="unsubscribed"))
            return
        # RFC 6665 4.1.3 timeout/deactivated/probation: subscribe again after the delay.
        held.retry_at = now + max(delay, 1.0)

    async def _drop_held(self, held: _Held) -> None:
        self._held.pop((held.watcher_jid, held.sip_aor), None)
        self._forget_dialog(held)
        await self.store.delete_xmpp_watcher_subscription(held.watcher_jid, held.sip_aor)

    def _forget_dialog(self, held: _Held) -> None:
        dialog = held.subscriber.dialog
        self._held_by_dialog.pop((dialog.call_id, dialog.local_tag), None)

    def _send_xmpp(self, presence: Presence) -> None:
        if not self.xmpp.send_presence(presence):
            # Link down: the re-announce on link up (DESIGN 8) brings it across.
            log.debug("presence_not_sent", jid=presence.recipient, type=presence.type)

    # =========================================================================================
    # Outcomes of our requests, timers

    async def on_sip_response(self, reply: ReplyTo, response: SipResponse, now: float) -> None:
        """The final response to a request sent with ``reply``."""
        if response.call_id != reply.call_id:
            return
        match reply.key:
            case DialogId() as key:
                watch = self._watches.get(key)
                if watch is not None:
                    effects = watch.notifier.handle_response(response, now)
                    await self._run_notifier(watch, effects, now)
            case (str(), str()) as pair:
                held = self._held.get(pair)
                if held is not None and held.subscriber.dialog.call_id == reply.call_id:
                    effects = held.subscriber.handle_response(response, now)
                    await self._run_subscriber(held, effects, now)

    async def on_sip_timeout(self, reply: ReplyTo, cseq: int, now: float) -> None:
        """A request sent with ``reply`` got no final response (timeout or transport error)."""
        match reply.key:
            case DialogId() as key:
                watch = self._watches.get(key)
                if watch is not None:
                    await self._run_notifier(watch, watch.notifier.handle_timeout(cseq, now), now)
            case (str(), str()) as pair:
                held = self._held.get(pair)
                if held is not None and held.subscriber.dialog.call_id == reply.call_id:
                    effects = held.subscriber.handle_timeout(cseq, now)
                    await self._run_subscriber(held, effects, now)

    def next_deadline(self) -> float | None:
        """The earliest time ``handle_timer`` has work."""
        times = [w.notifier.next_deadline() for w in self._watches.values()]
        for held in self._held.values():
            times.append(held.retry_at if held.retry_at is not None else None)
            if held.retry_at is None:
                times.append(held.subscriber.next_deadline())
        times.append(self.publications.next_deadline())
        present = [t for t in times if t is not None]
        return min(present) if present else None

    async def handle_timer(self, now: float) -> None:
        """Fire what is due: notifier expiry, subscriber refresh/expiry, resubscribe, PUBLISH."""
        for watch in list(self._watches.values()):
            due = watch.notifier.next_deadline()
            if due is not None and due <= now:
                await self._run_notifier(watch, watch.notifier.handle_timer(now), now)
                if watch.notifier.state is NotifierState.TERMINATED:
                    await self._maybe_unsubscribe_xmpp(watch)
        for held in list(self._held.values()):
            if held.retry_at is not None:
                if held.retry_at <= now:
                    await self._start_subscriber(held.watcher_jid, held.sip_jid, held.sip_aor, now)
                continue
            due = held.subscriber.next_deadline()
            if due is not None and due <= now:
                await self._run_subscriber(held, held.subscriber.handle_timer(now), now)
        for effect in self.publications.handle_timer(now):
            if isinstance(effect, PublicationRemoved):
                await self._publication_gone(effect.publication, now)

    # =========================================================================================
    # Restart and reconnect (DESIGN 8)

    async def resume(self, now: float) -> tuple[int, int, int]:
        """Rebuild notifiers, subscribers and publications from the store after a restart.

        Subscriber refreshes that fell due while we were down are spread over
        ``restore_spread`` seconds, so thousands of them do not leave in one burst.
        Returns the counts (SIP watchers, XMPP watchers, publications).
        """
        for stored in await self.store.sip_watcher_subscriptions():
            try:
                notifier = Notifier.restore(_notifier_snapshot(stored.dialog), policy=self.policy)
                watcher_jid = self.book.jid_for_sip_uri(stored.watcher_aor)
            except (KeyError, TypeError, ValueError, AddressError) as exc:
                log.warning("subscription_unrestorable", dialog=stored.dialog_id, error=str(exc))
                await self.store.delete_sip_watcher_subscription(stored.dialog_id)
                continue
            watch = _Watch(notifier, watcher_jid, stored.watcher_aor, stored.target_jid)
            self._watches[notifier.dialog.id] = watch
        for sub in await self.store.xmpp_watcher_subscriptions():
            if sub.dialog is None:
                continue  # the SUBSCRIBE never got an answer; re-created on the next subscribe
            try:
                subscriber = Subscriber.restore(
                    _subscriber_snapshot(sub.dialog),
                    now,
                    spread=self.rng.uniform(0.0, self.restore_spread),
                    refresh_offset=self.rng.uniform(0.0, 10.0),
                )
                sip_jid = self.book.jid_for_sip_uri(sub.sip_aor)
            except (KeyError, TypeError, ValueError, AddressError) as exc:
                log.warning("subscription_unrestorable", jid=sub.watcher_jid, error=str(exc))
                await self.store.delete_xmpp_watcher_subscription(sub.watcher_jid, sub.sip_aor)
                continue
            held = _Held(subscriber, sub.watcher_jid, sip_jid, sub.sip_aor)
            self._held[(sub.watcher_jid, sub.sip_aor)] = held
            dialog = subscriber.dialog
            self._held_by_dialog[(dialog.call_id, dialog.local_tag)] = (
                sub.watcher_jid,
                sub.sip_aor,
            )
        restored = await self._restore_publications()
        log.info(
            "presence_resumed",
            sip_watchers=len(self._watches),
            xmpp_watchers=len(self._held),
            publications=restored,
        )
        return len(self._watches), len(self._held), restored

    async def _restore_publications(self) -> int:
        # The store lists publications per entity only: ask for every SIP user we know of.
        entities = {u.aor for u in await self.store.online_users()}
        entities |= {h.sip_aor for h in self._held.values()}
        for approval in await self.store.approvals():
            try:
                entities.add(self.book.sip_uri_for_component_jid(approval.sip_jid))
            except AddressError:
                continue
        kept: list[Publication] = []
        for entity in sorted(entities):
            for stored in await self.store.publications_of(entity):
                kept.append(
                    Publication(
                        entity=stored.entity,
                        event=stored.event,
                        etag=stored.etag,
                        body=stored.body.encode("utf-8"),
                        content_type=stored.content_type,
                        expires_at=stored.expires_at,
                    )
                )
        self.publications.restore(kept)
        return len(kept)

    async def on_link_up(self, now: float) -> None:
        """The XMPP link is (back) up: re-announce SIP users, probe watched XMPP users."""
        announced: set[str] = set()
        for user in await self.store.online_users():
            jid = self.book.jid_for_sip_uri(user.aor)
            if jid not in announced:
                announced.add(jid)
                state = await self._sip_state(jid, user.aor)
                await self._announce(jid, state, now)
        for approval in await self.store.approvals():
            jid = approval.sip_jid
            if jid in announced or approval.direction is not ApprovalDirection.XMPP_WATCHES_SIP:
                continue
            announced.add(jid)
            state = await self._sip_state(jid, self.book.sip_uri_for_component_jid(jid))
            if state.available:
                await self._announce(jid, state, now)
        probed: set[tuple[str, str]] = set()
        for watch in self._watches.values():
            pair = (watch.watcher_jid, watch.target_jid)
            if watch.notifier.state is NotifierState.ACTIVE and pair not in probed:
                probed.add(pair)
                me = f"{watch.watcher_jid}/{RESOURCE}"
                self._send_xmpp(Presence(sender=me, recipient=watch.target_jid, type="probe"))

    # -- introspection for the admin commands and tests ------------------------------------

    def counts(self) -> dict[str, int]:
        """Live machines: SIP watchers, XMPP watchers, publications."""
        return {
            "sip_watchers": len(self._watches),
            "xmpp_watchers": len(self._held),
            "publications": len(self.publications.snapshot()),
        }


def _stored_state(state: SubscriberState) -> SubscriptionState:
    match state:
        case SubscriberState.ACTIVE | SubscriberState.UNSUBSCRIBING:
            return SubscriptionState.ACTIVE
        case SubscriberState.TERMINATED:
            return SubscriptionState.TERMINATED
        case _:
            return SubscriptionState.PENDING
