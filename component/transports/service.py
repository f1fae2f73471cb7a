"""Drives the transports' cores (DESIGN 3.3, 9) with the clock and the ports.

``Transports`` probes each alias transport every ``check_time`` seconds (disco#info on its
domain) and the SIP proxy with OPTIONS; stores transport states; tells the chat rooms when a
transport goes down or comes back; refuses MESSAGEs to a transport known down at once
(:class:`TransportGuard`, in front of messaging); folds a transport's status chatter into one
notice; and answers presence addressed to the gateway's own domain with the SIP side's health.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

from component.addresses import AddressBook, AddressError, bare_jid, sip_user_and_host
from component.logs import get_logger
from component.ports import Clock, XmppPort
from component.runtime.tasks import TaskOwner
from component.store import (
    ApprovalDirection,
    ApprovalState,
    RosterApproval,
    StorePort,
    StoreUnavailable,
)
from component.transports.board import CameUp, Effect, SaveStatus, TransportBoard, WentDown
from component.transports.chatter import ChatterBuffer
from component.transports.health import SipHealth
from component.values import ChatMessage, Presence, ServiceInfo, ServiceKind, SipAnswer, SipText

log = get_logger("component.transports")


class ServiceProbe(Protocol):
    """Service discovery on a domain (the XMPP link)."""

    async def discover_service(self, domain: str, timeout: float = 10.0) -> ServiceInfo:
        """disco#info of ``domain``; UNREACHABLE with the condition when it does not answer."""
        ...


class ProxyProbe(Protocol):
    """OPTIONS to a SIP URI (the SIP sender)."""

    async def options(self, uri: str, from_uri: str) -> int:
        """The final status; 408 when nothing answered, 503 when it could not be sent."""
        ...


class Notices(Protocol):
    """Notices to SIP users from ``sip.registrar`` (messaging)."""

    async def notice(self, aor: str, text: str) -> None:
        """Send ``text`` to ``aor``."""
        ...


class TransportRooms(Protocol):
    """The chat rooms, told when a transport hosting some of them goes down or comes back."""

    def transport_changed(self, domain: str, up: bool) -> None:
        """Members are told once; back up, the rooms are rejoined."""
        ...


class Messages(Protocol):
    """The message core the SIP gate hands MESSAGEs to (``MessageRouter``)."""

    def answer_now(self, msg: SipText) -> SipAnswer | None:
        """The answer when it needs no waiting, None when it does; may raise Refusal."""
        ...

    async def answer_later(self, msg: SipText) -> SipAnswer:
        """The answer after what must be awaited; may raise Refusal."""
        ...


