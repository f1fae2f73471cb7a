"""A server subprocess with its own temp dir and log, stopped and reaped as a whole group.

Every started server registers itself in `RUNNING`; tests/conftest.py attaches the tail of each
running server's logs to the report of a failing test, so a failure shows what the servers saw.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol


class LogSource(Protocol):
    """Anything started by the harness whose logs help explain a failing test."""

    name: str

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of its logs."""
        ...


#: Servers and agents started and not yet stopped, in start order.
RUNNING: list[LogSource] = []

#: (server name, seconds) of every start in this test session, for the timing summary.
TIMINGS: list[tuple[str, float]] = []

#: Set this environment variable to keep the servers' temp dirs (configs, data, logs).
KEEP_ENV = "SIPXMPP_KEEP_SERVERS"


class ServerProcess:
    """One server process in a private temp dir; its stdout and stderr go to `<dir>/<name>.out`."""

    def __init__(self, name: str, owner: str | None = None) -> None:
        self.name = name
        self.owner = owner
        self.dir = Path(tempfile.mkdtemp(prefix=f"sipxmpp-{name}-"))
        # Servers that drop to their own user must be able to reach their files.
        self.dir.chmod(0o755)
        if owner is not None:
            chown(self.dir, owner)
        self.out_path = self.dir / f"{name}.out"
        self.extra_logs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        as_owner: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start the process in its own session (so stop() can signal its whole group)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} already running")
        if as_owner and self.owner is not None:
            argv = [
                "setpriv",
                f"--reuid={self.owner}",
                f"--regid={self.owner}",
                "--init-groups",
                *argv,
            ]
        with self.out_path.open("ab") as out:
            out.write(f"=== start {' '.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd or self.dir,
                start_new_session=True,
            )
        if self not in RUNNING:
            RUNNING.append(self)
        return self.proc

    @property
    def running(self) -> bool:
        """True while the main process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, wait for all of it to exit, then SIGKILL what is left."""
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        # Wait for the whole group, not just the leader: ejabberdctl's shell dies at once while
        # the Erlang VM is still closing its tables, and killing that now corrupts the spool.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc.poll()
            if proc.returncode is not None and not _group_members(pgid):
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(5)
        self.proc = None

    def close(self) -> None:
        """Stop the server and remove its temp dir (unless SIPXMPP_KEEP_SERVERS is set)."""
        self.stop()
        if self in RUNNING:
            RUNNING.remove(self)
        if not os.environ.get(KEEP_ENV):
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the process output and of every extra log file."""
        parts: list[str] = []
        for path in [self.out_path, *self.extra_logs]:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {path}\n{tail}")
        return "\n".join(parts)


def stop_all() -> None:
    """Stop every server still running (at interpreter exit; PJSIP agents leave on stdin EOF)."""
    for source in list(RUNNING):
        if isinstance(source, ServerProcess):
            source.stop(timeout=5.0)


def _group_members(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes of a process group, read from /proc."""
    members: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def chown(path: Path, user: str) -> None:
    """Give `path` to `user` (and that user's primary group)."""
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def run_checked(argv: Sequence[str], what: str, timeout: float = 60.0) -> str:
    """Run a helper command (prosodyctl, ejabberdctl); raise with its output if it fails."""
    result = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{what} failed ({result.returncode}): {result.stdout.strip()} {result.stderr.strip()}"
        )
    return result.stdout
