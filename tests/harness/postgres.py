"""A private PostgreSQL cluster owned by one test: initdb in a temp dir, a free loopback port.

Tests that stop the database (DESIGN 8 outage) use this, never the machine's shared server.
The Debian binaries are found at run time under /usr/lib/postgresql/<version>/bin; initdb
refuses root, so the cluster belongs to the ``postgres`` user (``runuser``).
"""

from __future__ import annotations

import glob
import subprocess
import time
from pathlib import Path

from tests.harness.ports import free_port, wait_for_port
from tests.harness.process import ServerProcess, chown, run_checked
from tests.harness.values import LOOPBACK

OWNER = "postgres"


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin directory."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if not found:
        raise RuntimeError("no PostgreSQL server binaries (initdb) installed")
    return Path(found[-1]).parent


class PostgresCluster(ServerProcess):
    """One cluster: ``start`` (initdb on first use), ``stop_immediate``, ``start`` again."""

    def __init__(self) -> None:
        super().__init__("postgres", owner=OWNER)
        self.bin = postgres_bin()
        self.port = free_port()
        self.data = self.dir / "data"
        self.sockets = self.dir / "run"
        self.url = f"postgresql://{OWNER}@{LOOPBACK}:{self.port}/{OWNER}"

    def _as_owner(self, *argv: str, what: str) -> str:
        return run_checked(["runuser", "-u", OWNER, "--", *argv], what, timeout=120)

    def start(self, timeout: float = 60.0) -> None:
        """initdb once, then run the postmaster in the foreground until it listens."""
        if not self.data.exists():
            self._as_owner(
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                OWNER,
                "--no-sync",
                what="initdb",
            )
            self.sockets.mkdir()
            chown(self.sockets, OWNER)
        proc = self.spawn(
            [
                "runuser",
                "-u",
                OWNER,
                "--",
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.sockets),
                "-c",
                f"listen_addresses={LOOPBACK}",
            ]
        )
        wait_for_port(self.port, timeout, proc)
        # After an immediate stop the port opens before crash recovery ends.
        deadline = time.monotonic() + timeout
        ready = [str(self.bin / "pg_isready"), "-q", "-h", LOOPBACK, "-p", str(self.port)]
        while subprocess.run(ready, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL on {self.port} not ready after {timeout:.0f}s")
            time.sleep(0.1)

    def stop_immediate(self) -> None:
        """``pg_ctl stop -m immediate``: every backend killed, nothing flushed (a crash)."""
        self._as_owner(
            str(self.bin / "pg_ctl"), "stop", "-m", "immediate", "-D", str(self.data), what="pg_ctl"
        )
        if self.proc is not None:
            self.proc.wait(30)
            self.proc = None
