"""SIP users' own state as SIP tells it (DESIGN 5.4): PUBLISH (RFC 3903) and third-party REGISTER.

``Publications`` keeps the published PIDF documents in a ``PublicationStore`` (ETags, refresh,
expiry), mirrors them in the store so a restart keeps them (DESIGN 8), and tells presence the
document in force after each change. A REGISTER copied by the proxy is answered here and
handed on as a ``Registration``.
"""

from __future__ import annotations

from component.logs import get_logger
from component.ports import PresenceEvents
from component.sip.presence_subscriptions import read_pidf
from component.sip.watch_dialogs import PIDF, Answerable
from component.store import Publication as StoredPublication
from component.store import StorePort
from component.values import Registration, SipUserPublished, SipUserUnpublished
from sipside import pidf
from sipside.dialog import address_uri
from sipside.message import SipResponse, make_response
from sipside.publication import (
    Publication,
    PublicationChanged,
    PublicationRemoved,
    PublicationStore,
)
from sipside.subscription import SendResponse

log = get_logger("component.sip.publications")

__all__ = ["Publications"]


def _contact_expires(contact: str) -> int | None:
    # The parameters after the name-addr (RFC 3261 10.2.1.1 "expires" contact parameter).
    tail = contact[contact.rfind(">") + 1 :] if ">" in contact else contact
    for param in tail.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "expires" and value.strip().isdigit():
            return int(value.strip())
    return None


class Publications:
    """PUBLISH and REGISTER for home-domain SIP users, as values for presence (DESIGN 5.4)."""

    def __init__(self, *, events: PresenceEvents, store: StorePort) -> None:
        self.events = events
        self.store = store
        self.publications = PublicationStore(events=("presence",), content_types=(PIDF,))

    async def on_publish(self, incoming: Answerable, now: float) -> None:
        """RFC 3903 PUBLISH: the compositor keeps the PIDF, a change goes to presence."""
        request = incoming.request
        aor = self.events.home_user(request.uri)
        if request.body:
            # Hostile or malformed PIDF is refused before the compositor keeps it (DESIGN 5.1).
            pidf.decode(request.body, request.header("Content-Type"))
        # DESIGN 8: the 2xx goes out once the publication is stored; a store that is down
        # raises StoreUnavailable before it, and the gate answers 503 instead.
        answers: list[SipResponse] = []
        for effect in self.publications.handle_publish(request, now, entity=aor):
            match effect:
                case SendResponse(response):
                    answers.append(response)
                case PublicationChanged(pub, previous, changed):
                    await self._save(pub, previous)
                    if changed:
                        document = read_pidf(pub.body, pub.content_type)
                        await self.events.published(SipUserPublished(aor, document), now)
                case PublicationRemoved(pub, _):
                    await self._gone(pub, now)
        for response in answers:
            incoming.send(response)

    async def on_register(self, incoming: Answerable, now: float) -> None:
        """A third-party REGISTER: answered here, then told to presence (DESIGN 5.4)."""
        request = incoming.request
        aor = self.events.home_user(address_uri(request.header("To") or ""))
        contacts = request.header_values("Contact")
        if not contacts:
            # RFC 3261 10.2.3: a REGISTER without Contact only asks; it changes nothing.
            incoming.send(make_response(request, 200))
            return
        header = request.header("Expires")
        default = int(header) if header is not None and header.strip().isdigit() else 3600
        # RFC 3261 10.2.1.1: a contact's expires parameter overrides the Expires header.
        contact = address_uri(contacts[0]) if contacts[0].strip() != "*" else None
        param = _contact_expires(contacts[0]) if contact is not None else None
        expires = param if param is not None else default
        headers = [("Expires", str(expires))]
        if contact is not None:
            headers.append(("Contact", f"<{contact}>;expires={expires}"))
        # Stored first: a 200 is never given for a registration the store did not take.
        await self.events.registered(Registration(aor, contact, expires), now)
        incoming.send(make_response(request, 200, headers=headers))

    async def _save(self, pub: Publication, previous: str | None) -> None:
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

    async def _gone(self, pub: Publication, now: float) -> None:
        await self.store.delete_publication(pub.etag)
        left = self.publications.publications(pub.entity, pub.event)
        document = read_pidf(left[-1].body, left[-1].content_type) if left else None
        news = SipUserUnpublished(pub.entity, document, remaining=bool(left))
        await self.events.published(news, now)

    def next_deadline(self) -> float | None:
        """When the next publication expires."""
        return self.publications.next_deadline()

    async def handle_timer(self, now: float) -> None:
        """Expire publications that ran out (RFC 3903 6)."""
        for effect in self.publications.handle_timer(now):
            if isinstance(effect, PublicationRemoved):
                await self._gone(effect.publication, now)

    async def restore(self) -> int:
        """Reload every stored publication after a restart (DESIGN 8); returns the count."""
        kept = [
            Publication(
                entity=stored.entity,
                event=stored.event,
                etag=stored.etag,
                body=stored.body.encode("utf-8"),
                content_type=stored.content_type,
                expires_at=stored.expires_at,
            )
            for stored in await self.store.all_publications()
        ]
        self.publications.restore(kept)
        return len(kept)

    def count(self) -> int:
        """Live publications."""
        return len(self.publications.snapshot())
