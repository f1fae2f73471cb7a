"""A sampling profiler for the gateway process, for per-message costs without cProfile's bias.

cProfile charges a fixed overhead to every call, so code made of many small calls (header
parsing, logging processors) looks several times dearer than it is, and the profiled gateway
runs about ten times slower. This one records the Python stack on ``SIGPROF``, which the kernel
sends every ``interval`` seconds of the process's CPU time; a function's share of the samples is
its share of the CPU, whatever its call count. Time spent inside a C call (a ``sendto``, the
JSON encoder) is charged to the Python function that made it.

    python -m bench.sampler OUT.json COMPONENT-ARGS...     (the gateway's command line)
    python -m bench.sampler --report OUT.json [TOP]

``bench.messages --profile FILE --profile-clock sample`` runs the gateway this way.
"""

from __future__ import annotations

import json
import signal
import sys
from collections import Counter
from pathlib import Path
from types import FrameType

# Seconds of CPU time between samples asked for. The kernel drives ITIMER_PROF from its
# scheduler tick, so samples come at most once a tick (4 ms at HZ=250: about half of those asked
# for at 2 ms); they are still spread over CPU time without regard to what runs, and the shares
# are what the report uses, scaled by CPU per message measured from /proc.
INTERVAL = 0.002
Frame = tuple[str, int, str]  # file, first line, function


class Sampler:
    """Counts the stacks seen at each ``SIGPROF``."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.stacks: Counter[tuple[Frame, ...]] = Counter()

    def start(self) -> None:
        """Install the handler and start the CPU-time timer."""
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)

    def stop(self) -> None:
        """Stop the timer."""
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, signal.SIG_IGN)

    def _sample(self, _signum: int, frame: FrameType | None) -> None:
        stack: list[Frame] = []
        while frame is not None:
            code = frame.f_code
            stack.append((code.co_filename, code.co_firstlineno, code.co_name))
            frame = frame.f_back
        self.stacks[tuple(stack)] += 1

    def dump(self, path: Path) -> None:
        """Write the samples as JSON: a list of [count, [[file, line, name], ...]], leaf first."""
        rows = [[count, [list(f) for f in stack]] for stack, count in self.stacks.items()]
        path.write_text(json.dumps({"interval": self.interval, "stacks": rows}))


def _short(frame: Frame) -> str:
    path, line, name = frame
    parts = Path(path).parts
    # Repository files by their package path, libraries by their last two parts.
    for root in ("component", "sipside", "bench"):
        if root in parts:
            return f"{'/'.join(parts[parts.index(root) :])}:{line}({name})"
    return f"{'/'.join(parts[-2:])}:{line}({name})"


#: Samples taken while the event loop runs: the traffic, not the start-up imports.
IN_LOOP = "asyncio/base_events.py:1845(_run_once)"


def report(path: Path, top: int = 30, messages: int = 0, cpu_seconds: float = 0.0) -> str:
    """The functions with the largest inclusive and own shares of the event loop's samples in
    ``path``; with ``messages`` and the gateway's ``cpu_seconds`` for them (measured from /proc,
    not from the samples), also each function's share in CPU microseconds per message."""
    data = json.loads(path.read_text())
    interval = data["interval"]
    total = 0
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for count, stack in data["stacks"]:
        frames = [_short((f[0], f[1], f[2])) for f in stack]
        if IN_LOOP not in frames:
            continue
        total += count
        if frames:
            own[frames[0]] += count
        for name in set(frames):
            inclusive[name] += count
    if total == 0:
        return "no samples"
    lines = [f"{total} samples in the event loop (asked for every {interval * 1e3:g} ms of CPU)"]
    per_message = cpu_seconds / messages * 1e6 if messages and cpu_seconds else 0.0
    if per_message:
        lines[0] += f"; {per_message:.0f} us of gateway CPU per message over {messages}"
    for title, counter in (("inclusive", inclusive), ("own", own)):
        lines.append(f"\n--- gateway samples, top {top} by {title} share")
        for name, count in counter.most_common(top):
            share = count / total
            per_msg = f"{share * per_message:7.1f} us/msg  " if per_message else ""
            lines.append(f"{share * 100:6.1f}%  {per_msg}{name}")
    return "\n".join(lines)


def sample_gateway(out: str, argv: list[str]) -> int:
    """Run the gateway's command line with the sampler on; the samples go to ``out``."""
    from component.cli import main

    sampler = Sampler()
    sampler.start()
    try:
        return main(argv)
    finally:
        sampler.stop()
        sampler.dump(Path(out))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--report":
        print(report(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 30))
        raise SystemExit(0)
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    raise SystemExit(sample_gateway(sys.argv[1], sys.argv[2:]))