class Transports:
    """The alias transports and the gateway domain's presence, with their background checks."""

    def __init__(
        self,
        board: TransportBoard,
        health: SipHealth,
        *,
        book: AddressBook,
        xmpp: XmppPort,
        probe: ServiceProbe,
        proxy: ProxyProbe,
        notices: Notices,
        store: StorePort,
        clock: Clock,
        rooms: TransportRooms | None = None,
        chatter_quiet: float = 3.0,
        chatter_window: float = 10.0,
    ) -> None:
        self.board = board
        self.health = health
        self.book = book
        self.xmpp = xmpp
        self.probe = probe
        self.proxy = proxy
        self.notices = notices
        self.store = store
        self.clock = clock
        self.rooms = rooms
        self.chatter = ChatterBuffer(quiet=chatter_quiet, window=chatter_window)
        self._alias_delimiters = dict(book.aliases)
        self._tasks = TaskOwner("transport_task_failed")
        self._loops: list[asyncio.Task[None]] = []
        self._chatter_news = asyncio.Event()

    # --- the checks (DESIGN 9, check_time) ---------------------------------------------------

    async def check_once(self) -> None:
        """Probe every transport and the SIP proxy once, and act on what changed."""
        await asyncio.gather(self.check_transports(), self.check_proxy())

    async def check_transports(self) -> None:
        """disco#info to every transport domain; a transport that does not answer is down.

        Not while the XMPP link is down: then nothing answers, and that says nothing of them.
        """
        if not self.xmpp.connected:
            return
        timeout = max(self.board.check_time * 0.8, 0.5)
        infos = await asyncio.gather(
            *(self.probe.discover_service(d, timeout) for d in self.board.domains)
        )
        now = self.clock()
        for info in infos:
            error = None
            if info.kind is ServiceKind.UNREACHABLE:
                error = info.detail or "no answer"
            await self._carry_out(self.board.probed(info.domain, error, now))

    async def check_proxy(self) -> None:
        """OPTIONS to ``sip.proxy``; subscribers of the gateway's domain see a change."""
        if not self.health.proxy:
            return
        status = await self.proxy.options(self.health.proxy, self.book.registrar)
        if self.health.answered(status, self.clock()) is not None:
            log.info("sip_health_changed", healthy=self.health.healthy, status=status)
            await self._broadcast()

    async def _carry_out(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case SaveStatus(status):
                    try:
                        await self.store.save_transport_status(status)
                    except StoreUnavailable as exc:
                        log.warning("transport_status_not_stored", error=str(exc))
                case WentDown(domain, error):
                    log.warning("transport_down", domain=domain, error=error)
                    if self.rooms is not None:
                        self.rooms.transport_changed(domain, False)
                case CameUp(domain):
                    log.info("transport_up", domain=domain)
                    if self.rooms is not None:
                        self.rooms.transport_changed(domain, True)

    async def _every_check_time(self, check: Callable[[], Awaitable[None]]) -> None:
        # Transports and the proxy each on their own loop: an OPTIONS waiting out its timeout
        # (Timer F, 32 s by default) must not delay the transports' probes.
        while True:
            try:
                await check()
            except Exception:
                log.exception("transport_check_failed")
            await asyncio.sleep(self.board.check_time)

    # --- MESSAGEs to a transport that is down ------------------------------------------------

    def refuse_if_down(self, msg: SipText) -> None:
        """Raise 480 + Retry-After for a MESSAGE to a transport known down, with a notice."""
        try:
            _user, host = sip_user_and_host(msg.to_uri)
        except AddressError:
            return  # messaging refuses it with the right words
        refusal = self.board.refusal_for(host)
        if refusal is None:
            return
        log.info("message_refused", call_id=msg.call_id, sip_uri=msg.from_uri, reason="down")
        self._tasks.own(self.notices.notice(msg.from_uri, refusal.text))
        raise refusal

    # --- status chatter ----------------------------------------------------------------------

    def takes_message(self, msg: ChatMessage) -> bool:
        """True when ``msg`` is a transport's own status message, held to be summed up."""
        if msg.body is None or msg.type in ("error", "groupchat"):
            return False
        local, _, domain = bare_jid(msg.sender).rpartition("@")
        delimiter = self._alias_delimiters.get(domain)
        if delimiter is None or delimiter in local:
            return False  # not a transport, or a person or channel on it
        try:
            aor = self.book.sip_uri_for_component_jid(bare_jid(msg.recipient))
        except AddressError:
            return False
        self.chatter.add(aor, bare_jid(msg.sender), msg.body, self.clock())
        self._chatter_news.set()
        return True

    async def _chatter_loop(self) -> None:
        while True:
            deadline = self.chatter.deadline
            self._chatter_news.clear()
            if deadline is None or deadline > self.clock():
                delay = None if deadline is None else deadline - self.clock()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._chatter_news.wait(), delay)
                continue
            for notice in self.chatter.due(self.clock()):
                self._tasks.own(self.notices.notice(notice.aor, notice.text))

    # --- the gateway domain's presence -------------------------------------------------------

    def on_gateway_presence(self, presence: Presence) -> None:
        """A presence addressed to the gateway's own domain (subscribe, probe...)."""
        self._tasks.own(self._gateway_presence(presence))

    async def _gateway_presence(self, presence: Presence) -> None:
        watcher = bare_jid(presence.sender)
        me = self.book.component
        direction = ApprovalDirection.XMPP_WATCHES_SIP
        match presence.type:
            case "subscribe":
                approval = RosterApproval(
                    me, watcher, direction, ApprovalState.APPROVED, self.clock()
                )
                await self.store.save_approval(approval)
                self.xmpp.send_presence(Presence(me, watcher, "subscribed"))
                self._show_to(watcher)
            case "unsubscribe":
                await self.store.delete_approval(me, watcher, direction)
                self.xmpp.send_presence(Presence(me, watcher, "unsubscribed"))
            case "probe":
                if await self.store.approval(me, watcher, direction) is not None:
                    self._show_to(watcher)
            case _:
                pass

    def _show_to(self, watcher: str) -> None:
        shown = self.health.shown
        self.xmpp.send_presence(
            Presence(self.book.component, watcher, show=shown.show, status=shown.status)
        )

    async def _broadcast(self) -> None:
        try:
            approvals = await self.store.approvals(sip_jid=self.book.component)
        except StoreUnavailable as exc:
            log.warning("gateway_presence_not_sent", error=str(exc))
            return
        for approval in approvals:
            if approval.state is ApprovalState.APPROVED:
                self._show_to(approval.xmpp_jid)

    def on_link(self, up: bool) -> None:
        """The XMPP link came up: subscribers see the gateway's current state again."""
        if up:
            self._tasks.own(self._broadcast())

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Show stored states until the first probe; start the checks."""
        try:
            for status in await self.store.transport_statuses():
                self.board.restore(status)
        except StoreUnavailable as exc:
            log.warning("transport_status_not_restored", error=str(exc))
        self._loops = [
            asyncio.create_task(self._every_check_time(self.check_transports), name="probes"),
            asyncio.create_task(self._every_check_time(self.check_proxy), name="sip-health"),
            asyncio.create_task(self._chatter_loop(), name="transport-chatter"),
        ]

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the checks; status chatter still held goes out as its notices."""
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for notice in self.chatter.flush():
            self._tasks.own(self.notices.notice(notice.aor, notice.text))
        await self._tasks.wait(timeout)


class TransportGuard:
    """The SIP gate's message core: a transport known down is refused before messaging."""

    def __init__(self, messages: Messages, transports: Transports) -> None:
        self.messages = messages
        self.transports = transports

    def answer_now(self, msg: SipText) -> SipAnswer | None:
        """480 at once for a transport that is down; else messaging's answer."""
        self.transports.refuse_if_down(msg)
        return self.messages.answer_now(msg)

    async def answer_later(self, msg: SipText) -> SipAnswer:
        """Messaging's answer (the transport was checked in ``answer_now``)."""
        return await self.messages.answer_later(msg)
