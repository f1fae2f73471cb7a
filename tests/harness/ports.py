"""Free loopback ports and waiting for a server to listen on one (never a fixed sleep)."""

from __future__ import annotations

import socket
import subprocess
import time

from tests.harness.values import LOOPBACK

# Ports handed out in this process: the kernel may hand the same ephemeral port out twice in a
# row once the probing socket is closed, and two servers of one test must not collide.
_given: set[int] = set()


def free_port() -> int:
    """Return a loopback port that is free for both TCP and UDP right now."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOOPBACK, 0))
            port = int(tcp.getsockname()[1])
            if port in _given:
                continue
            # Kamailio and PJSIP listen on UDP and TCP with one number: check both.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((LOOPBACK, port))
                except OSError:
                    continue
        _given.add(port)
        return port
    raise RuntimeError("no free loopback port found")


def port_open(port: int, host: str = LOOPBACK) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    host: str = LOOPBACK,
) -> float:
    """Wait until host:port accepts TCP; return the seconds it took.

    Raises RuntimeError at once if `proc` exits meanwhile, TimeoutError after `timeout`.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if port_open(port, host):
            return time.monotonic() - start
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")
        time.sleep(0.05)
