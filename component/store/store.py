"""The store's async facade: every database call runs on the store's own worker thread.

The event loop never blocks on the database. SQLite gets exactly one worker thread, so its
writes are serialized in-process and never fight over the file lock; PostgreSQL gets a small
pool shared by a few threads. Database errors are translated here, once, into ``StoreError``
(``StoreUnavailable`` when retrying later may help).

A call whose awaiting task is cancelled still finishes on the worker thread: a message whose
``enqueue_message`` was cancelled may be stored all the same (at-least-once, never lost).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, ParamSpec, TypeVar

import structlog
from sqlalchemy import Engine, create_engine, event, exc, make_url
from sqlalchemy.orm import Session

from . import migrate, ops, queue
from .models import (
    PublicationRow,
    RoomMembershipRow,
    RosterApprovalRow,
    SipWatcherSubscriptionRow,
    XmppWatcherSubscriptionRow,
)
from .port import DEFAULT_LEASE
from .records import (
    ApprovalDirection,
    ApprovalState,
    JsonObject,
    MessageDirection,
    PresenceRecord,
    Publication,
    QueuedMessage,
    RoomMembership,
    RosterApproval,
    SeenUser,
    SipWatcherSubscription,
    StoreCounts,
    StoreError,
    StoreUnavailable,
    TransportStatus,
    XmppWatcherSubscription,
)

P = ParamSpec("P")
T = TypeVar("T")

log = structlog.get_logger(__name__)

_UNAVAILABLE = (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError, exc.TimeoutError)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Durability first: WAL with synchronous=FULL survives power loss after commit returns.

    synchronous=NORMAL in WAL mode may lose the last commits on power loss, and the gateway
    answers 202 only after the commit, so it would break "nothing acknowledged is lost".
    """
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def create_store_engine(url: str, threads: int, busy_timeout: float) -> Engine:
    """An engine configured for the store: SQLite pragmas, or a PostgreSQL pool per thread."""
    parsed = migrate.engine_url(url)
    if parsed.get_backend_name() == "sqlite":
        # pysqlite's timeout is SQLite's busy timeout: wait for another process's write lock.
        engine = create_engine(parsed, connect_args={"timeout": busy_timeout})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        parsed,
        pool_size=threads,
        max_overflow=0,
        pool_timeout=busy_timeout,
        pool_pre_ping=True,  # a restarted PostgreSQL should not cost us a failed message
    )


