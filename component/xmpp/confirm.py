"""The asyncio side of the acknowledgement barrier: one re-armed timer and the ping writes.

:class:`~component.xmpp.acks.AckBarrier` decides; :class:`Confirmations` gives it the clock,
arms one loop timer at its next deadline, writes the pings it asks for through the link, and
tells the link when the server stopped answering. The link calls :meth:`Confirmations.written`
for each message it writes (and writes the ping it may return in the same write),
:meth:`Confirmations.answered` for each ping answer, and :meth:`Confirmations.lost` when the
stream is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

from component.logs import get_logger
from component.values import ChatMessage
from component.xmpp.acks import AckBarrier, Effect, PingOverdue, SendPing
from component.xmpp.stanzas import delay_stamp

__all__ = ["Confirmations"]

log = get_logger("component.xmpp")


class Confirmations:
    """Runs an :class:`AckBarrier` of chat messages on the running event loop."""

    def __init__(
        self,
        barrier: AckBarrier[ChatMessage],
        *,
        component: str,
        clock: Callable[[], float],
        write_ping: Callable[[str], bool],
        on_overdue: Callable[[], None],
    ) -> None:
        self.barrier = barrier
        self.component = component
        self._clock = clock
        self._write_ping = write_ping
        self._on_overdue = on_overdue
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # The loop, once known: asyncio.get_running_loop() costs a getpid() call each time.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._settled: asyncio.Event | None = None
        self._overdue = False  # the link is being torn down; no timer until lost()

    def written(self, msg: ChatMessage) -> str | None:
        """``msg`` is being written to the stream: it waits for the next ping's answer. Returns
        the id of a ping due with it, which the caller writes right after it, in the same write
        (None: no ping now)."""
        now = self._clock()
        effects = self.barrier.written(msg, now)
        ping_id = None
        for effect in effects:
            if isinstance(effect, SendPing):
                ping_id = effect.ping_id
        # Only the first write of a batch moves the deadline earlier; a ping moves it out (to
        # that ping's timeout), so the batch's timer does not wake the process for nothing.
        batch_deadline = now + self.barrier.batch_delay
        if ping_id is not None or self._timer is None or self._timer_at > batch_deadline:
            self._arm(now)
        return ping_id

    def answered(self, ping_id: str) -> None:
        """The server answered one of our pings: what was written before it is confirmed."""
        self.barrier.answered(ping_id, self._clock())
        if self.barrier.unconfirmed == 0 and self._settled is not None:
            self._settled.set()

    def lost(self) -> list[ChatMessage]:
        """The stream is gone: the unconfirmed messages, in the order they were written, each
        with a XEP-0203 stamp of when it was first written (kept if it already had one)."""
        self._cancel()
        self._overdue = False
        if self._settled is not None:
            self._settled.set()  # nothing more will be confirmed on this stream
        return [
            replace(
                u.item,
                delay_stamp=u.item.delay_stamp or delay_stamp(u.written_at),
                delay_from=u.item.delay_from or self.component,
            )
            for u in self.barrier.lost()
        ]

    async def flush(self, timeout: float) -> bool:
        """Ping now and wait (bounded) until everything written is confirmed; True if it was."""
        if self.barrier.unconfirmed == 0:
            return True
        self._settled = settled = asyncio.Event()
        try:
            self._apply(self.barrier.ping_now(self._clock()))
            async with asyncio.timeout(timeout):
                await settled.wait()
        except TimeoutError:
            pass
        finally:
            self._settled = None
        return self.barrier.unconfirmed == 0

    def close(self) -> None:
        """Cancel the timer (the link stopped)."""
        self._cancel()
        self._loop = None

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case SendPing(ping_id):
                    self._write_ping(ping_id)
                case PingOverdue(ping_id, sent_at):
                    log.warning(
                        "xmpp_ping_overdue",
                        ping_id=ping_id,
                        waited=round(self._clock() - sent_at, 3),
                        unconfirmed=self.barrier.unconfirmed,
                    )
                    self._overdue = True
                    self._on_overdue()

    def _arm(self, now: float) -> None:
        deadline = self.barrier.next_deadline()
        self._cancel()
        if deadline is None or self._overdue:
            return
        self._timer_at = deadline
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, deadline - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._clock()
        self._apply(self.barrier.handle_timer(now))
        self._arm(now)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
