"""Event-loop lag (DESIGN 9 metrics): how late a timer fires tells how busy the loop is."""

from __future__ import annotations

import asyncio

INTERVAL = 0.5  # seconds between measurements


class LoopLag:
    """Measures, until cancelled, how much later than asked a sleep of the loop ends."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.last = 0.0  # seconds late, the last measurement
        self.worst = 0.0  # seconds late, the worst measured

    async def run(self) -> None:
        """Measure every ``interval`` seconds; owned and cancelled by the gateway."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.last = max(loop.time() - asked, 0.0)
            self.worst = max(self.worst, self.last)
