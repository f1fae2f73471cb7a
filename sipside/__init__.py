"""SIP side: an asyncio SIP SIMPLE stack. Knows nothing of XMPP.

Its modules may also run compiled: ``scripts/build-native`` compiles them with mypyc (from
PyPI, with the test extras) into ``build/native/`` and stamps the build with a hash of these
sources. When the stamp matches the sources as they are now, the compiled modules are imported
instead of these files (``NATIVE`` says which); after any edit the stamp no longer matches
and the pure-Python modules are used until the next build, so a stale build never runs.
``SIPXMPP_PURE=1`` in the environment forces the pure-Python modules.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
NATIVE_DIR = _HERE.parent / "build" / "native"
STAMP_FILE = NATIVE_DIR / "STAMP"


def compiled_sources() -> list[Path]:
    """The modules a native build compiles: every module of the package but this one."""
    return sorted(path for path in _HERE.glob("*.py") if path.name != "__init__.py")


def source_stamp() -> str:
    """What a native build of the sources as they are now is stamped with."""
    digest = hashlib.sha256(sys.version.encode())
    for path in compiled_sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _native_build_matches() -> bool:
    if os.environ.get("SIPXMPP_PURE"):
        return False
    try:
        stamp = STAMP_FILE.read_text().strip()
    except OSError:
        return False
    return stamp == source_stamp()


NATIVE = _native_build_matches()
if NATIVE:
    # The compiled modules are found first; their shared runtime is a top-level module.
    sys.modules[__name__].__path__.insert(0, str(NATIVE_DIR / "sipside"))
    sys.path.append(str(NATIVE_DIR))
