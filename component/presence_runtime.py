"""The asyncio driver of the presence core: one timer, owned tasks, serialised calls.

``PresenceRuntime`` is the core's ``SipPort``: it runs each request the core sends as a client
transaction of the endpoint in a task it owns, and hands the outcome back. Every call into the
core goes through one lock, so the core's awaits on the store never interleave (asyncio locks
are FIFO: presence stanzas are handled in arrival order). One timer task sleeps until the
core's next deadline or until a call may have moved it; a second task runs the sleep_time
sweep of registrations. ``start`` resumes subscriptions from the store (DESIGN 8).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from component.events import Presence, SipAnswer, SipText
from component.logs import get_logger
from component.presence import PresenceCore
from component.presence_ports import IncomingLike, ReplyTo
from sipside.errors import TransactionTimeout, TransportError
from sipside.message import SipRequest, SipResponse
from sipside.peer import Peer

log = get_logger("component.presence_runtime")

__all__ = ["PRESENCE_METHODS", "PresenceRuntime", "RequestSender"]

PRESENCE_METHODS = ("SUBSCRIBE", "NOTIFY", "PUBLISH", "REGISTER")
_MAX_SLEEP = 60.0  # re-check at least this often, so a missed wake-up costs little


class RequestSender(Protocol):
    """What the runtime needs of ``sipside.endpoint.Endpoint``."""

    async def request(self, request: SipRequest, peer: Peer | None = None) -> SipResponse:
        """Send ``request`` and return its final response."""
        ...

    def contact_for(self, transport: str = "udp", user: str | None = None) -> str:
        """A Contact URI that reaches us over ``transport``."""
        ...


class PresenceRuntime:
    """Drives a ``PresenceCore``: SIP transactions, the timer, the sweep, XMPP callbacks."""

    def __init__(
        self,
        endpoint: RequestSender,
        *,
        clock: Callable[[], float],
        sweep_interval: float = 20.0,
    ) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.sweep_interval = sweep_interval
        self.core: PresenceCore | None = None
        self.on_user_online: Callable[[str], Awaitable[None]] | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []

    def attach(self, core: PresenceCore) -> None:
        """Use ``core`` (built with this runtime as its ``sip`` port)."""
        self.core = core
        core.on_user_online = self._user_online

    def _core(self) -> PresenceCore:
        if self.core is None:
            raise RuntimeError("PresenceRuntime.attach(core) first")
        return self.core

    # --- the core's SipPort ---------------------------------------------------------------

    def send_request(self, request: SipRequest, peer: Peer | None, reply: ReplyTo) -> None:
        """Run a client transaction in an owned task; its outcome goes back to the core."""
        self._own(self._transaction(request, peer, reply))

    def contact_for(self, transport: str) -> str:
        """Our Contact for ``transport`` (the endpoint's bound address)."""
        return self.endpoint.contact_for(transport)

    async def _transaction(self, request: SipRequest, peer: Peer | None, reply: ReplyTo) -> None:
        try:
            response = await self.endpoint.request(request, peer)
        except (TransactionTimeout, TransportError) as exc:
            log.info("presence_request_failed", call_id=request.call_id, error=str(exc))
            await self._call(lambda core, now: core.on_sip_timeout(reply, request.cseq[0], now))
            return
        await self._call(lambda core, now: core.on_sip_response(reply, response, now))

    # --- entry points for the adapters ----------------------------------------------------

    def sip_handlers(self) -> dict[str, Callable[[Any], Awaitable[SipAnswer]]]:
        """Handlers for ``SipGate.others``: each answers the request itself."""
        return {method: self.handle_request for method in PRESENCE_METHODS}

    async def handle_request(self, incoming: IncomingLike) -> SipAnswer:
        """Answer a SUBSCRIBE/NOTIFY/PUBLISH/REGISTER (the core sends the response)."""
        await self._call(lambda core, now: core.on_sip_request(incoming, now))
        # Only reached unanswered if the core had nothing to say: a fallback, never normal.
        return SipAnswer(500, "Internal Server Error")

    async def command(self, msg: SipText) -> str | None:
        """``MessageRouter.commands``: online/offline/away/dnd/help (DESIGN 5.4)."""
        result: list[str | None] = []

        async def run(core: PresenceCore, now: float) -> None:
            result.append(await core.command(msg, now))

        await self._call(run)
        return result[0] if result else None

    def on_presence(self, presence: Presence) -> None:
        """The XMPP adapter's presence callback (synchronous: the work is an owned task)."""
        self._own(self._call(lambda core, now: core.on_presence(presence, now)))

    def on_link(self, up: bool) -> None:
        """The XMPP adapter's link callback: on up, re-announce presence (DESIGN 8)."""
        if up:
            self._own(self._call(lambda core, now: core.on_link_up(now)))

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume from the store, then start the timer and the sweep."""
        await self._call(lambda core, now: core.resume(now))
        self._loops = [
            asyncio.create_task(self._timer_loop(), name="presence-timer"),
            asyncio.create_task(self._sweep_loop(), name="presence-sweep"),
        ]

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the loops and wait (bounded) for transactions in flight."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def settle(self) -> None:
        """Wait until no owned task is left (transactions, callbacks and what they started)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _timer_loop(self) -> None:
        while True:
            deadline = self._core().next_deadline()
            delay = _MAX_SLEEP if deadline is None else deadline - self.clock()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(delay, _MAX_SLEEP))
                continue
            try:
                await self._call(lambda core, now: core.handle_timer(now))
            except Exception:
                log.exception("presence_timer_failed")
                await asyncio.sleep(1.0)  # do not spin on a persistent fault

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self._call(lambda core, now: core.sweep(now))
            except Exception:
                log.exception("presence_sweep_failed")

    # --- plumbing -------------------------------------------------------------------------

    async def _call(self, work: Callable[[PresenceCore, float], Coroutine[Any, Any, Any]]) -> None:
        core = self._core()
        async with self._lock:
            await work(core, self.clock())
        # Any call may have created or moved a deadline.
        self._wake.set()

    def _user_online(self, aor: str) -> None:
        if self.on_user_online is not None:
            self._own(self.on_user_online(aor))

    def _own(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("presence_task_failed", error=repr(task.exception()))
