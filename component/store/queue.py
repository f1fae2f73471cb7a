"""The message queue's database work (DESIGN 8): enqueue, claim, finish, expire.

Like ``ops``, plain synchronous functions over a session, run on the store's worker thread.
Claims and expiry are single ``UPDATE ... RETURNING`` statements: atomic on SQLite, and with
``FOR UPDATE SKIP LOCKED`` in the subquery, safe between instances sharing one PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, and_, insert, or_, select, update
from sqlalchemy.orm import Session

from .mapping import RowMapping, to_datetime
from .models import QueuedMessageRow
from .port import DEFAULT_LEASE
from .records import MessageState, NewMessage, QueuedMessage, RecordNotFound

EXPIRED_REASON = "expired"

QUEUE = RowMapping(QueuedMessage, QueuedMessageRow)
_table = QUEUE.table
_WAITING = (MessageState.QUEUED, MessageState.INFLIGHT)


def enqueue_message(session: Session, message: NewMessage) -> QueuedMessage:
    """A Core INSERT ... RETURNING: the hot path when the XMPP link is down."""
    # The ORM unit of work would cost about twice the CPU here.
    values = QUEUE.to_values(message) | {"attempts": 0, "state": MessageState.QUEUED}
    stmt = insert(_table).values(values).returning(*_table.c)
    return QUEUE.to_record(session.execute(stmt).one())


def _waiting(now: float) -> Any:
    """Queued rows, and inflight rows whose claim lease ran out (their owner died)."""
    c = _table.c
    return or_(
        c.state == MessageState.QUEUED,
        and_(c.state == MessageState.INFLIGHT, c.next_attempt_at <= to_datetime(now)),
    )


def _claim(
    session: Session, chosen: Select[Any], now: float, instance: str, lease: float
) -> list[QueuedMessage]:
    c = _table.c
    # PostgreSQL: FOR UPDATE SKIP LOCKED lets instances claim side by side without waiting on
    # each other's rows; SQLite ignores it, and its single writer makes the UPDATE atomic.
    ids = chosen.with_for_update(skip_locked=True).scalar_subquery()
    stmt = (
        update(_table)
        .where(c.id.in_(ids))
        .values(
            state=MessageState.INFLIGHT,
            owner=instance,
            attempts=c.attempts + 1,
            # While inflight, next_attempt_at is the end of the lease: past it, the row is
            # claimable again, so messages of a dead instance are not stranded.
            next_attempt_at=to_datetime(now + lease),
        )
    )
    return QUEUE.returning(session, stmt)


def claim_due_messages(
    session: Session, now: float, limit: int, instance: str, lease: float = DEFAULT_LEASE
) -> list[QueuedMessage]:
    """Oldest due first; due means ``next_attempt_at`` reached (the lease end when inflight)."""
    c = _table.c
    claimable = and_(
        c.state.in_(_WAITING),
        c.next_attempt_at <= to_datetime(now),
        c.deliver_by > to_datetime(now),
    )
    chosen = select(c.id).where(claimable).order_by(c.next_attempt_at, c.id).limit(limit)
    return _claim(session, chosen, now, instance, lease)


def claim_messages_for_recipient(
    session: Session, recipient: str, now: float, instance: str, lease: float = DEFAULT_LEASE
) -> list[QueuedMessage]:
    """Every waiting message for ``recipient`` not past ``deliver_by``, due or not."""
    c = _table.c
    chosen = (
        select(c.id)
        .where(c.recipient == recipient, _waiting(now), c.deliver_by > to_datetime(now))
        .order_by(c.id)
    )
    return _claim(session, chosen, now, instance, lease)


def messages_for_recipient(session: Session, recipient: str) -> list[QueuedMessage]:
    """Queued or inflight, oldest first."""
    c = _table.c
    return QUEUE.select(session, c.recipient == recipient, c.state.in_(_WAITING))


def waiting_messages(session: Session, limit: int | None = None) -> list[QueuedMessage]:
    """Every queued or inflight message, oldest first (the admin's queue, the oldest age)."""
    c = _table.c
    return QUEUE.select(session, c.state.in_(_WAITING), order_by=("created_at", "id"), limit=limit)


def _finish_message(session: Session, message_id: int, **values: Any) -> None:
    stmt = update(_table).where(_table.c.id == message_id).values(**values)
    if session.execute(stmt.returning(_table.c.id)).first() is None:
        raise RecordNotFound(f"no queued message {message_id}")


def mark_delivered(session: Session, message_id: int, now: float) -> None:
    """Delivered rows stay until ``purge_finished``, for the counts."""
    _finish_message(
        session, message_id, state=MessageState.DELIVERED, owner=None, finished_at=to_datetime(now)
    )


def mark_failed(session: Session, message_id: int, reason: str, now: float) -> None:
    """Failed rows keep ``reason`` as ``last_error`` until ``purge_finished``."""
    _finish_message(
        session,
        message_id,
        state=MessageState.FAILED,
        owner=None,
        last_error=reason,
        finished_at=to_datetime(now),
    )


def reschedule(
    session: Session, message_id: int, next_attempt_at: float, reason: str | None = None
) -> None:
    """Back to queued with no owner; ``reason`` replaces ``last_error``."""
    _finish_message(
        session,
        message_id,
        state=MessageState.QUEUED,
        owner=None,
        next_attempt_at=to_datetime(next_attempt_at),
        last_error=reason,
    )


def release_claims(session: Session, instance: str, now: float) -> int:
    """One UPDATE of ``instance``'s inflight rows, whatever their lease."""
    c = _table.c
    stmt = (
        update(_table)
        .where(c.state == MessageState.INFLIGHT, c.owner == instance)
        .values(state=MessageState.QUEUED, owner=None, next_attempt_at=to_datetime(now))
        .returning(c.id)
    )
    return len(session.execute(stmt).all())


def expire_messages(session: Session, now: float) -> list[QueuedMessage]:
    """One UPDATE ... RETURNING; an inflight message within its lease is left to its deliverer."""
    nowdt = to_datetime(now)
    stmt = (
        update(_table)
        .where(_table.c.deliver_by <= nowdt, _waiting(now))
        .values(state=MessageState.FAILED, owner=None, last_error=EXPIRED_REASON, finished_at=nowdt)
    )
    return QUEUE.returning(session, stmt)


def purge_finished(session: Session, before: float) -> int:
    """One DELETE of delivered and failed rows finished before ``before``."""
    c = _table.c
    return QUEUE.delete_where(
        session,
        c.state.in_((MessageState.DELIVERED, MessageState.FAILED)),
        c.finished_at < to_datetime(before),
    )
