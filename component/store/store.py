"""The store's async facade: every database call runs on the store's own worker thread.

The event loop never blocks on the database. SQLite gets exactly one worker thread, so its
writes are serialized in-process and never fight over the file lock; PostgreSQL gets a small
pool shared by a few threads. Database errors are translated here, once, into ``StoreError``
(``StoreUnavailable`` when retrying later may help).

A call whose awaiting task is cancelled still finishes on the worker thread: a message whose
``enqueue_message`` was cancelled may be stored all the same (at-least-once, never lost).

A call that finds the database unavailable marks the store down (and tells ``health``): from
then on calls fail at once with ``StoreUnavailable``, queued ones included, instead of each
waiting for a dead server or a held lock, until :meth:`Store.probe` finds it answering again.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import structlog
from sqlalchemy import Engine, create_engine, event, exc, make_url
from sqlalchemy.orm import Session

from component.ports import HealthReport, Part

from . import identities, migrate, ops, queue
from . import instances as heartbeats
from .port import StorePort
from .records import StoreError, StoreUnavailable

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


class _OnWorker(Generic[P, T]):
    """A ``Store`` method made of a session function: awaiting it runs the function in one
    transaction on the store's worker thread. Its docstring is the ``StorePort`` method's."""

    def __init__(self, fn: Callable[Concatenate[Session, P], T]) -> None:
        self._fn = fn

    def __set_name__(self, owner: type[Any], name: str) -> None:
        if name != self._fn.__name__:
            raise TypeError(f"Store.{name} wired to {self._fn.__name__}")
        self.__doc__ = getattr(StorePort, name).__doc__

    @overload
    def __get__(self, store: None, owner: type[Any]) -> _OnWorker[P, T]: ...

    @overload
    def __get__(self, store: Store, owner: type[Any]) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(
        self, store: Store | None, owner: type[Any]
    ) -> _OnWorker[P, T] | Callable[P, Coroutine[Any, Any, T]]:
        if store is None:
            return self
        fn = self._fn

        async def method(*args: P.args, **kwargs: P.kwargs) -> T:
            return await store._run(fn, *args, **kwargs)

        method.__name__ = method.__qualname__ = fn.__name__
        method.__doc__ = self.__doc__
        # Kept on the instance: the next lookup finds it there and skips this descriptor.
        vars(store)[fn.__name__] = method
        return method


class _Owned(_OnWorker[P, T]):
    """A ``Store`` method whose session function takes the owner instance after the session:
    it saves rows as the store's instance's, or lists those it owns (DESIGN 9)."""

    def __init__(self, fn: Callable[Concatenate[Session, str, P], T]) -> None:
        self._owned = fn
        super().__init__(fn)  # type: ignore[arg-type]

    @overload
    def __get__(self, store: None, owner: type[Any]) -> _Owned[P, T]: ...

    @overload
    def __get__(self, store: Store, owner: type[Any]) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(
        self, store: Store | None, owner: type[Any]
    ) -> _Owned[P, T] | Callable[P, Coroutine[Any, Any, T]]:
        if store is None:
            return self
        fn = self._owned

        async def method(*args: P.args, **kwargs: P.kwargs) -> T:
            return await store._run(fn, store.instance, *args, **kwargs)

        method.__name__ = method.__qualname__ = fn.__name__
        method.__doc__ = self.__doc__
        vars(store)[fn.__name__] = method
        return method


class Store:
    """Durable gateway state behind async, domain-named methods returning ``records``.

    Open with ``await Store.open(url)``; ``await close()`` when done. Times are POSIX seconds.
    """

    def __init__(
        self,
        engine: Engine,
        executor: ThreadPoolExecutor,
        *,
        health: HealthReport | None = None,
        busy_timeout: float = 10.0,
        instance: str = "",
    ) -> None:
        self.instance = instance
        """The owner this store names on rows it saves, and whose rows it lists to resume."""
        self._engine = engine
        self._executor = executor
        self._closed = False
        self._health = health
        self._busy_timeout = busy_timeout
        self._down = False  # set on the worker thread by the call that found it gone
        self._announced_down = False

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        threads: int | None = None,
        check_schema: bool = True,
        busy_timeout: float = 10.0,
        health: HealthReport | None = None,
        instance: str = "",
    ) -> Store:
        """Connect to ``url``; unless ``check_schema`` is off, refuse a schema not at head.

        ``health`` hears when the database goes away and when it answers again; ``instance``
        names the owner of what this store saves (DESIGN 9)."""
        is_sqlite = make_url(url).get_backend_name() == "sqlite"
        if threads is None:
            threads = 1 if is_sqlite else 4
        if is_sqlite and threads != 1:
            raise ValueError("SQLite stores use exactly one worker thread")
        executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store")
        engine = create_store_engine(url, threads, busy_timeout)
        store = cls(engine, executor, health=health, busy_timeout=busy_timeout, instance=instance)
        try:
            if check_schema:
                await store._call(functools.partial(migrate.check_at_head, engine))
            else:
                await store._call(functools.partial(_ping, engine))
        except BaseException:
            await store.close()
            raise
        log.info("store_opened", url=engine.url.render_as_string(hide_password=True))
        if health is not None:
            health.report(Part.DATABASE, True, "opened")
        return store

    @property
    def is_sqlite(self) -> bool:
        """SQLite: one instance only (DESIGN 9)."""
        return self._engine.dialect.name == "sqlite"

    @property
    def down(self) -> bool:
        """True while calls fail at once: the database did not answer and no probe has since."""
        return self._down

    async def probe(self) -> bool:
        """One trivial query (SQLite: take and drop the write lock); True when it answered.

        A store that was down is up again once this answers; one that was up and does not
        answer is marked down.
        """
        try:
            await self._call(
                functools.partial(_probe, self._engine, min(self._busy_timeout, 1.0)), probe=True
            )
        except StoreUnavailable:
            return False
        if self._down or self._announced_down:
            self._down = self._announced_down = False
            if self._health is not None:
                self._health.report(Part.DATABASE, True, "answered a probe")
        return True

    async def close(self) -> None:
        """Finish queued calls, then release the worker thread and connections."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._engine.dispose)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[[], T], *, probe: bool = False) -> T:
        """Run ``fn`` on the worker thread, translating database errors; while the store is
        down, only a ``probe`` reaches the database."""
        if self._closed:
            raise StoreUnavailable("store is closed")
        if self._down and not probe:
            raise StoreUnavailable("database down; waiting for it to answer")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(self._on_worker, fn, probe)
            )
        except StoreUnavailable as error:
            self._announce_down(error)
            raise

    def _on_worker(self, fn: Callable[[], T], probe: bool) -> T:
        # Calls queued behind the one that found the database gone fail here at once: the
        # flag is set on this thread, before the next queued call starts.
        if self._down and not probe:
            raise StoreUnavailable("database down; waiting for it to answer")
        try:
            return _translated(fn)
        except StoreUnavailable:
            self._down = True
            raise

    def _announce_down(self, error: StoreUnavailable) -> None:
        """Report the outage to ``health`` once (on the loop thread); health logs it."""
        if self._announced_down or self._closed:
            return
        self._announced_down = True
        if self._health is not None:
            self._health.report(Part.DATABASE, False, str(error))

    async def _run(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(session, ...)`` in one transaction on the worker thread; commit, then return."""
        return await self._call(
            functools.partial(_in_transaction, self._engine, fn, *args, **kwargs)
        )

    # Each method is the session function of the same name in ``queue`` or ``ops``, with the
    # parameters ``StorePort`` documents, run by ``_run``; ``_OnWorker`` makes it awaitable.

    enqueue_message = _OnWorker(queue.enqueue_message)
    claim_due_messages = _OnWorker(queue.claim_due_messages)
    claim_messages_for_recipient = _OnWorker(queue.claim_messages_for_recipient)
    messages_for_recipient = _OnWorker(queue.messages_for_recipient)
    waiting_messages = _OnWorker(queue.waiting_messages)
    mark_delivered = _OnWorker(queue.mark_delivered)
    mark_failed = _OnWorker(queue.mark_failed)
    reschedule = _OnWorker(queue.reschedule)
    release_claims = _OnWorker(queue.release_claims)
    expire_messages = _OnWorker(queue.expire_messages)
    purge_finished = _OnWorker(queue.purge_finished)

    mark_user_seen = _OnWorker(ops.mark_user_seen)
    user_seen_before = _OnWorker(ops.user_seen_before)
    seen_user = _OnWorker(ops.seen_user)
    set_user_offline = _OnWorker(ops.set_user_offline)
    expire_registrations = _OnWorker(ops.expire_registrations)
    online_users = _OnWorker(ops.online_users)

    save_sip_watcher_subscription = _Owned(ops.save_sip_watcher_subscription)
    sip_watcher_subscription = _OnWorker(ops.sip_watcher_subscription)
    sip_watcher_subscriptions = _Owned(ops.sip_watcher_subscriptions)
    sip_watcher_page = _Owned(ops.sip_watcher_page)
    delete_sip_watcher_subscription = _OnWorker(ops.delete_sip_watcher_subscription)
    save_xmpp_watcher_subscription = _Owned(ops.save_xmpp_watcher_subscription)
    xmpp_watcher_subscription = _OnWorker(ops.xmpp_watcher_subscription)
    xmpp_watcher_subscriptions = _Owned(ops.xmpp_watcher_subscriptions)
    delete_xmpp_watcher_subscription = _OnWorker(ops.delete_xmpp_watcher_subscription)

    save_publication = _Owned(ops.save_publication)
    publication = _OnWorker(ops.publication)
    publications_of = _OnWorker(ops.publications_of)
    all_publications = _Owned(ops.all_publications)
    delete_publication = _OnWorker(ops.delete_publication)
    expire_publications = _OnWorker(ops.expire_publications)
    save_presence = _OnWorker(ops.save_presence)
    presence_of = _OnWorker(ops.presence_of)
    clear_presence = _OnWorker(ops.clear_presence)

    save_approval = _OnWorker(ops.save_approval)
    approval = _OnWorker(ops.approval)
    approvals = _OnWorker(ops.approvals)
    delete_approval = _OnWorker(ops.delete_approval)
    save_membership = _Owned(ops.save_membership)
    remove_membership = _OnWorker(ops.remove_membership)
    memberships = _Owned(ops.memberships)
    save_transport_status = _OnWorker(ops.save_transport_status)
    transport_status = _OnWorker(ops.transport_status)
    transport_statuses = _OnWorker(ops.transport_statuses)
    write_message_identities = _OnWorker(identities.write_message_identities)
    message_identity = _OnWorker(identities.message_identity)
    expire_message_identities = _OnWorker(identities.expire_message_identities)
    counts = _OnWorker(ops.counts)

    join_instances = _OnWorker(heartbeats.join_instances)
    beat = _OnWorker(heartbeats.beat)
    leave_instances = _OnWorker(heartbeats.leave_instances)
    instances = _OnWorker(heartbeats.instances)
    take_over = _OnWorker(heartbeats.take_over)
    seat_owners = _OnWorker(heartbeats.seat_owners)
    watcher_owners = _OnWorker(heartbeats.watcher_owners)
    notify = _OnWorker(heartbeats.notify)


def _implements_port(store: Store) -> StorePort:
    """Never called: mypy checks here that ``Store`` has every ``StorePort`` method as declared."""
    return store


def _ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1")


def _probe(engine: Engine, lock_timeout: float) -> None:
    """SELECT 1; on SQLite the write lock too, which another process may hold (WAL lets reads
    through a lock that stops every write)."""
    with engine.connect() as connection:
        if engine.dialect.name != "sqlite":
            connection.exec_driver_sql("SELECT 1")
            return
        run = connection.exec_driver_sql
        busy = run("PRAGMA busy_timeout").scalar_one()
        run(f"PRAGMA busy_timeout = {int(lock_timeout * 1000)}")
        try:
            run("BEGIN IMMEDIATE")
            run("ROLLBACK")
        finally:
            run(f"PRAGMA busy_timeout = {int(busy)}")


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
