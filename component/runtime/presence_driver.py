"""The serialised driver of presence: one lock, one timer, a sweep, a bounded stanza queue.

``CoreSerial`` runs every call into presence (the core and the SIP side's dialogs) one at a
time with the current time, so their awaits on the store never interleave; it counts our client
transactions awaiting an answer and runs their outcomes, queued in order, a batch per call.
``PresenceDriver`` drives through it: one timer task sleeps until the SIP side's next deadline
or until a call may have moved it, a second task runs the sleep_time sweep of registrations,
and ``start`` resumes subscriptions from the store (DESIGN 8).

Overload (DESIGN 8): XMPP presence stanzas wait in one bounded FIFO served by one worker, which
holds at most one place in the lock's queue, so SIP answers and timers never wait behind a flood
of stanzas; the worker and the timer also pause while too many of our transactions are in
flight. A transaction's answer comes by callback and, when the core is idle, is handled in the
pass it arrived, with no task per request: an answer that makes room is followed by the next
NOTIFY one event-loop pass later.

Shutdown (DESIGN 8 SIGTERM): ``stop`` takes no new work, lets calls and transactions in flight
finish up to its timeout, then stops calling in: nothing is deleted from the store because we
stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from component.errors import busy
from component.logs import get_logger
from component.ports import XmppPort
from component.runtime.tasks import TaskOwner
from component.sip.side import ResumeState
from component.sip.transactions import DONE
from component.store import StoreUnavailable
from component.values import Presence, SipText

log = get_logger("component.runtime.presence_driver")

__all__ = ["MAX_IN_FLIGHT", "CoreSerial", "PresenceDriver"]

_MAX_SLEEP = 60.0  # re-check at least this often, so a missed wake-up costs little
_DROP_LOG_EVERY = 1000  # a flood of dropped stanzas logs one line per this many
_STORE_RETRY = 30  # seconds: a stanza refused because the store is down (resource-constraint)
# Stanzas whose handling changes stored state: refused with an error when the store is down.
# Plain availability is not (its sender sends it again on the next change).
_ANSWERED_WHEN_DOWN = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed", "probe"})
_LINK_UP_BATCH = 50  # SIP users re-announced per call into the core after the link came up
# Our presence transactions awaiting answers before new work waits. A fan-out keeps this many
# NOTIFYs in flight, often to one socket (a proxy, or many watchers behind one address). With
# 128, answers overflowed the UDP receive buffers (ours and the watchers') and every lost one
# held its place until a Timer E retransmission 0.5 to 4 s later (bench.presence, 1,000
# watchers: 12 s a change; with 32: 4 to 5 s).
MAX_IN_FLIGHT = 32

Work = Callable[[float], Awaitable[Any]]


class Core(Protocol):
    """What the driver calls of the presence core (``component.presence.core.PresenceCore``).

    A protocol, not the class: compiled, an argument annotated with a class must be one, and
    the tests hand the driver cores of their own."""

    async def on_presence(self, presence: Presence, now: float) -> None: ...
    async def command(self, msg: SipText, now: float) -> str | None: ...
    async def sweep(self, now: float) -> None: ...
    async def link_up_begin(self, now: float) -> None: ...
    async def link_up_step(self, now: float, limit: int | None) -> bool: ...


class Dialogs(Protocol):
    """What the driver calls of the SIP side (``component.sip.side.SipSide``)."""

    def next_deadline(self) -> float | None: ...
    async def handle_timer(self, now: float) -> None: ...
    async def resume_stored(self) -> ResumeState: ...
    async def resume_subscribers(self, state: ResumeState, now: float) -> tuple[int, int, int]: ...


class CoreSerial:
    """Runs calls into presence one at a time; counts our transactions and runs their answers."""

    def __init__(self, *, clock: Callable[[], float], max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.clock = clock
        self.max_in_flight = max_in_flight
        self._lock = asyncio.Lock()
        self.wake = asyncio.Event()  # set after a call that may have moved a deadline earlier
        # While the timer sleeps: until when (clock), and what tells the earliest deadline.
        self._sleep: tuple[float, Callable[[], float | None]] | None = None
        self.tasks = TaskOwner("presence_task_failed")
        self._waiting = 0  # calls queued on or holding the lock
        self._in_flight = 0  # our client transactions awaiting a final response
        self._room = asyncio.Event()  # set whenever a transaction finishes
        self._ended = asyncio.Event()  # likewise, for ``quiet``
        # Outcomes of transactions to run in order, or what is left of one to await.
        self._answers: deque[Work | Awaitable[Any]] = deque()
        self._draining: asyncio.Task[Any] | None = None
        self._closing = False  # stop began: no new work
        self._closed = False  # stop ended: nothing is called any more

    @property
    def waiting(self) -> int:
        """Calls waiting for (or holding) the lock."""
        return self._waiting

    @property
    def closing(self) -> bool:
        """True once stopping began."""
        return self._closing

    @property
    def closed(self) -> bool:
        """True once stopped: the core (and the store) are not called again."""
        return self._closed

    def own(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[Any]:
        """Run ``work`` as an owned task (``stop`` waits for it)."""
        return self.tasks.own(work)

    @property
    def in_flight(self) -> int:
        """Our client transactions awaiting a final response."""
        return self._in_flight

    @property
    def has_room(self) -> bool:
        """True while fewer than ``max_in_flight`` transactions await answers."""
        return self._in_flight < self.max_in_flight

    def begin_transaction(self) -> None:
        """A client transaction was sent: counted in flight until it ends.

        Counted at once: a fan-out sends many requests in one call, and ``has_room`` and
        ``wait_for_room`` must see them all.
        """
        self._in_flight += 1

    def answered(self, work: Work) -> None:
        """A transaction ended (its callback, in the pass its answer came): ``work(now)`` runs
        in the core after the outcomes queued before it.

        When the core is idle (no call holds or waits for the lock, no outcome queued) it runs
        at once, as a call would, and what it returns other than ``DONE`` is awaited in the
        core next: the usual 2xx to a NOTIFY costs no task and no wait. Otherwise it is queued
        and the queue runs in one call.
        """
        self.unanswered()
        answers = self._answers
        if self._waiting or answers or self._closed:
            answers.append(work)
        else:
            try:
                more = work(self.clock())
            except Exception as exc:
                log.error("presence_task_failed", error=repr(exc))
                return
            finally:
                self._wake_if_earlier()
            if more is DONE:
                return
            answers.append(more)
        if self._draining is None:
            self._draining = self.tasks.own(self._drain())

    def unanswered(self) -> None:
        """A transaction ended with nothing to run in the core."""
        self._in_flight -= 1
        self._room.set()
        self._ended.set()

    async def _drain(self) -> None:
        try:
            while self._answers and not self._closed:
                await self.call(self._run_answers)
        finally:
            self._draining = None
            if self._closed:  # after stop an outcome changes nothing (see ``call``)
                for left in self._answers:
                    if inspect.iscoroutine(left):
                        left.close()
                self._answers.clear()

    async def _run_answers(self, now: float) -> None:
        answers = self._answers
        while answers:
            work = answers.popleft()
            try:
                await (work(now) if callable(work) else work)
            except Exception as exc:  # one outcome's failure does not hold up the others
                log.error("presence_task_failed", error=repr(exc))

    async def quiet(self, timeout: float | None = None) -> None:
        """Wait until no owned task is left and no transaction is in flight, or ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            await self.tasks.wait(None if deadline is None else max(0.0, deadline - loop.time()))
            left = None if deadline is None else deadline - loop.time()
            if (not self._in_flight and not len(self.tasks)) or (left is not None and left <= 0):
                return
            if self._in_flight:
                self._ended.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._ended.wait()

    async def wait_for_room(self) -> None:
        """Pause new work while ``max_in_flight`` of our transactions await answers."""
        while self._in_flight >= self.max_in_flight and not self._closing:
            self._room.clear()
            await self._room.wait()

    async def call(self, work: Work) -> None:
        """Run ``work(now)`` alone; after ``stop`` it is skipped."""
        self._waiting += 1
        try:
            async with self._lock:
                if self._closed:
                    # After stop: the store may be closed; an outcome now changes nothing.
                    log.debug("presence_call_after_stop")
                    return
                await work(self.clock())
        finally:
            self._waiting -= 1
            self._wake_if_earlier()

    def timer_sleeps(self, until: float | None, deadline: Callable[[], float | None]) -> None:
        """The timer sleeps until ``until`` (clock time; None: it is awake). Until then a call
        wakes it only when ``deadline()`` comes before (a fan-out's answers rarely do)."""
        self._sleep = None if until is None else (until, deadline)

    def _wake_if_earlier(self) -> None:
        sleep = self._sleep
        if sleep is None:
            self.wake.set()  # the timer is not asleep: it reads the deadline before it sleeps
            return
        earliest = sleep[1]()
        if earliest is not None and earliest < sleep[0]:
            self.wake.set()

    def begin_stop(self) -> None:
        """Take no new work; a worker waiting for room sees it and ends."""
        self._closing = True
        self._room.set()

    async def finish(self, deadline: float) -> None:
        """Let owned tasks and queued calls finish until ``deadline`` (loop time), then close."""
        loop = asyncio.get_running_loop()
        # Transactions started meanwhile (a NOTIFY owed after a 2xx) are waited for too.
        await self.quiet(max(0.0, deadline - loop.time()))
        pending = self.tasks.pending()
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


