"""The composition root: builds the adapters and the features from settings, runs, drains on
SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from component import __version__
from component.addresses import AddressBook
from component.logs import get_logger
from component.messaging.router import MessageRouter
from component.presence.core import PresenceCore
from component.runtime.presence_driver import PresenceRuntime
from component.runtime.signal import UserOnlineSignal
from component.runtime.sweeps import sweep_queue
from component.runtime.tasks import TaskOwner
from component.settings import Settings
from component.sip.answers import send_answer
from component.sip.gate import SipGate
from component.sip.sender import SipSender
from component.store import StoreNotAtHead
from component.store.store import Store
from component.values import ChatMessage, Presence, StanzaError
from component.xmpp.link import XmppLink
from sipside.endpoint import Endpoint, IncomingRequest
from sipside.timers import TimerConfig

log = get_logger("component.app")


class Gateway:
    """One running gateway: SIP endpoint, XMPP link, store and the features between them.

    Built in dependency order, each piece with its collaborators: the SIP endpoint and what
    sends through it, the XMPP link, presence, messaging, and last the SIP gate that routes
    requests to both; :meth:`run` starts the endpoint with the gate as its request handler.
    """

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
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
        sip_out = SipSender(self.endpoint)
        xmpp = settings.xmpp
        self.xmpp = XmppLink(
            component=xmpp.component,
            host=xmpp.host,
            port=xmpp.port,
            secret=xmpp.secret.get_secret_value(),
            on_message=self._on_xmpp_message,
            on_error=self._on_xmpp_error,
            on_presence=self._on_xmpp_presence,
            on_link=self._on_link,
            version=__version__,
            gateway_jid_for=self._jid_for_prompt,
        )
        # DESIGN 5.4: presence tells whoever listens that a SIP user came online.
        user_online = UserOnlineSignal()
        # DESIGN 5: presence both ways, driven by one runtime (timers, persistence, ordering).
        self.presence_runtime = PresenceRuntime(
            self.endpoint, clock=time.time, sweep_interval=settings.timers.sleep_time
        )
        self.presence = PresenceCore(
            self.book,
            sip=self.presence_runtime,
            xmpp=self.xmpp,
            store=store,
            sip_server=settings.presence.sip_server,
            priority=settings.xmpp.priority,
        )
        self.presence_runtime.attach(self.presence)
        self.presence_runtime.on_user_online = _as_task_work(user_online.user_online)
        limits = settings.limits
        self.router = MessageRouter(
            self.book,
            self.xmpp,
            sip_out,
            store,
            self.presence_runtime,  # registrar commands (DESIGN 5.4)
            clock=time.time,
            delay_time=settings.timers.delay_time,
            max_inflight=limits.workers * limits.max_jobs,
        )
        user_online.connect(self.router.user_online)
        self.sipgate = SipGate(self.router, _PresenceRequests(self.presence_runtime))
        self._tasks = TaskOwner("gateway_task_failed")
        self._own = self._tasks.own
        self._stopping = asyncio.Event()

    def _jid_for_prompt(self, prompt: str) -> str:
        """XEP-0100: the JID of a SIP address typed by a user (``alice@sip.test`` or a URI)."""
        text = prompt.strip()
        return self.book.jid_for_sip_uri(text if text.startswith("sip:") else f"sip:{text}")

    # --- XMPP callbacks (synchronous; slow work becomes an owned task) --------------------------

    def _on_xmpp_message(self, msg: ChatMessage) -> None:
        self._own(self.router.on_xmpp_message(msg))

    def _on_xmpp_error(self, err: StanzaError) -> None:
        pending = self.router.on_xmpp_error(err)
        if pending is not None:
            self._own(pending)

    def _on_xmpp_presence(self, presence: Presence) -> None:
        self.presence_runtime.on_presence(presence)

    def _on_link(self, up: bool) -> None:
        self.presence_runtime.on_link(up)
        if up:
            self._own(self.router.retry_due())

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until ``stop()``; then drain and close."""
        await self.endpoint.start(self.sipgate.handle)
        await self.presence_runtime.start()
        link = asyncio.create_task(self.xmpp.run())
        sweeper = asyncio.create_task(
            sweep_queue(
                self.router,
                self.store,
                interval=self.settings.timers.sleep_time,
                clock=time.time,
            )
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
            # DESIGN 8 SIGTERM: stop accepting (503), drain what is in flight, persist the rest.
            self.sipgate.accepting = False
            # Presence first, while the endpoint, the link and the store are all still up: it
            # takes no new work and lets its transactions finish. Stopped after the endpoint
            # closed, it would read "endpoint closed" as a peer's timeout and end subscriptions.
            await self.presence_runtime.stop(timeout=5.0)
            await self.sipgate.drain(timeout=10.0)
            await self.router.drain(timeout=10.0)
            await self._tasks.wait(timeout=10.0)
            sweeper.cancel()
            await self.xmpp.stop()
            link.cancel()
            await asyncio.gather(link, sweeper, return_exceptions=True)
            await self.endpoint.close()
            await self.store.release_claims(self.router.instance, time.time())
            log.info("gateway_stopped")

    def stop(self) -> None:
        """Ask ``run`` to finish (signal handlers call this)."""
        self._stopping.set()


class _PresenceRequests:
    """The SIP gate's presence handler over ``PresenceRuntime``, whose ``handle_request`` hands
    back the answer it did not send itself (503 while stopping, a 500 fallback)."""

    def __init__(self, runtime: PresenceRuntime) -> None:
        self.runtime = runtime

    async def handle_request(self, incoming: IncomingRequest) -> None:
        """Let presence answer ``incoming``; send the answer it handed back if it did not."""
        answer = await self.runtime.handle_request(incoming)
        if not incoming.answered:
            send_answer(incoming, answer)


def _as_task_work(listener: Callable[[str], None]) -> Callable[[str], Awaitable[None]]:
    """``listener`` in the shape ``PresenceRuntime.on_user_online`` takes (it owns the call)."""

    async def call(aor: str) -> None:
        listener(aor)

    return call


async def serve(settings: Settings) -> int:
    """Open the store (refusing a schema not at head), run the gateway until a signal."""
    try:
        store = await Store.open(settings.database.url)
    except StoreNotAtHead as exc:
        log.error("database_not_at_head", error=str(exc))
        return 2
    gateway = Gateway(settings, store)
    # Start-up objects (modules, settings, caches) live for the whole run: keep them out of the
    # collector's scans, and collect the young generation less often on the per-message path.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.stop)
    try:
        await gateway.run()
    finally:
        await store.close()
    return 0


def main(settings: Settings) -> int:
    """``sipxmpp run``: the process entry point."""
    coro: Coroutine[Any, Any, int] = serve(settings)
    return asyncio.run(coro)
