"""The composition root: builds the adapters and the features from settings, runs, drains on
SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any

from component import __version__
from component.addresses import AddressBook, bare_jid
from component.admin.commands import AdminDesk
from component.http.metrics import GatewayMetrics, Readings
from component.http.status import StatusServer
from component.logs import get_logger
from component.messaging.notifications import Notifications
from component.messaging.router import MessageRouter
from component.ports import Part
from component.presence.core import PresenceCore
from component.ratelimit import SourceBuckets
from component.rooms.core import RoomsCore
from component.rooms.model import RoomsConfig
from component.rooms.ports import StoredMemberships
from component.runtime.forwarding import Forwarding, SeatAnnouncing, Seats
from component.runtime.health import Health, watch_database
from component.runtime.instances import DEAD_AFTER, Instances, SharedSqlite
from component.runtime.loop_lag import LoopLag
from component.runtime.presence_driver import CoreSerial, PresenceDriver
from component.runtime.rooms_driver import RoomsDriver
from component.runtime.signal import UserOnlineSignal, UserStateSignal
from component.runtime.sweeps import sweep_chat_states, sweep_message_identities, sweep_queue
from component.runtime.tasks import TaskOwner
from component.settings import Settings
from component.sip.gate import SipGate, proxy_hosts
from component.sip.sender import SipSender
from component.sip.side import SipSide
from component.sip.transactions import ClientTransactions
from component.store import StoreNotAtHead, Takeover
from component.store.notify import PgBus
from component.store.store import Store
from component.transports.board import TransportBoard
from component.transports.health import SipHealth
from component.transports.service import TransportGuard, Transports
from component.values import ChatMessage, Presence, StanzaError
from component.xmpp.adhoc import NS_COMMANDS, AdhocCommands
from component.xmpp.link import XmppLink
from sipside.endpoint import Endpoint
from sipside.timers import TimerConfig

log = get_logger("component.app")

# Seconds from SIGTERM to the XMPP link's close: the in-flight work's share of the 10 s a
# stopping gateway has (DESIGN 8); closing the link and the endpoint take the rest.
STOP_BUDGET = 6.0


class Gateway:
    """One running gateway: SIP endpoint, XMPP link, store and the features between them.

    Built in dependency order, each piece with its collaborators: the SIP endpoint and what
    sends through it, the XMPP link, presence, messaging, and last the SIP gate that routes
    requests to both; :meth:`run` starts the endpoint with the gate as its request handler.
    ``health`` is the state ``store`` was opened to report into; the SIP listeners and the XMPP
    link report into it here, and ``metrics.listen`` serves it.
    """

    def __init__(self, settings: Settings, store: Store, health: Health) -> None:
        self.settings = settings
        self.store = store
        self.health = health
        # DESIGN 9: the Metrics port the pieces count into; the rest is read at scrape time.
        self.metrics = GatewayMetrics(health, clock=time.time)
        self.book = AddressBook.from_settings(settings)
        sip = settings.sip
        self.endpoint = Endpoint(
            [str(spec) for spec in sip.listen],
            timers=TimerConfig(t1=sip.t1, t2=sip.t2, t4=sip.t4),
            trusted=[str(net) for net in sip.trusted],
            outbound_proxy=sip.proxy or None,
            tls_cert=sip.tls_cert or None,
            tls_key=sip.tls_key or None,
            user_agent=f"sipxmpp/{__version__}",
        )
        # DESIGN 9: the alias transports' states, listed in the component domain's disco#items.
        self.transport_board = TransportBoard(sip.aliases, check_time=settings.timers.check_time)
        xmpp, limits = settings.xmpp, settings.limits
        check_time = settings.timers.check_time
        self.xmpp = XmppLink(
            component=xmpp.component,
            host=xmpp.host,
            port=xmpp.port,
            secret=xmpp.secret.get_secret_value(),
            on_message=self._on_xmpp_message,
            on_error=self._on_xmpp_error,
            on_presence=self._on_xmpp_presence,
            on_link=self._on_link,
            on_unconfirmed=self._on_unconfirmed,
            version=__version__,
            gateway_jid_for=self._jid_for_prompt,
            disco_items=self.transport_board.disco_items,
            rate=SourceBuckets(limits.xmpp_rate, limits.xmpp_burst),
            disco_features=(NS_COMMANDS,),
            metrics=self.metrics,
            # DESIGN 9: a standby instance (Prosody refuses a second connection) retries often
            # enough to be active within check_time of the first one's link dropping.
            min_backoff=min(1.0, check_time * 0.4),
            max_backoff=min(60.0, check_time * 0.8),
            on_stray_answer=self._on_stray_answer,
        )
        # DESIGN 5.4: presence tells whoever listens that a SIP user came online.
        self.user_online = UserOnlineSignal()
        self.user_state = UserStateSignal()
        # DESIGN 5: presence both ways. The serialised driver comes first (the SIP side runs
        # requests and transactions through it); the SIP side builds the presence core with
        # itself as the core's SIP port; the driver then drives both.
        self.presence_serial = CoreSerial(clock=time.time)
        self.sip_sender = SipSender(self.endpoint, cache_time=settings.timers.cache_time)
        self.sip_side = SipSide(
            self.book,
            driver=self.presence_serial,
            transactions=ClientTransactions(self.endpoint, self.presence_serial),
            sender=self.sip_sender,
            store=store,
            presence=lambda sip_port: PresenceCore(
                self.book,
                sip=sip_port,
                xmpp=self.xmpp,
                store=store,
                user_online=self.user_online,
                user_state=self.user_state,
                sip_server=settings.presence.sip_server,
                priority=settings.xmpp.priority,
            ),
        )
        self.presence = self.sip_side.presence
        self.presence_driver = PresenceDriver(
            self.presence_serial,
            core=self.presence,
            sip=self.sip_side,
            xmpp=self.xmpp,
            sweep_interval=settings.timers.sleep_time,
        )
        # DESIGN 9: several instances on PostgreSQL. A stanza about a seat or a SIP watcher's
        # subscription that another instance holds is forwarded to it; a seat is announced to
        # the others before its join goes out, so the room's answer finds it.
        self._tasks = TaskOwner("gateway_task_failed")
        self._own = self._tasks.own
        self.seats = (
            None
            if store.is_sqlite
            else Seats(
                store,
                PgBus(store, settings.database.url, store.instance),
                store.instance,
                book=self.book,
                clock=time.time,
            )
        )
        rooms_xmpp = (
            self.xmpp if self.seats is None else SeatAnnouncing(self.xmpp, self.seats, self._own)
        )
        # DESIGN 6: chat rooms. The core and its driver; messaging hands it MESSAGEs to room
        # and occupant addresses, the XMPP link the rooms' stanzas (given to its run()), and
        # presence tells it the SIP users' state (5.4).
        self.rooms = RoomsDriver(
            RoomsCore(self.book, _rooms_config(settings)),
            book=self.book,
            xmpp=rooms_xmpp,
            sip=self.sip_side,
            store=store,
            memberships=StoredMemberships(store),
            clock=time.time,
            delay_time=settings.timers.delay_time,
        )
        self.forwarding = (
            None
            if self.seats is None
            else Forwarding(
                self.seats,
                rooms=self.rooms,
                presence=self.presence_driver.on_presence,
                answers=self.xmpp.take_stray_answer,
                errors=self._on_forwarded_error,
                refresh=check_time / 2,
                keep=(DEAD_AFTER + 1) * check_time,
            )
        )
        self.user_state.connect(self.rooms)
        self.user_online.connect(self.rooms.user_online)
        # DESIGN 4: messaging, with presence's registrar commands (5.4); it listens for users
        # coming online to retry what waits for them.
        timers = settings.timers
        # DESIGN 4.3: typing and receipts; message ids kept while a notification can come (the
        # message may wait delay_time, a read marker come cache_time after that).
        self.notifications = Notifications(
            self.xmpp,
            self.sip_side,
            clock=time.time,
            keep=timers.delay_time + timers.cache_time,
            store=store,
            shared=not store.is_sqlite,  # PostgreSQL: maybe several instances
        )
        self.router = MessageRouter(
            self.book,
            self.xmpp,
            self.sip_side,
            store,
            self.presence_driver,
            clock=time.time,
            delay_time=settings.timers.delay_time,
            max_inflight=limits.workers * limits.max_jobs,
            queue=limits.queue,
            queue_per_sender=limits.queue_per_sender,
            per_recipient=limits.queue_per_recipient,
            rooms=self.rooms,
            notifications=self.notifications,
            metrics=self.metrics,
            instance=store.instance,
        )
        self.user_online.connect(self.router.user_online)
        # DESIGN 3.3, 9: transports probed every check_time, the SIP proxy with OPTIONS; a
        # MESSAGE to a transport that is down is refused before messaging sees it.
        self.transports = Transports(
            self.transport_board,
            SipHealth(sip.proxy),
            book=self.book,
            xmpp=self.xmpp,
            probe=self.xmpp,
            proxy=self.sip_sender,
            notices=self.router,
            store=store,
            clock=time.time,
            rooms=self.rooms,
        )
        # Last, the SIP gate routes requests to both; run() starts the endpoint with it.
        self.sipgate = SipGate(
            TransportGuard(self.router, self.transports),
            self.sip_side,
            book=self.book,
            rate=SourceBuckets(limits.sip_rate, limits.sip_burst),
            proxies=proxy_hosts(sip.proxy),
        )
        self.endpoint.admit = self.sipgate.admit_source
        # Datagrams read in one wake-up: the stanzas they make go to the server in one write.
        self.endpoint.set_burst(self.xmpp)
        # DESIGN 9: the figures of /metrics and of the admin statistics, read from their owners;
        # the admin commands (XEP-0050) for admin.jids, given to the XMPP link's run().
        self.loop_lag = LoopLag()
        self.readings = Readings(
            self.metrics,
            store=store,
            sip=self.endpoint,
            link=self.xmpp,
            gate=self.sipgate,
            lag=self.loop_lag,
            transports=self.transport_board,
            clock=time.time,
        )
        self.commands = AdhocCommands(
            AdminDesk(
                settings.admin.jids,
                book=self.book,
                stats=self.readings,
                store=store,
                queue=self.router.queue,
                notices=self.router,
                clock=time.time,
            ),
            metrics=self.metrics,
            # The same on every instance, so a form is submitted to any of them (DESIGN 9).
            key=hashlib.sha256(
                b"sipxmpp ad-hoc sessions\n" + settings.xmpp.secret.get_secret_value().encode()
            ).digest(),
        )
        address = settings.metrics.address
        self.status = (
            None
            if address is None
            else StatusServer(
                health, self.metrics, host=address[0], port=address[1], readings=self.readings
            )
        )
        # DESIGN 9: this instance among others on one database; a survivor resumes what it
        # takes over from a dead one.
        self.instances = Instances(
            store,
            store.instance,
            check_time=check_time,
            clock=time.time,
            resume=self._resume_taken,
            lost=self.stop,
        )
        self._stopping = asyncio.Event()

    def _jid_for_prompt(self, prompt: str) -> str:
        """XEP-0100: the JID of a SIP address typed by a user (``alice@sip.test`` or a URI)."""
        text = prompt.strip()
        return self.book.jid_for_sip_uri(text if text.startswith("sip:") else f"sip:{text}")

    # --- XMPP callbacks (synchronous; slow work becomes an owned task) --------------------------

    def _on_xmpp_message(self, msg: ChatMessage) -> None:
        if self.transports.takes_message(msg):
            return  # a transport's status chatter, summed up in one notice (DESIGN 3.3)
        work = self.router.take_xmpp_message(msg)
        if work is not None:
            self._own(work)

    def _on_xmpp_error(self, err: StanzaError) -> None:
        pending = self.router.on_xmpp_error(err)
        if pending is not None:
            self._own(pending)
        elif self.forwarding is not None and err.kind == "message" and err.id is not None:
            self.forwarding.on_stray_error(err)  # maybe another instance's message (DESIGN 9)

    def _on_forwarded_error(self, err: StanzaError) -> None:
        """An error another instance received for a chat message: this one's, if it sent it
        (only the SIP sender's notice: the IMDN ``failed`` was the receiver's to send)."""
        pending = self.router.on_xmpp_error(err, notify=False)
        if pending is not None:
            self._own(pending)

    def _on_xmpp_presence(self, presence: Presence) -> None:
        if bare_jid(presence.recipient) == self.book.component:
            self.transports.on_gateway_presence(presence)  # the gateway's own domain (DESIGN 9)
            return
        if self.forwarding is None:
            self.presence_driver.on_presence(presence)
        else:
            self.forwarding.on_presence(presence)

    def _on_stray_answer(self, xml: str) -> None:
        if self.forwarding is not None:  # maybe another instance's (DESIGN 9)
            self.forwarding.on_stray_answer(xml)

    def _on_unconfirmed(self, messages: list[ChatMessage]) -> None:
        # DESIGN 8: written but never confirmed by a server that went away: to the queue.
        self._own(self.router.requeue_unconfirmed(messages))

    def _on_link(self, up: bool) -> None:
        self.health.report(Part.XMPP, up, "component stream " + ("up" if up else "down"))
        self.metrics.link(up, time.time())
        self.presence_driver.on_link(up)
        self.rooms.on_link(up)
        self.transports.on_link(up)
        if up:
            self._own(self.router.retry_due())

    async def _resume_taken(self, moved: Takeover, lost: list[str]) -> None:
        """Resume what was taken over from dead instances (DESIGN 9): its room seats (rejoined,
        and handed the room stanzas forwarded to it that it did not acknowledge), SIP
        subscriptions (subscribed afresh from here), publications, and its queue."""
        if moved.memberships:
            await self.rooms.restore()
        if self.forwarding is not None:
            # At once after the restore (no await between): until it, the seats' stanzas went
            # to the dead instance, kept until acknowledged; from now on they are held here.
            for dead in lost:
                self.forwarding.replay(dead)
            await self.forwarding.reread()  # its seats and watchers are this instance's now
        if moved.sip_watchers or moved.xmpp_watchers or moved.publications:
            await self.presence_driver.resume()
        if moved.messages:
            await self.router.retry_due()

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until ``stop()``; then drain and close. ``SharedSqlite`` when another instance
        is running on the same SQLite database."""
        await self.instances.join(sqlite=self.store.is_sqlite)
        await self.router.resume()  # before any request: what an earlier run left goes first
        await self.endpoint.start(self.sipgate.handle)
        self.health.report(Part.SIP, True, "listening")
        if self.status is not None:
            await self.status.start()
        await self.presence_driver.start()
        await self.rooms.start()
        await self.transports.start()
        link = asyncio.create_task(self.xmpp.run(self.forwarding or self.rooms, self.commands))
        forwarding = asyncio.create_task(
            self.forwarding.run() if self.forwarding is not None else asyncio.sleep(0)
        )
        lag = asyncio.create_task(self.loop_lag.run())
        sweeper = asyncio.create_task(
            sweep_queue(
                self.router,
                self.store,
                interval=self.settings.timers.sleep_time,
                clock=time.time,
            )
        )
        database = asyncio.create_task(watch_database(self.store))
        heartbeat = asyncio.create_task(self.instances.run())
        typing = asyncio.create_task(sweep_chat_states(self.notifications))
        identities = asyncio.create_task(
            sweep_message_identities(self.notifications, interval=self.settings.timers.check_time)
        )
        log.info(
            "gateway_started",
            component=self.settings.xmpp.component,
            sip=[str(p) for p in self.endpoint.local_peers.values()],
        )
        try:
            await self._stopping.wait()
        finally:
            log.info("gateway_stopping")
            # DESIGN 8 SIGTERM: stop accepting (503, resource-constraint), drain what is in
            # flight, persist the rest; all of it within STOP_BUDGET.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + STOP_BUDGET

            def left(most: float) -> float:
                return max(min(most, deadline - loop.time()), 0.1)

            self.sipgate.accepting = False
            self.router.stop_accepting()
            # Presence first, while the endpoint, the link and the store are all still up: it
            # takes no new work and lets its transactions finish. Stopped after the endpoint
            # closed, it would read "endpoint closed" as a peer's timeout and end subscriptions.
            await self.presence_driver.stop(timeout=left(2.0))
            await self.rooms.stop(timeout=left(2.0))
            await self.transports.stop(timeout=left(1.0))
            await self.sipgate.drain(timeout=left(3.0))
            await self.router.drain(timeout=left(3.0))
            await self.notifications.drain(timeout=left(1.0))  # identities still to write
            await self._tasks.wait(timeout=left(1.0))
            await self.commands.drain(timeout=left(1.0))
            sweeper.cancel()
            heartbeat.cancel()
            forwarding.cancel()
            database.cancel()
            typing.cancel()
            identities.cancel()
            lag.cancel()
            await self.xmpp.stop()
            await self._tasks.wait(timeout=5.0)  # what the closing link left unconfirmed
            link.cancel()
            await asyncio.gather(
                link,
                sweeper,
                heartbeat,
                forwarding,
                database,
                typing,
                identities,
                lag,
                return_exceptions=True,
            )
            await self.endpoint.close()
            self.health.report(Part.SIP, False, "closed")
            if self.status is not None:
                await self.status.close()
            await self.store.release_claims(self.router.instance, time.time())
            await self.instances.leave()  # a survivor takes over now, not 2 x check_time later
            log.info("gateway_stopped")

    def stop(self) -> None:
        """Ask ``run`` to finish (signal handlers call this)."""
        self._stopping.set()


