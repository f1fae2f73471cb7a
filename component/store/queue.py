"""The message queue's database work (DESIGN 8): enqueue, claim, finish, expire.

Like ``ops``, plain synchronous functions over a session, run on the store's worker thread.
Claims and expiry are single ``UPDATE ... RETURNING`` statements: atomic on SQLite, and with
``FOR UPDATE SKIP LOCKED`` in the subquery, safe between instances sharing one PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, Select, and_, delete, insert, or_, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from .models import (
    QueuedMessageRow,
)
from .ops import to_datetime, to_timestamp
from .records import (
    JsonObject,
    MessageDirection,
    MessageState,
    QueuedMessage,
    RecordNotFound,
)

EXPIRED_REASON = "expired"


def _message(row: QueuedMessageRow | Row[Any]) -> QueuedMessage:
    """A message from an ORM row or a Core ``RETURNING`` row (same attribute names)."""
    assert row.id is not None
    return QueuedMessage(
        id=row.id,
        direction=row.direction,
        sender=row.sender,
        recipient=row.recipient,
        body=row.body,
        content_type=row.content_type,
        extra=dict(row.extra),
        created_at=to_timestamp(row.created_at),
        deliver_by=to_timestamp(row.deliver_by),
        attempts=row.attempts,
        next_attempt_at=to_timestamp(row.next_attempt_at),
        state=row.state,
        owner=row.owner,
        last_error=row.last_error,
    )


def enqueue_message(
    session: Session,
    direction: MessageDirection,
    sender: str,
    recipient: str,
    body: str,
    content_type: str,
    now: float,
    delay: float,
    extra: JsonObject | None,
    next_attempt_at: float | None,
) -> QueuedMessage:
    """Add a queued message due at ``next_attempt_at`` (default now), kept until now + delay."""
    # Core INSERT ... RETURNING rather than the ORM unit of work: this is the hot path when
    # the XMPP link is down, and it costs about half the CPU.
    table = QueuedMessageRow.__table__  # type: ignore[attr-defined]
    stmt = (
        insert(table)
        .values(
            direction=direction,
            sender=sender,
            recipient=recipient,
            body=body,
            content_type=content_type,
            extra=dict(extra or {}),
            created_at=to_datetime(now),
            deliver_by=to_datetime(now + delay),
            attempts=0,
            next_attempt_at=to_datetime(now if next_attempt_at is None else next_attempt_at),
            state=MessageState.QUEUED,
        )
        .returning(*table.c)
    )
    return _message(session.execute(stmt).one())


def _claimable(now: float) -> Any:
    """Queued rows that are due, or inflight rows whose claim lease ran out (owner died)."""
    t = QueuedMessageRow
    return and_(
        col(t.state).in_([MessageState.QUEUED, MessageState.INFLIGHT]),
        col(t.next_attempt_at) <= to_datetime(now),
        col(t.deliver_by) > to_datetime(now),
    )


def _claim(
    session: Session, chosen: Select[Any], now: float, instance: str, lease: float
) -> list[QueuedMessage]:
    t = QueuedMessageRow
    # PostgreSQL: FOR UPDATE SKIP LOCKED lets instances claim side by side without waiting on
    # each other's rows; SQLite ignores it, and its single writer makes the UPDATE atomic.
    ids = chosen.with_for_update(skip_locked=True).scalar_subquery()
    stmt = (
        update(t)
        .where(col(t.id).in_(ids))
        .values(
            state=MessageState.INFLIGHT,
            owner=instance,
            attempts=col(t.attempts) + 1,
            # While inflight, next_attempt_at is the end of the lease: past it, the row is
            # claimable again, so messages of a dead instance are not stranded.
            next_attempt_at=to_datetime(now + lease),
        )
        .returning(t)
        .execution_options(synchronize_session=False)
    )
    rows = session.scalars(stmt).all()
    return sorted((_message(r) for r in rows), key=lambda m: m.id)


def claim_due_messages(
    session: Session, now: float, limit: int, instance: str, lease: float
) -> list[QueuedMessage]:
    """Claim up to ``limit`` due messages for ``instance``, oldest due first."""
    t = QueuedMessageRow
    chosen = (
        select(col(t.id))
        .where(_claimable(now))
        .order_by(col(t.next_attempt_at), col(t.id))
        .limit(limit)
    )
    return _claim(session, chosen, now, instance, lease)


def claim_messages_for_recipient(
    session: Session, recipient: str, now: float, instance: str, lease: float
) -> list[QueuedMessage]:
    """Claim every waiting message for ``recipient``, due or not (the user just came online)."""
    t = QueuedMessageRow
    waiting = or_(
        col(t.state) == MessageState.QUEUED,
        and_(col(t.state) == MessageState.INFLIGHT, col(t.next_attempt_at) <= to_datetime(now)),
    )
    chosen = (
        select(col(t.id))
        .where(col(t.recipient) == recipient, waiting, col(t.deliver_by) > to_datetime(now))
        .order_by(col(t.id))
    )
    return _claim(session, chosen, now, instance, lease)


def messages_for_recipient(session: Session, recipient: str) -> list[QueuedMessage]:
    """Messages still waiting (queued or inflight) for ``recipient``, oldest first."""
    t = QueuedMessageRow
    stmt = (
        select(t)
        .where(
            col(t.recipient) == recipient,
            col(t.state).in_([MessageState.QUEUED, MessageState.INFLIGHT]),
        )
        .order_by(col(t.id))
    )
    return [_message(r) for r in session.scalars(stmt)]


def _finish_message(session: Session, message_id: int, **values: Any) -> None:
    table = QueuedMessageRow.__table__  # type: ignore[attr-defined]
    stmt = update(table).where(table.c.id == message_id).values(**values).returning(table.c.id)
    if session.execute(stmt).first() is None:
        raise RecordNotFound(f"no queued message {message_id}")


def mark_delivered(session: Session, message_id: int, now: float) -> None:
    """The message reached its recipient."""
    _finish_message(
        session,
        message_id,
        state=MessageState.DELIVERED,
        owner=None,
        finished_at=to_datetime(now),
    )


def mark_failed(session: Session, message_id: int, reason: str, now: float) -> None:
    """The message cannot be delivered; the caller tells its sender."""
    _finish_message(
        session,
        message_id,
        state=MessageState.FAILED,
        owner=None,
        last_error=reason,
        finished_at=to_datetime(now),
    )


def reschedule(
    session: Session, message_id: int, next_attempt_at: float, reason: str | None
) -> None:
    """Put a claimed message back in the queue, due at ``next_attempt_at``."""
    _finish_message(
        session,
        message_id,
        state=MessageState.QUEUED,
        owner=None,
        next_attempt_at=to_datetime(next_attempt_at),
        last_error=reason,
    )


def release_claims(session: Session, instance: str, now: float) -> int:
    """Return ``instance``'s inflight messages to the queue, due now (after a restart)."""
    t = QueuedMessageRow
    stmt = (
        update(t)
        .where(col(t.state) == MessageState.INFLIGHT, col(t.owner) == instance)
        .values(state=MessageState.QUEUED, owner=None, next_attempt_at=to_datetime(now))
        .returning(col(t.id))
    )
    return len(session.execute(stmt).all())