class PresenceDriver:
    """Drives presence: the timer, the sweep, XMPP stanzas, link up, commands, start and stop.

    Implements ``component.ports.RegistrarCommands`` for messaging. ``xmpp`` answers a
    subscription stanza with an error when the store is down (DESIGN 8).
    """

    def __init__(
        self,
        serial: CoreSerial,
        *,
        core: Core,
        sip: Dialogs,
        xmpp: XmppPort | None = None,
        sweep_interval: float = 20.0,
        max_queued_presence: int = 50_000,
    ) -> None:
        self.serial = serial
        self.core = core
        self.sip = sip
        self.xmpp = xmpp
        self.sweep_interval = sweep_interval
        self.max_queued_presence = max_queued_presence
        self._loops: list[asyncio.Task[None]] = []
        self._stanzas: deque[Presence] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._dropped = 0

    @property
    def queued_presence(self) -> int:
        """XMPP presence stanzas waiting for the worker."""
        return len(self._stanzas)

    # --- entry points for the adapters and features ---------------------------------------

    async def command(self, msg: SipText) -> str | None:
        """``RegistrarCommands``: online/offline/away/dnd/help (DESIGN 5.4)."""
        result: list[str | None] = []

        async def run(now: float) -> None:
            result.append(await self.core.command(msg, now))

        await self.serial.call(run)
        return result[0] if result else None

    def on_presence(self, presence: Presence) -> None:
        """The XMPP adapter's presence callback: queue the stanza for the presence worker.

        The queue is bounded (DESIGN 8): beyond ``max_queued_presence`` or once stopping, the
        stanza is dropped with a log line (availability is re-sent on the next change or probe).
        """
        closing = self.serial.closing
        if closing or len(self._stanzas) >= self.max_queued_presence:
            if self._dropped % _DROP_LOG_EVERY == 0:
                log.warning(
                    "presence_dropped",
                    jid=presence.sender,
                    type=presence.type,
                    queued=len(self._stanzas),
                    dropped=self._dropped + 1,
                    stopping=closing,
                )
            self._dropped += 1
            return
        self._stanzas.append(presence)
        if self._worker is None or self._worker.done():
            self._worker = self.serial.own(self._presence_worker())

    async def _presence_worker(self) -> None:
        # One stanza at a time, in arrival order; ends when the queue is empty.
        while self._stanzas and not self.serial.closing:
            await self.serial.wait_for_room()
            if self.serial.closing:
                break
            presence = self._stanzas.popleft()
            try:
                await self.serial.call(self._presence_work(presence))
            except StoreUnavailable:
                self._refuse_store_down(presence)
            except Exception:
                log.exception("presence_stanza_failed", jid=presence.sender, type=presence.type)

    def _refuse_store_down(self, presence: Presence) -> None:
        """A stanza that needed the store while it is down: an error stanza, not silence."""
        if self.xmpp is None or presence.type not in _ANSWERED_WHEN_DOWN:
            return
        refusal = busy("the gateway cannot store this now; try again later", _STORE_RETRY)
        self.xmpp.refuse(presence, refusal)

    def _presence_work(self, presence: Presence) -> Work:
        return lambda now: self.core.on_presence(presence, now)

    def on_link(self, up: bool) -> None:
        """The XMPP adapter's link callback: on up, re-announce presence (DESIGN 8)."""
        if up:
            self.serial.own(self._link_up())

    async def _link_up(self) -> None:
        # In batches: thousands of SIP users to re-announce must not hold the lock for seconds
        # while refreshes fall due and NOTIFYs wait to be answered.
        more = [True]

        async def step(now: float) -> None:
            more[0] = await self.core.link_up_step(now, _LINK_UP_BATCH)

        await self.serial.call(self.core.link_up_begin)
        while more[0] and not self.serial.closing:
            await self.serial.call(step)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume from the store, then start the timer and the sweep."""
        await self.resume()
        self._loops = [
            asyncio.create_task(self._timer_loop(), name="presence-timer"),
            asyncio.create_task(self._sweep_loop(), name="presence-sweep"),
        ]

    async def resume(self) -> None:
        """Resume what the store says this instance holds and is not held yet (at start, and
        after taking over a dead instance's subscriptions, DESIGN 9)."""
        found: list[ResumeState] = []

        async def stored(now: float) -> None:
            found.append(await self.sip.resume_stored())

        # Two calls: the subscribers' refresh times are spread from after the slow part.
        await self.serial.call(stored)
        await self.serial.call(lambda now: self.sip.resume_subscribers(found[0], now))

    async def stop(self, timeout: float = 5.0) -> None:
        """Take no new work, let work in flight finish (up to ``timeout``), then stop calling
        in. What is cut short is not sent; nothing is deleted for it (DESIGN 8)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.serial.begin_stop()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        if self._stanzas:
            log.info("presence_stanzas_unhandled", count=len(self._stanzas))
            self._stanzas.clear()
        await self.serial.finish(deadline)

    async def settle(self) -> None:
        """Wait until no owned task and no transaction is left (and what they started)."""
        await self.serial.quiet()

    async def _timer_loop(self) -> None:
        wake = self.serial.wake
        while not self.serial.closing:
            deadline = self.sip.next_deadline()
            delay = _MAX_SLEEP if deadline is None else deadline - self.serial.clock()
            if delay > 0:
                wake.clear()
                sleep = min(delay, _MAX_SLEEP)
                self.serial.timer_sleeps(self.serial.clock() + sleep, self.sip.next_deadline)
                # Not asyncio.wait_for: on 3.11 it swallows a cancel that races with the wake-up
                # (the loop then never ends and stop() hangs); asyncio.timeout does not.
                try:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(sleep):
                            await wake.wait()
                finally:
                    self.serial.timer_sleeps(None, self.sip.next_deadline)
                continue
            await self.serial.wait_for_room()
            try:
                # A batch per call: the lock goes round between batches (see handle_timer).
                await self.serial.call(self.sip.handle_timer)
            except StoreUnavailable:
                await asyncio.sleep(1.0)  # the health state logged it; try again shortly
            except Exception:
                log.exception("presence_timer_failed")
                await asyncio.sleep(1.0)  # do not spin on a persistent fault

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.serial.call(self.core.sweep)
            except StoreUnavailable:
                continue  # the health state logged it; the next sweep tries again
            except Exception:
                log.exception("presence_sweep_failed")
