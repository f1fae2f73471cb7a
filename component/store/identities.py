"""Message identities (DESIGN 4.3): the ids a relayed message has on each side, kept while a
notification for it can come, so any instance, after a restart too, maps the notification.

Like ``ops``, synchronous functions over a session, each run in one transaction by the store.
The gateway writes identities in batches: one multi-row INSERT ... ON CONFLICT per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, or_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from .mapping import RowMapping, to_datetime, upsert
from .models import MessageIdentityRow
from .records import IdentityKey, MessageDirection, MessageIdentity

IDENTITIES = RowMapping(MessageIdentity, MessageIdentityRow)
_c = IDENTITIES.table.c
# Rows per statement: ten parameters a row stays far below SQLite's and PostgreSQL's limits.
_CHUNK = 500


def _is(key: IdentityKey) -> ColumnElement[bool]:
    return and_(
        _c.direction == key.direction,
        _c.recipient_id == key.recipient_id,
        _c.recipient == key.recipient,
    )


def write_message_identities(
    session: Session, saved: Sequence[MessageIdentity], forgotten: Sequence[IdentityKey]
) -> None:
    """Upsert ``saved`` in one statement (the last of equal keys wins), then delete
    ``forgotten``."""
    rows = list({identity.key: IDENTITIES.to_values(identity) for identity in saved}.values())
    for start in range(0, len(rows), _CHUNK):
        _upsert_all(session, rows[start : start + _CHUNK])
    keys = list(forgotten)
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        IDENTITIES.delete_where(session, or_(*(_is(key) for key in chunk)))


def _upsert_all(session: Session, rows: list[dict[str, Any]]) -> None:
    keys = IDENTITIES.key_names
    match session.get_bind().dialect.name:
        case "postgresql":
            pg = postgresql.insert(IDENTITIES.table).values(rows)
            changed = {name: pg.excluded[name] for name in rows[0] if name not in keys}
            session.execute(pg.on_conflict_do_update(index_elements=list(keys), set_=changed))
        case "sqlite":
            lite = sqlite.insert(IDENTITIES.table).values(rows)
            changed = {name: lite.excluded[name] for name in rows[0] if name not in keys}
            session.execute(lite.on_conflict_do_update(index_elements=list(keys), set_=changed))
        case _:
            for row in rows:
                upsert(session, MessageIdentityRow, row, keys)


def message_identity(
    session: Session,
    direction: MessageDirection,
    recipient_id: str,
    now: float,
    recipient: str | None = None,
) -> MessageIdentity | None:
    """The unexpired identity; with no ``recipient``, the first by key."""
    where = IDENTITIES.matching(direction=direction, recipient_id=recipient_id, recipient=recipient)
    found = IDENTITIES.select(session, *where, _c.expires_at > to_datetime(now), limit=1)
    return found[0] if found else None


def expire_message_identities(session: Session, now: float) -> int:
    """One DELETE of the rows whose expiry passed, by the expiry index."""
    return IDENTITIES.delete_where(session, *IDENTITIES.expired_by(now))
