"""The instances' heartbeats and the takeover of a dead instance's state (DESIGN 9).

Like ``ops``, synchronous functions over a session, each run in one transaction by the store.
A takeover is one UPDATE per owned table: on PostgreSQL two survivors taking over the same
dead instance serialise on its rows, and the second finds nothing left to move.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from .mapping import RowMapping, to_datetime, upsert
from .models import (
    GatewayInstanceRow,
    PublicationRow,
    RoomMembershipRow,
    SipWatcherSubscriptionRow,
    XmppWatcherSubscriptionRow,
)
from .queue import release_claims
from .records import GatewayInstance, SeatOwner, Takeover

INSTANCES = RowMapping(GatewayInstance, GatewayInstanceRow)
_OWNED = {
    "sip_watchers": SipWatcherSubscriptionRow,
    "xmpp_watchers": XmppWatcherSubscriptionRow,
    "publications": PublicationRow,
    "memberships": RoomMembershipRow,
}


def join_instances(session: Session, instance: str, now: float) -> None:
    """Insert or renew ``instance``'s row: started and beating now, not gone."""
    when = to_datetime(now)
    values = {"name": instance, "started_at": when, "heartbeat_at": when, "gone": False}
    upsert(session, GatewayInstanceRow, values, INSTANCES.key_names)


def beat(session: Session, instance: str, now: float) -> bool:
    """Renew the heartbeat; False when the row is gone or marked gone (taken over)."""
    c = INSTANCES.table.c
    stmt = (
        update(INSTANCES.table)
        .where(c.name == instance, c.gone.is_(False))
        .values(heartbeat_at=to_datetime(now))
    )
    return len(session.execute(stmt.returning(c.name)).all()) > 0


def leave_instances(session: Session, instance: str, now: float) -> None:
    """Mark ``instance`` gone, so a survivor takes its state over at its next check."""
    c = INSTANCES.table.c
    stmt = update(INSTANCES.table).where(c.name == instance)
    session.execute(stmt.values(gone=True, heartbeat_at=to_datetime(now)))


def instances(session: Session) -> list[GatewayInstance]:
    """Every instance row, by name."""
    return INSTANCES.select(session)


def _owner_is(column: Any, owner: str | None) -> Any:
    return column.is_(None) if owner is None else column == owner


def take_over(session: Session, dead: str | None, instance: str, now: float) -> Takeover:
    """Move ``dead``'s rows (``None``: rows with no owner) to ``instance``; its claimed
    messages go back to the queue, due now; its instance row is deleted."""
    moved: dict[str, int] = {}
    for name, model in _OWNED.items():
        table = model.__table__  # type: ignore[attr-defined]
        stmt = update(table).where(_owner_is(table.c.owner, dead)).values(owner=instance)
        moved[name] = len(session.execute(stmt.returning(*table.primary_key.columns)).all())
    messages = 0
    if dead is not None:
        messages = release_claims(session, dead, now)
        INSTANCES.delete(session, dead)
    return Takeover(messages=messages, **moved)


# --- stanzas for state another instance holds (DESIGN 9) ---------------------------------------


def seat_owners(session: Session) -> list[SeatOwner]:
    """Every seat that names an owner, with it."""
    c = RoomMembershipRow.__table__.c  # type: ignore[attr-defined]
    rows = session.execute(select(c.sip_aor, c.room_jid, c.owner).where(c.owner.is_not(None)))
    return [SeatOwner(aor, room, owner) for aor, room, owner in rows]


def watcher_owners(session: Session, target_jid: str) -> list[str]:
    """The instances holding SIP users' subscriptions to ``target_jid``'s presence."""
    c = SipWatcherSubscriptionRow.__table__.c  # type: ignore[attr-defined]
    stmt = select(c.owner).where(c.target_jid == target_jid, c.owner.is_not(None)).distinct()
    return sorted(session.execute(stmt).scalars())


def notify(session: Session, channel: str, payloads: list[str]) -> None:
    """PostgreSQL NOTIFY of each payload on ``channel``, delivered together, in order, when the
    transaction commits."""
    for payload in payloads:
        session.execute(select(func.pg_notify(channel, payload)))