def _rooms_config(settings: Settings) -> RoomsConfig:
    """The room core's settings: ``[muc]`` and the timers (DESIGN 6, 10)."""
    muc, timers = settings.muc, settings.timers
    return RoomsConfig(
        nick_prefix=muc.nick_prefix,
        auto_join=muc.auto_join,
        history=muc.history,
        cache_time=timers.cache_time,
        pending_limit=timers.delay_time,
    )


async def serve(settings: Settings) -> int:
    """Open the store (refusing a schema not at head), run the gateway until a signal."""
    health = Health()
    try:
        store = await Store.open(
            settings.database.url, health=health, instance=settings.gateway.name
        )
    except StoreNotAtHead as exc:
        log.error("database_not_at_head", error=str(exc))
        return 2
    gateway = Gateway(settings, store, health)
    # Start-up objects (modules, settings, caches) live for the whole run: keep them out of the
    # collector's scans, and collect the young generation less often on the per-message path.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.stop)
    try:
        await gateway.run()
    except SharedSqlite as exc:
        log.error("database_shared", error=str(exc))
        print(f"sipxmpp: {exc}", file=sys.stderr)
        return 2
    finally:
        await store.close()
    return 0


def main(settings: Settings) -> int:
    """``sipxmpp run``: the process entry point."""
    coro: Coroutine[Any, Any, int] = serve(settings)
    return asyncio.run(coro)
