"""``bench.messages`` at a tiny count against the real servers: every table is printed with its
rows, Kamailio's xmpp module beside the gateway whenever the module is available, and every
gateway message delivered. No timing is asserted: the figures are the benchmark's business."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bench.anchor import CONFIG_NAME, DEFAULT_ANCHOR_DIR, MODULE_FILE, cache_dir
from bench.message_table import COMPARISON_HEADER, HEADER, SIPP_HEADER
from bench.sipp import sipp_available
from tests.harness.values import REPO_ROOT

pytestmark = pytest.mark.slow

COUNT = 20
SIPP_COUNT = 40
MODULE_AVAILABLE = (DEFAULT_ANCHOR_DIR / CONFIG_NAME).is_file() and (
    cache_dir() / MODULE_FILE
).is_file()


def _table(output: str, header: list[str]) -> list[list[str]]:
    """The rows of the table whose first line holds ``header``, cells split on 2+ spaces."""
    lines = output.splitlines()
    first = next(i for i, line in enumerate(lines) if re.split(r"\s{2,}", line) == header)
    rows: list[list[str]] = []
    for line in lines[first + 2 :]:
        if not line.strip() or line.startswith("machine:"):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


@pytest.fixture(scope="module")
def output() -> str:
    argv = [
        sys.executable,
        "-m",
        "bench.messages",
        "--count",
        str(COUNT),
        "--steady-count",
        str(COUNT),
        "--rate",
        "100",
        "--burst",
        str(COUNT),
        "--sipp-count",
        str(SIPP_COUNT),
        "--sipp-steady-count",
        str(SIPP_COUNT),
        "--sipp-rate",
        "1000",
        "--conversations",
        "3",
    ]
    if not MODULE_AVAILABLE:
        argv.append("--no-module")
    result = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_every_path_has_its_rows(output: str) -> None:
    rows = _table(output, HEADER)
    seen = {(row[0], row[1], row[2]) for row in rows}
    expected = {
        ("xmpp -> xmpp", "steady 100/s", "3"),
        ("sip -> sip", "max x50", "3"),
        ("sip -> kamailio -> gw -> xmpp", "max x50", "3"),
        ("sip -> gw -> xmpp", "steady 100/s", "3"),
        ("sip -> gw -> xmpp", "max x50", "3"),
        ("xmpp -> gw -> kamailio -> sip", "max x50", "3"),
        ("xmpp -> gw -> kamailio -> sip", "max x50", "1"),
        ("xmpp burst -> gw -> sip", f"max x{COUNT}", "3"),
    }
    module = {
        ("sip -> module -> xmpp", "steady 100/s", "3"),
        ("sip -> module -> xmpp", "max x50", "3"),
        ("xmpp -> module -> sip", "max x50", "3"),
        ("xmpp -> module -> sip", "max x50", "1"),
    }
    assert expected <= seen
    if MODULE_AVAILABLE:
        assert module <= seen
    else:
        assert not module & seen
    for row in rows:
        assert len(row) >= len(HEADER) - 1, row  # notes may be empty
        sent, delivered, refused, lost = (int(cell) for cell in row[3:7])
        assert sent == COUNT, row
        if "gw" in row[0]:
            # DESIGN 8: nothing refused, nothing lost.
            assert (delivered, refused, lost) == (COUNT, 0, 0), row
        if "gw" in row[0] and "kamailio -> gw" not in row[0]:
            # Nor out of order (Kamailio's workers in front of the gateway may reorder).
            assert row[7] == "0", row


def test_module_beside_the_gateway(output: str) -> None:
    if not MODULE_AVAILABLE:
        assert "Kamailio xmpp module: left out" in output
        return
    assert "Kamailio xmpp module up as component" in output
    rows = _table(output, COMPARISON_HEADER)
    names = {"gateway", "module", "gw/module"}
    elements = [next(cell for cell in row if cell in names) for row in rows]
    # Four loads (straight steady and max; relayed over 3 conversations and over 1; the
    # relayed steady row too), each: gateway, module, ratio.
    assert elements == ["gateway", "module", "gw/module"] * 5
    for row in rows:
        if row[0] == "gw/module":
            # A ratio, or "-" where the module's figure is zero (CPU is read in clock ticks).
            assert all(re.fullmatch(r"\d+\.\d\dx|-", cell) for cell in row[1:5]), row
            assert row[1] != "-", row  # both delivered something


def test_sipp_rows(output: str) -> None:
    if not sipp_available():
        assert "SIPp (sipp) is not installed" in output
        return
    rows = _table(output, SIPP_HEADER)
    runs = [row for row in rows if row[0] != "gw/module"]
    elements = ["gateway", "module"] if MODULE_AVAILABLE else ["gateway"]
    assert [row[1] for row in runs] == elements * 2
    assert [row[0] for row in runs] == [f"1000/s x {SIPP_COUNT}"] * len(elements) + [
        f"100/s x {SIPP_COUNT}"
    ] * len(elements)
    for row in runs:
        answered, failed, _retrans, _secs, _rate, reached = row[2:8]
        if row[1] == "gateway":
            assert (answered, failed, reached) == (str(SIPP_COUNT), "0", str(SIPP_COUNT)), row
        else:
            assert int(answered) + int(failed) == SIPP_COUNT, row
