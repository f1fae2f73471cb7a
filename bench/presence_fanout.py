"""What one status change to N SIP watchers costs the presence path, counted in process.

Run ``python -m bench.presence_fanout [--watchers N] [--rounds R]``. It builds the presence
driver, the SIP side and the presence core as ``app.py`` wires them (in-memory store, fake
XMPP port), on a fake endpoint that answers every NOTIFY 200 in a later event-loop pass, one
answer per pass, as datagrams read one per pass would be. N SIP users watch ``bob@xmpp.test``;
bob changes his status R times, each reaching the gateway as N stanzas (one per watcher JID, as an
XMPP server sends it), and each round ends once every NOTIFY is answered. Printed per NOTIFY,
for the rounds together:

- event-loop passes (``_run_once`` calls) and tasks created, and the passes from an answer to
  the NOTIFY that takes its place in the window: the waiting the real bench
  (``bench.presence``) sees as time, not CPU;
- the CPU (``time.process_time``, best round), with the fakes' share in it.

The window of NOTIFYs in flight is the driver's (``MAX_IN_FLIGHT``). Deterministic: no sockets,
no other traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import structlog

from component.runtime.presence_driver import MAX_IN_FLIGHT, CoreSerial, PresenceDriver
from component.sip.transactions import ClientTransactions
from component.store.memory import MemoryStore
from component.values import Presence
from sipside.endpoint import Final
from sipside.message import SipRequest, SipResponse
from sipside.peer import Peer
from tests.test_presence import (
    BOB,
    GW_CONTACT,
    FakeOnline,
    FakeXmpp,
    answer,
    presence_side,
    watched_by,
    watcher_jid,
)


class CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts its passes and the tasks made on it."""

    def __init__(self) -> None:
        super().__init__()
        self.passes = 0
        self.tasks = 0
        self.set_task_factory(self._task)

    def _run_once(self) -> None:
        self.passes += 1
        super()._run_once()  # type: ignore[misc]

    def _task(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any],
        **kw: Any,
    ) -> asyncio.Task[Any]:
        self.tasks += 1
        return asyncio.Task(coro, loop=loop, **kw)


class AnsweringEndpoint:
    """Answers every request 200, one answer per loop pass in the order sent (as datagrams
    read one per pass would be), by ``send``'s callback or to ``request``'s awaiter.

    ``gaps`` sums, for each request sent after an answer made room, the passes since that
    answer: the wait between an answer and the request that takes its place."""

    def __init__(self, loop: CountingLoop) -> None:
        self.loop = loop
        self.sent = 0
        self.gaps = 0
        self.refills = 0
        self._unanswered: deque[tuple[Callable[[Final], None], SipResponse]] = deque()
        self._freed: deque[int] = deque()  # the pass of each answer not yet followed by a send
        self._pumping = False

    def send(
        self, request: SipRequest, done: Callable[[Final], None], peer: Peer | None = None
    ) -> None:
        self.sent += 1
        if self._freed:
            self.gaps += self.loop.passes - self._freed.popleft()
            self.refills += 1
        self._unanswered.append((done, answer(request, 200)))
        if not self._pumping:
            self._pumping = True
            self.loop.call_soon(self._pump)

    def _pump(self) -> None:
        done, response = self._unanswered.popleft()
        self._freed.append(self.loop.passes)
        done(response)
        if self._unanswered:
            self.loop.call_soon(self._pump)
        else:
            self._pumping = False

    def idle(self) -> None:
        """Between rounds: answers no request follows are not counted."""
        self._freed.clear()

    async def request(self, request: SipRequest, peer: Peer | None = None) -> SipResponse:
        future: asyncio.Future[Final] = self.loop.create_future()
        self.send(request, future.set_result, peer)
        final = await future
        assert isinstance(final, SipResponse)
        return final

    def contact_for(self, transport: str = "udp", user: str | None = None) -> str:
        return GW_CONTACT


async def run(watchers: int, rounds: int) -> dict[str, float]:
    """Subscribe ``watchers``, then ``rounds`` status changes; the counts per NOTIFY."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, CountingLoop)
    store = MemoryStore()
    endpoint = AnsweringEndpoint(loop)
    serial = CoreSerial(clock=time.time)
    side = presence_side(
        store, ClientTransactions(endpoint, serial), FakeXmpp(), FakeOnline(), driver=serial
    )
    driver = PresenceDriver(serial, core=side.presence, sip=side, sweep_interval=3600)
    await driver.start()
    try:
        await watched_by(store, side, watchers, expires=3600)
        await driver.settle()
        passes = tasks = sent = 0
        cpu: list[float] = []
        endpoint.gaps = endpoint.refills = 0
        for number in range(rounds):
            show = "away" if number % 2 == 0 else "dnd"
            endpoint.idle()
            sent0, passes0, tasks0 = endpoint.sent, loop.passes, loop.tasks
            cpu0 = time.process_time()
            for i in range(watchers):
                driver.on_presence(
                    Presence(sender=f"{BOB}/pc", recipient=watcher_jid(i), show=show)
                )
            await driver.settle()
            cpu.append(time.process_time() - cpu0)
            if endpoint.sent - sent0 != watchers:
                raise RuntimeError(f"round {number}: {endpoint.sent - sent0} NOTIFYs sent")
            sent += endpoint.sent - sent0
            passes += loop.passes - passes0
            tasks += loop.tasks - tasks0
    finally:
        await driver.stop()
    return {
        "notifies": sent,
        "passes": passes / sent,
        "tasks": tasks / sent,
        "gap": endpoint.gaps / max(endpoint.refills, 1),
        "cpu_us": min(cpu) / watchers * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run, print the counts."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=1000, help="SIP watchers of bob")
    parser.add_argument("--rounds", type=int, default=5, help="status changes")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        result = runner.run(run(args.watchers, args.rounds))
    print(
        f"{args.watchers} watchers, {args.rounds} status changes, window {MAX_IN_FLIGHT}: "
        f"{result['notifies']:.0f} NOTIFYs"
    )
    print(f"event-loop passes per NOTIFY: {result['passes']:.2f}")
    print(f"tasks created per NOTIFY: {result['tasks']:.2f}")
    print(f"passes from an answer to the NOTIFY taking its place: {result['gap']:.2f}")
    print(f"CPU per NOTIFY (best round, fakes included): {result['cpu_us']:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