def expire_messages(session: Session, now: float) -> list[QueuedMessage]:
    """Fail every waiting message past ``deliver_by`` and return them, so senders can be told.

    An inflight message within its lease is left alone: its deliverer decides its fate.
    """
    t = QueuedMessageRow
    nowdt = to_datetime(now)
    waiting = or_(
        col(t.state) == MessageState.QUEUED,
        and_(col(t.state) == MessageState.INFLIGHT, col(t.next_attempt_at) <= nowdt),
    )
    stmt = (
        update(t)
        .where(col(t.deliver_by) <= nowdt, waiting)
        .values(state=MessageState.FAILED, owner=None, last_error=EXPIRED_REASON, finished_at=nowdt)
        .returning(t)
        .execution_options(synchronize_session=False)
    )
    return sorted((_message(r) for r in session.scalars(stmt)), key=lambda m: m.id)


def purge_finished(session: Session, before: float) -> int:
    """Delete delivered and failed messages finished before ``before``; returns how many."""
    t = QueuedMessageRow
    stmt = (
        delete(t)
        .where(
            col(t.state).in_([MessageState.DELIVERED, MessageState.FAILED]),
            col(t.finished_at) < to_datetime(before),
        )
        .returning(col(t.id))
    )
    return len(session.execute(stmt).all())