class Store:
    """Durable gateway state behind async, domain-named methods returning ``records``.

    Open with ``await Store.open(url)``; ``await close()`` when done. Times are POSIX seconds.
    """

    def __init__(self, engine: Engine, executor: ThreadPoolExecutor) -> None:
        self._engine = engine
        self._executor = executor
        self._closed = False

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        threads: int | None = None,
        check_schema: bool = True,
        busy_timeout: float = 10.0,
    ) -> Store:
        """Connect to ``url``; unless ``check_schema`` is off, refuse a schema not at head."""
        is_sqlite = make_url(url).get_backend_name() == "sqlite"
        if threads is None:
            threads = 1 if is_sqlite else 4
        if is_sqlite and threads != 1:
            raise ValueError("SQLite stores use exactly one worker thread")
        executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store")
        engine = create_store_engine(url, threads, busy_timeout)
        store = cls(engine, executor)
        try:
            if check_schema:
                await store._call(functools.partial(migrate.check_at_head, engine))
            else:
                await store._call(functools.partial(_ping, engine))
        except BaseException:
            await store.close()
            raise
        log.info("store_opened", url=engine.url.render_as_string(hide_password=True))
        return store

    async def close(self) -> None:
        """Finish queued calls, then release the worker thread and connections."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._engine.dispose)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread, translating database errors."""
        if self._closed:
            raise StoreUnavailable("store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(_translated, fn))

    async def _run(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(session, ...)`` in one transaction on the worker thread; commit, then return."""
        return await self._call(
            functools.partial(_in_transaction, self._engine, fn, *args, **kwargs)
        )

    # --- the message queue -----------------------------------------------------------------

    async def enqueue_message(
        self,
        direction: MessageDirection,
        sender: str,
        recipient: str,
        body: str,
        content_type: str,
        *,
        now: float,
        delay: float,
        extra: JsonObject | None = None,
        next_attempt_at: float | None = None,
    ) -> QueuedMessage:
        """Store a message to deliver by ``now + delay``; committed (durable) on return."""
        return await self._run(
            queue.enqueue_message,
            direction,
            sender,
            recipient,
            body,
            content_type,
            now,
            delay,
            extra,
            next_attempt_at,
        )

    async def claim_due_messages(
        self, now: float, limit: int, instance: str, lease: float = DEFAULT_LEASE
    ) -> list[QueuedMessage]:
        """Claim up to ``limit`` due messages for ``instance`` (inflight for ``lease`` s)."""
        return await self._run(queue.claim_due_messages, now, limit, instance, lease)

    async def claim_messages_for_recipient(
        self, recipient: str, now: float, instance: str, lease: float = DEFAULT_LEASE
    ) -> list[QueuedMessage]:
        """Claim all waiting messages for ``recipient`` now, due or not (it came online)."""
        return await self._run(queue.claim_messages_for_recipient, recipient, now, instance, lease)

    async def messages_for_recipient(self, recipient: str) -> list[QueuedMessage]:
        """Messages still waiting for ``recipient`` (read-only, e.g. for the admin command)."""
        return await self._run(queue.messages_for_recipient, recipient)

    async def mark_delivered(self, message_id: int, now: float) -> None:
        """The message reached its recipient. Raises ``RecordNotFound`` for an unknown id."""
        await self._run(queue.mark_delivered, message_id, now)

    async def mark_failed(self, message_id: int, reason: str, now: float) -> None:
        """The message is undeliverable; its sender is to be told ``reason``."""
        await self._run(queue.mark_failed, message_id, reason, now)

    async def reschedule(
        self, message_id: int, next_attempt_at: float, reason: str | None = None
    ) -> None:
        """Return a claimed message to the queue, due at ``next_attempt_at``."""
        await self._run(queue.reschedule, message_id, next_attempt_at, reason)

    async def release_claims(self, instance: str, now: float) -> int:
        """Requeue ``instance``'s inflight messages, due now (at start-up and shutdown)."""
        return await self._run(queue.release_claims, instance, now)

    async def expire_messages(self, now: float) -> list[QueuedMessage]:
        """Fail and return waiting messages past ``deliver_by``, so their senders are told."""
        return await self._run(queue.expire_messages, now)

    async def purge_finished(self, before: float) -> int:
        """Delete delivered and failed messages finished before ``before``."""
        return await self._run(queue.purge_finished, before)

    # --- users seen online -------------------------------------------------------------------

    async def mark_user_seen(
        self, aor: str, now: float, contact: str | None = None, expires: float | None = None
    ) -> SeenUser:
        """``aor`` is online now (REGISTER, PUBLISH, a delivered message); ``expires`` in s."""
        return await self._run(ops.mark_user_seen, aor, now, contact, expires)

    async def user_seen_before(self, aor: str) -> bool:
        """Whether ``aor`` was ever seen online: then a 404 means offline (DESIGN 4.2)."""
        return await self._run(ops.seen_user, aor) is not None

    async def seen_user(self, aor: str) -> SeenUser | None:
        """What is known of ``aor``'s registration, if it was ever seen."""
        return await self._run(ops.seen_user, aor)

    async def set_user_offline(self, aor: str) -> bool:
        """``aor`` went offline; False if it was never seen."""
        return await self._run(ops.set_user_offline, aor)

    async def expire_registrations(self, now: float) -> list[SeenUser]:
        """Set offline and return users whose registration expired by ``now``."""
        return await self._run(ops.expire_registrations, now)

    async def online_users(self) -> list[SeenUser]:
        """Users currently online."""
        return await self._run(ops.online_users)

    # --- SIP users watching XMPP entities (we notify) -------------------------------------

    async def save_sip_watcher_subscription(self, sub: SipWatcherSubscription) -> None:
        """Insert or replace the subscription with ``sub.dialog_id``."""
        await self._run(ops.save_sip_watcher_subscription, sub)

    async def sip_watcher_subscription(self, dialog_id: str) -> SipWatcherSubscription | None:
        """The subscription of dialog ``dialog_id``, if stored."""
        return await self._run(ops.sip_watcher_subscription, dialog_id)

    async def sip_watcher_subscriptions(
        self, target_jid: str | None = None, *, expired_at: float | None = None
    ) -> list[SipWatcherSubscription]:
        """All (for a restart), those watching ``target_jid``, or those expired by a time."""
        return await self._run(ops.sip_watcher_subscriptions, target_jid, expired_at)

    async def delete_sip_watcher_subscription(self, dialog_id: str) -> bool:
        """Forget the subscription of ``dialog_id``; False if there was none."""
        return await self._run(ops.delete_by_key, SipWatcherSubscriptionRow, dialog_id=dialog_id)

    # --- XMPP users watching SIP users (we subscribe) -------------------------------------

    async def save_xmpp_watcher_subscription(self, sub: XmppWatcherSubscription) -> None:
        """Insert or replace the subscription of ``sub.watcher_jid`` to ``sub.sip_aor``."""
        await self._run(ops.save_xmpp_watcher_subscription, sub)

    async def xmpp_watcher_subscription(
        self, watcher_jid: str, sip_aor: str
    ) -> XmppWatcherSubscription | None:
        """The subscription of ``watcher_jid`` to ``sip_aor``, if stored."""
        return await self._run(ops.xmpp_watcher_subscription, watcher_jid, sip_aor)

    async def xmpp_watcher_subscriptions(
        self, sip_aor: str | None = None, *, expiring_before: float | None = None
    ) -> list[XmppWatcherSubscription]:
        """All (for a restart), those watching ``sip_aor``, or those to refresh by a time."""
        return await self._run(ops.xmpp_watcher_subscriptions, sip_aor, expiring_before)

    async def delete_xmpp_watcher_subscription(self, watcher_jid: str, sip_aor: str) -> bool:
        """Forget the subscription; False if there was none."""
        return await self._run(
            ops.delete_by_key, XmppWatcherSubscriptionRow, watcher_jid=watcher_jid, sip_aor=sip_aor
        )

    # --- publications and presence ---------------------------------------------------------

    async def save_publication(self, pub: Publication) -> None:
        """Insert or replace the publication with entity-tag ``pub.etag``."""
        await self._run(ops.save_publication, pub)

    async def publication(self, etag: str) -> Publication | None:
        """The publication with entity-tag ``etag``, if stored."""
        return await self._run(ops.publication, etag)

    async def publications_of(self, entity: str) -> list[Publication]:
        """Every stored publication for ``entity``."""
        return await self._run(ops.publications_of, entity)

    async def all_publications(self) -> list[Publication]:
        """Every stored publication, in one query (restart resume)."""
        return await self._run(ops.all_publications)

    async def delete_publication(self, etag: str) -> bool:
        """Forget a publication (Expires: 0); False if there was none."""
        return await self._run(ops.delete_by_key, PublicationRow, etag=etag)

    async def expire_publications(self, now: float) -> list[Publication]:
        """Delete and return publications expired by ``now``."""
        return await self._run(ops.expire_publications, now)

    async def set_presence(
        self,
        entity: str,
        resource: str,
        *,
        available: bool,
        now: float,
        show: str | None = None,
        status: str | None = None,
        priority: int = 0,
        pidf: str | None = None,
    ) -> PresenceRecord:
        """Remember the presence of ``entity``/``resource`` ('' for no resource)."""
        record = PresenceRecord(entity, resource, available, show, status, priority, now, pidf)
        await self._run(ops.set_presence, record)
        return record

    async def presence_of(self, entity: str) -> list[PresenceRecord]:
        """Last known presence of each of ``entity``'s resources."""
        return await self._run(ops.presence_of, entity)

    async def clear_presence(self, entity: str, resource: str | None = None) -> int:
        """Forget one resource's presence, or all of ``entity``'s."""
        return await self._run(ops.clear_presence, entity, resource)

    # --- approvals, rooms, transports --------------------------------------------------------

    async def set_approval(
        self,
        sip_jid: str,
        xmpp_jid: str,
        direction: ApprovalDirection,
        state: ApprovalState,
        now: float,
    ) -> RosterApproval:
        """Record a subscription decision between a gateway JID and an XMPP JID."""
        return await self._run(ops.set_approval, sip_jid, xmpp_jid, direction, state, now)

    async def approval(
        self, sip_jid: str, xmpp_jid: str, direction: ApprovalDirection
    ) -> RosterApproval | None:
        """The stored decision, if any."""
        return await self._run(ops.approval, sip_jid, xmpp_jid, direction)

    async def approvals(
        self, sip_jid: str | None = None, xmpp_jid: str | None = None
    ) -> list[RosterApproval]:
        """Decisions involving ``sip_jid`` and/or ``xmpp_jid``."""
        return await self._run(ops.approvals, sip_jid, xmpp_jid)

    async def delete_approval(
        self, sip_jid: str, xmpp_jid: str, direction: ApprovalDirection
    ) -> bool:
        """Forget a decision; False if there was none."""
        return await self._run(
            ops.delete_by_key,
            RosterApprovalRow,
            sip_jid=sip_jid,
            xmpp_jid=xmpp_jid,
            direction=direction.value,
        )

    async def save_membership(self, membership: RoomMembership) -> None:
        """Insert or replace a SIP user's seat in a room."""
        await self._run(ops.save_membership, membership)

    async def remove_membership(self, sip_aor: str, room_jid: str) -> bool:
        """Forget a seat (the user left); False if there was none."""
        return await self._run(
            ops.delete_by_key, RoomMembershipRow, sip_aor=sip_aor, room_jid=room_jid
        )

    async def memberships(
        self, sip_aor: str | None = None, room_jid: str | None = None
    ) -> list[RoomMembership]:
        """Seats of ``sip_aor`` and/or in ``room_jid``; all of them to rejoin after a restart."""
        return await self._run(ops.memberships, sip_aor, room_jid)

    async def set_transport_status(
        self, domain: str, up: bool, now: float, detail: str | None = None
    ) -> TransportStatus:
        """Record the result of probing alias transport ``domain``."""
        status = TransportStatus(domain, up, now, detail)
        await self._run(ops.set_transport_status, status)
        return status

    async def transport_status(self, domain: str) -> TransportStatus | None:
        """The last probe result for ``domain``, if it was ever probed."""
        found = await self._run(ops.transport_statuses, domain)
        return found[0] if found else None

    async def transport_statuses(self) -> list[TransportStatus]:
        """The last probe result of every transport."""
        return await self._run(ops.transport_statuses, None)

    async def counts(self) -> StoreCounts:
        """Queue depth by state and other row counts, for metrics."""
        return await self._run(ops.counts)


def _ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1")


def _in_transaction(
    engine: Engine, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
) -> T:
    with Session(engine, expire_on_commit=False) as session, session.begin():
        return fn(session, *args, **kwargs)


def _translated(fn: Callable[[], T]) -> T:
    """The store's one error edge: SQLAlchemy's errors become ``StoreError``s."""
    try:
        return fn()
    except _UNAVAILABLE as error:
        raise StoreUnavailable(f"database unavailable: {error}") from error
    except exc.SQLAlchemyError as error:
        raise StoreError(f"database error: {error}") from error
