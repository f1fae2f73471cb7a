"""The asyncio driver of the presence core: one timer, owned tasks, serialised calls.

``PresenceRuntime`` is the core's ``SipPort``: it runs each request the core sends as a client
transaction of the endpoint in a task it owns, and hands the outcome back. Every call into the
core goes through one lock, so the core's awaits on the store never interleave. One timer task
sleeps until the core's next deadline or until a call may have moved it; a second task runs the
sleep_time sweep of registrations. ``start`` resumes subscriptions from the store (DESIGN 8).

Overload (DESIGN 8): XMPP presence stanzas wait in one bounded FIFO served by one worker, which
holds at most one place in the lock's queue, so SIP answers and timers never wait behind a flood
of stanzas; the worker also pauses while too many of our transactions are in flight. A new
SUBSCRIBE or PUBLISH that would wait behind too many calls gets 503 with Retry-After.

Shutdown (DESIGN 8 SIGTERM): ``stop`` takes no new work, lets calls and transactions in flight
finish up to its timeout, and a transaction cut short by our own shutdown is "not sent", never a
peer's timeout: nothing is deleted from the store because we stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from component.logs import get_logger
from component.presence.core import PresenceCore, ResumeState
from component.presence.shared import IncomingLike, ReplyTo
from component.runtime.tasks import TaskOwner
from component.values import Presence, SipAnswer, SipText
from sipside.errors import TransactionTimeout, TransportError
from sipside.message import SipRequest, SipResponse
from sipside.peer import Peer

log = get_logger("component.runtime.presence_driver")

__all__ = ["PRESENCE_METHODS", "PresenceRuntime", "RequestSender"]

PRESENCE_METHODS = ("SUBSCRIBE", "NOTIFY", "PUBLISH", "REGISTER")
_MAX_SLEEP = 60.0  # re-check at least this often, so a missed wake-up costs little
_RETRY_AFTER = "5"  # seconds a refused SUBSCRIBE/PUBLISH is asked to wait (RFC 3261 20.33)
_DROP_LOG_EVERY = 1000  # a flood of dropped stanzas logs one line per this many
_LINK_UP_BATCH = 50  # SIP users re-announced per call into the core after the link came up


def _presence_work(
    presence: Presence,
) -> Callable[[PresenceCore, float], Coroutine[Any, Any, None]]:
    return lambda core, now: core.on_presence(presence, now)


def _creates_work(request: SipRequest) -> bool:
    """A request that starts something new: an initial SUBSCRIBE, or a PUBLISH."""
    return request.method == "PUBLISH" or (request.method == "SUBSCRIBE" and not request.to_tag)


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
        max_waiting: int = 500,
        max_queued_presence: int = 50_000,
        max_in_flight: int = 128,
    ) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.sweep_interval = sweep_interval
        self.max_waiting = max_waiting
        self.max_queued_presence = max_queued_presence
        self.max_in_flight = max_in_flight
        self.core: PresenceCore | None = None
        self.on_user_online: Callable[[str], Awaitable[None]] | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks = TaskOwner("presence_task_failed")
        self._own = self._tasks.own
        self._loops: list[asyncio.Task[None]] = []
        self._waiting = 0  # calls into the core queued on or holding the lock
        self._requests = 0  # of which SIP requests being answered
        self._stanzas: deque[Presence] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._dropped = 0
        self._in_flight = 0  # our client transactions awaiting a final response
        self._room = asyncio.Event()  # set whenever a transaction finishes
        self._closing = False  # stop() began: no new work
        self._closed = False  # stop() ended: the core (and the store) are not called again

    @property
    def waiting(self) -> int:
        """Calls into the core waiting for (or holding) the lock."""
        return self._waiting

    @property
    def requests_waiting(self) -> int:
        """SIP requests waiting for (or holding) the lock: what ``max_waiting`` bounds."""
        return self._requests

    @property
    def queued_presence(self) -> int:
        """XMPP presence stanzas waiting for the worker."""
        return len(self._stanzas)

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
        self._in_flight += 1
        try:
            response = await self.endpoint.request(request, peer)
        except TransportError as exc:
            if self._closing:
                # Our own shutdown closed the endpoint: the request was not sent, the peer did
                # not fail. The stored subscription stays; the restarted gateway goes on.
                log.info("presence_request_unsent", call_id=request.call_id, error=str(exc))
                return
            log.info("presence_request_failed", call_id=request.call_id, error=str(exc))
            await self._call(lambda core, now: core.on_sip_timeout(reply, request.cseq[0], now))
            return
        except TransactionTimeout as exc:
            log.info("presence_request_failed", call_id=request.call_id, error=str(exc))
            await self._call(lambda core, now: core.on_sip_timeout(reply, request.cseq[0], now))
            return
        finally:
            self._in_flight -= 1
            self._room.set()
        await self._call(lambda core, now: core.on_sip_response(reply, response, now))

    # --- entry points for the adapters ----------------------------------------------------

    def sip_handlers(self) -> dict[str, Callable[[Any], Awaitable[SipAnswer]]]:
        """Handlers for ``SipGate.others``: each answers the request itself."""
        return {method: self.handle_request for method in PRESENCE_METHODS}

    async def handle_request(self, incoming: IncomingLike) -> SipAnswer:
        """Answer a SUBSCRIBE/NOTIFY/PUBLISH/REGISTER (the core sends the response).

        Beyond ``max_waiting`` requests waiting for the core, or once stopping, a new SUBSCRIBE
        or PUBLISH gets 503 with Retry-After (DESIGN 8); requests about existing state are still
        served (the SIP adapter bounds those).
        """
        request = incoming.request
        if self._closed or (
            _creates_work(request) and (self._closing or self._requests >= self.max_waiting)
        ):
            log.info(
                "presence_request_refused",
                method=request.method,
                call_id=request.call_id,
                waiting=self._requests,
            )
            return SipAnswer(503, "Service Unavailable", (("Retry-After", _RETRY_AFTER),))
        self._requests += 1
        try:
            await self._call(lambda core, now: core.on_sip_request(incoming, now))
        finally:
            self._requests -= 1
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
        """The XMPP adapter's presence callback: queue the stanza for the presence worker.

        The queue is bounded (DESIGN 8): beyond ``max_queued_presence`` or once stopping, the
        stanza is dropped with a log line (availability is re-sent on the next change or probe).
        """
        if self._closing or len(self._stanzas) >= self.max_queued_presence:
            if self._dropped % _DROP_LOG_EVERY == 0:
                log.warning(
                    "presence_dropped",
                    jid=presence.sender,
                    type=presence.type,
                    queued=len(self._stanzas),
                    dropped=self._dropped + 1,
                    stopping=self._closing,
                )
            self._dropped += 1
            return
        self._stanzas.append(presence)
        if self._worker is None or self._worker.done():
            self._worker = self._own(self._presence_worker())

    async def _presence_worker(self) -> None:
        # One stanza at a time, in arrival order; ends when the queue is empty.
        while self._stanzas and not self._closing:
            await self._wait_for_room()
            if self._closing:
                break
            presence = self._stanzas.popleft()
            try:
                await self._call(_presence_work(presence))
            except Exception:
                log.exception("presence_stanza_failed", jid=presence.sender, type=presence.type)

    async def _wait_for_room(self) -> None:
        """Pause new work while ``max_in_flight`` of our transactions await answers."""
        while self._in_flight >= self.max_in_flight and not self._closing:
            self._room.clear()
            await self._room.wait()

    def on_link(self, up: bool) -> None:
        """The XMPP adapter's link callback: on up, re-announce presence (DESIGN 8)."""
        if up:
            self._own(self._link_up())

    async def _link_up(self) -> None:
        # In batches: thousands of SIP users to re-announce must not hold the lock for seconds
        # while refreshes fall due and NOTIFYs wait to be answered.
        more = [True]

        async def step(core: PresenceCore, now: float) -> None:
            more[0] = await core.link_up_step(now, _LINK_UP_BATCH)

        await self._call(lambda core, now: core.link_up_begin(now))
        while more[0] and not self._closing:
            await self._call(step)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume from the store, then start the timer and the sweep."""
        found: list[ResumeState] = []

        async def stored(core: PresenceCore, now: float) -> None:
            found.append(await core.resume_stored())

        # Two calls: the subscribers' refresh times are spread from after the slow part.
        await self._call(stored)
        await self._call(lambda core, now: core.resume_subscribers(found[0], now))
        self._loops = [
            asyncio.create_task(self._timer_loop(), name="presence-timer"),
            asyncio.create_task(self._sweep_loop(), name="presence-sweep"),
        ]

    async def stop(self, timeout: float = 5.0) -> None:
        """Take no new work, let work in flight finish (up to ``timeout``), then stop calling
        the core. What is cut short is not sent; nothing is deleted for it (DESIGN 8)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._closing = True
        self._room.set()  # a worker waiting for room sees _closing and ends
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        if self._stanzas:
            log.info("presence_stanzas_unhandled", count=len(self._stanzas))
            self._stanzas.clear()
        # Transactions started meanwhile (a NOTIFY owed after a 2xx) are waited for too.
        await self._tasks.wait(max(0.0, deadline - loop.time()))
        pending = self._tasks.pending()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.info("presence_work_cut_short", tasks=len(pending))
        # Calls already queued on the lock (SIP requests being answered) finish first.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - loop.time()) + 1.0):
                await self._lock.acquire()
                self._lock.release()
        self._closed = True

    async def settle(self) -> None:
        """Wait until no owned task is left (transactions, callbacks and what they started)."""
        await self._tasks.wait()

    async def _timer_loop(self) -> None:
        while not self._closing:
            deadline = self._core().next_deadline()
            delay = _MAX_SLEEP if deadline is None else deadline - self.clock()
            if delay > 0:
                self._wake.clear()
                # Not asyncio.wait_for: on 3.11 it swallows a cancel that races with the wake-up
                # (the loop then never ends and stop() hangs); asyncio.timeout does not.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(delay, _MAX_SLEEP)):
                        await self._wake.wait()
                continue
            await self._wait_for_room()
            try:
                # A batch per call: the lock goes round between batches (see handle_timer).
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
        self._waiting += 1
        try:
            async with self._lock:
                if self._closed:
                    # After stop: the store may be closed; an outcome now changes nothing.
                    log.debug("presence_call_after_stop")
                    return
                await work(core, self.clock())
        finally:
            self._waiting -= 1
        # Any call may have created or moved a deadline.
        self._wake.set()

    def _user_online(self, aor: str) -> None:
        if self.on_user_online is not None:
            self._own(self.on_user_online(aor))
