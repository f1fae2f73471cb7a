"""The benchmark's own pieces that decide what is printed: finding or building Kamailio's xmpp
module, reading SIPp's statistics, and the gateway/module comparison."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import anchor
from bench.load import CpuSnapshot
from bench.message_table import (
    GATEWAY,
    MODULE,
    MessagePath,
    RowResult,
    SippResult,
    format_comparison,
    format_sipp,
)
from bench.sipp import SippStats, parse_stats


def _anchor_dir(tmp_path: Path, build_script: str | None) -> Path:
    folder = tmp_path / "anchor"
    folder.mkdir()
    (folder / anchor.CONFIG_NAME).write_text("#!KAMAILIO\n")
    if build_script is not None:
        (folder / "build.sh").write_text(build_script)
    return folder


def test_module_found_in_cache_without_building(tmp_path: Path) -> None:
    folder = _anchor_dir(tmp_path, "exit 1\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "xmpp.so").write_bytes(b"\x7fELF")
    found, said = anchor.find_or_build(folder, cache)
    assert found == anchor.Anchor(cache, folder / anchor.CONFIG_NAME)
    assert "built earlier" in said


def test_module_built_once_into_the_cache(tmp_path: Path) -> None:
    # A stand-in build.sh with the real one's contract: OUTDIR as $1, xmpp.so written there.
    folder = _anchor_dir(tmp_path, 'echo run >>"$1/runs"; echo so >"$1/xmpp.so"\n')
    cache = tmp_path / "cache"
    found, said = anchor.find_or_build(folder, cache)
    assert found is not None and found.module_dir == cache
    assert said.endswith(f"built into {cache}")
    again, said_again = anchor.find_or_build(folder, cache)
    assert again == found and "built earlier" in said_again
    assert (cache / "runs").read_text() == "run\n"


def test_module_that_cannot_be_built_says_why(tmp_path: Path) -> None:
    folder = _anchor_dir(tmp_path, 'echo "apt-get: permission denied" >&2; exit 100\n')
    found, said = anchor.find_or_build(folder, tmp_path / "cache")
    assert found is None
    assert "exited with 100" in said and "permission denied" in said
    assert said.endswith("gateway rows only")


def test_module_without_the_anchor_config(tmp_path: Path) -> None:
    found, said = anchor.find_or_build(tmp_path / "nowhere", tmp_path / "cache")
    assert found is None and anchor.CONFIG_NAME in said


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert anchor.cache_dir() == tmp_path / "sipxmpp-bench" / "kamailio-xmpp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert anchor.cache_dir() == Path(os.path.expanduser("~/.cache/sipxmpp-bench/kamailio-xmpp"))


SIPP_STATS = (
    "StartTime;CurrentTime;SuccessfulCall(C);FailedCall(C);Retransmissions(C);\n"
    "2026-12-03\t13:33:49.5\t1000.5;2026-12-03\t13:33:49.5\t1000.5;0;0;0;\n"
    "2026-12-03\t13:33:49.5\t1000.5;2026-12-03\t13:33:52.0\t1003.0;14990;10;42;\n"
)


def test_sipp_statistics_last_row() -> None:
    stats = parse_stats(SIPP_STATS)
    assert stats == SippStats(14990, 10, 42, 2.5)
    assert stats.rate == pytest.approx(5996.0)


def test_sipp_statistics_without_a_row() -> None:
    with pytest.raises(ValueError):
        parse_stats(SIPP_STATS.splitlines()[0])


GW = MessagePath("sip -> gw -> xmpp", GATEWAY, "straight")
MOD = MessagePath("sip -> module -> xmpp", MODULE, "straight")


def _row(path: MessagePath, delivered: int, seconds: float, cpu: float, p99: float) -> RowResult:
    cpu_use = CpuSnapshot(cpu if path is GW else 0.0, 0.0, 0.0, 0.0, cpu if path is MOD else 0.0)
    return RowResult(path, "max x50", 10, 1000, delivered, 0, seconds, 0.01, p99, cpu_use, 0)


def test_comparison_puts_the_ratio_under_each_pair() -> None:
    rows = [_row(GW, 1000, 0.5, 0.2, 0.040), _row(MOD, 1000, 0.25, 0.1, 0.020)]
    lines = format_comparison(rows).splitlines()
    assert lines[2].split()[-8:] == ["gateway", "2,000", "10.0", "40.0", "200", "0", "0", "0"]
    assert lines[3].split()[-8:] == ["module", "4,000", "10.0", "20.0", "100", "0", "0", "0"]
    # gateway/module: throughput, p50, p99, CPU per message
    assert lines[4].split() == ["gw/module", "0.50x", "1.00x", "2.00x", "2.00x"]


def test_comparison_of_lost_messages_and_unpaired_rows() -> None:
    lossy = _row(MOD, 900, 0.25, 0.1, 0.020)
    assert lossy.lost == 100
    assert format_comparison([_row(GW, 1000, 0.5, 0.2, 0.04)]) == ""


def test_sipp_table_ratio_line() -> None:
    cpu_gw = CpuSnapshot(3.0, 0.0, 0.0, 0.0, 0.0)
    cpu_mod = CpuSnapshot(0.0, 0.0, 0.0, 0.0, 1.5)
    results = [
        SippResult(GW, 6000, 15000, SippStats(15000, 0, 0, 3.0), 15000, cpu_gw),
        SippResult(MOD, 6000, 15000, SippStats(15000, 0, 7, 2.5), 15000, cpu_mod),
    ]
    lines = format_sipp(results).splitlines()
    assert lines[2].split()[:7] == ["6000/s", "x", "15000", "gateway", "15000", "0", "0"]
    assert lines[4].split() == ["gw/module", "0.83x", "2.00x"]
