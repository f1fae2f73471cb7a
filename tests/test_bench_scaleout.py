"""``bench.scaleout``: its share bookkeeping on its own, and the whole bench at a tiny count
against the real servers (ejabberd, Kamailio's dispatcher, PostgreSQL, one then two gateway
instances): every row printed, nothing refused or lost, both instances relaying in the
two-instance rows, and the share line agreeing with the table. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.load import CpuSnapshot
from bench.message_table import RowResult
from bench.message_world import SIP_TO_XMPP, XMPP_TO_SIP
from bench.scaleout import (
    HEADER,
    MAX_SHARE,
    ScaleRow,
    ServerCpu,
    delivered_count,
    share_verdict,
    shares,
)
from tests.harness.values import REPO_ROOT
from tests.test_bench_messages import _table

COUNT = 20
USERS = 4

EXPOSITION = """\
# HELP sipxmpp_messages_total Chat messages by direction and outcome.
# TYPE sipxmpp_messages_total counter
sipxmpp_messages_total{direction="sip_to_xmpp",outcome="delivered"} 12.0
sipxmpp_messages_total{direction="sip_to_xmpp",outcome="queued"} 3.0
sipxmpp_messages_total{direction="sip_to_xmpp",outcome="failed"} 1.0
sipxmpp_messages_total{direction="xmpp_to_sip",outcome="delivered"} 30.0
sipxmpp_messages_total{direction="xmpp_to_sip",outcome="refused"} 2.0
# HELP sipxmpp_rooms Chat rooms SIP users are in.
# TYPE sipxmpp_rooms gauge
sipxmpp_rooms 7.0
"""


def test_delivered_count_sums_both_ways_and_nothing_else() -> None:
    assert delivered_count(EXPOSITION) == 42
    assert delivered_count("sipxmpp_rooms 7.0\n") == 0


def _row(relayed: tuple[int, ...], mode: str = "max x50") -> ScaleRow:
    zero = CpuSnapshot(0.0, 0.0, 0.0, 0.0)
    result = RowResult(
        SIP_TO_XMPP, mode, USERS, sum(relayed), sum(relayed), 0, 1.0, None, None, zero, 0
    )
    cpu = ServerCpu(tuple(0.01 for _ in relayed), 0.0, 0.0, 0.0)
    return ScaleRow(result, cpu, relayed)


def test_share_verdict_names_the_largest_share_and_the_limit() -> None:
    assert shares((30, 70)) == (0.3, 0.7)
    assert shares((0, 0)) == (0.0, 0.0)
    even = share_verdict([_row((100,)), _row((55, 45)), _row((40, 60), "steady 200/s")])
    assert even.startswith("shared:") and "largest share 60%" in even and "steady" in even
    uneven = share_verdict([_row((55, 45)), _row((39, 61))])
    assert uneven.startswith("NOT shared:") and "61%" in uneven
    assert share_verdict([_row((0, 0))]).startswith("NOT shared:")
    assert "nothing to say" in share_verdict([_row((100,))])


@pytest.fixture(scope="module")
def output() -> str:
    argv = [
        sys.executable,
        "-m",
        "bench.scaleout",
        "--count",
        str(COUNT),
        "--steady-count",
        str(COUNT),
        "--rate",
        "100",
        "--conversations",
        str(USERS),
    ]
    result = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_every_load_on_one_and_two_instances_nothing_lost(output: str) -> None:
    rows = _table(output, HEADER)
    seen = sorted((row[0], row[1], row[2]) for row in rows)
    expected = sorted(
        (f"{n} instance{'s' if n > 1 else ''}", path.name, mode)
        for n in (1, 2)
        for path in (SIP_TO_XMPP, XMPP_TO_SIP)
        for mode in ("steady 100/s", "max x50")
    )
    assert seen == expected
    for row in rows:
        assert len(row) >= len(HEADER) - 1, row  # notes may be empty
        sent, delivered, refused, lost = (int(cell) for cell in row[3:7])
        # DESIGN 8: nothing refused, nothing lost, on one instance or two.
        assert (sent, delivered, refused, lost) == (COUNT, COUNT, 0, 0), row
        relayed = [int(n) for n in row[HEADER.index("relayed")].split("/")]
        instances = int(row[0].split()[0])
        assert len(relayed) == instances, row
        # What the instances' /metrics counted is what arrived, each message once.
        assert sum(relayed) == COUNT, row
        if instances == 2:
            # ejabberd spreads the stanzas, the dispatcher hashes the USERS senders over both.
            assert min(relayed) > 0, row


@pytest.mark.slow
def test_the_share_line_agrees_with_the_table(output: str) -> None:
    rows = [row for row in _table(output, HEADER) if row[0] == "2 instances"]
    relayed = [tuple(int(n) for n in row[HEADER.index("relayed")].split("/")) for row in rows]
    top = max(max(shares(counts)) for counts in relayed)
    line = next(line for line in output.splitlines() if "shared:" in line)
    assert line.startswith("shared:" if top <= MAX_SHARE else "NOT shared:"), (top, line)
    assert f"largest share {top:.0%}" in line or top > MAX_SHARE
