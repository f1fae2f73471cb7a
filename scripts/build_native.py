"""Compile the SIP stack (sipside) and the gateway's hot modules with mypyc into build/native/,
stamped with their sources' hash.

    python3 scripts/build_native.py          build unless the build there matches the sources
    python3 scripts/build_native.py --force  build anyway

The gateway imports the compiled modules only while the stamp matches the sources (see
sipside/__init__.py), so the build is an optional speed-up: without it, or after any edit to
sipside, the same code runs as pure Python. Needs mypy (which brings mypyc), setuptools and a
C compiler; without them it says so and leaves the pure-Python modules in use (exit status 1).

The sources are copied to a scratch directory and compiled there, so nothing is written beside
them; the result replaces build/native/ in one rename, the stamp written last.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sipside  # noqa: E402 - after the path is set


def build(force: bool) -> int:
    stamp = sipside.source_stamp()
    try:
        built = sipside.STAMP_FILE.read_text().strip()
    except OSError:
        built = ""
    if built == stamp and not force:
        print("build-native: build/native matches the sources; nothing to do")
        return 0
    target = sipside.NATIVE_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sipxmpp-native-") as scratch_dir:
        scratch = Path(scratch_dir)
        # Both packages as sources (mypyc type-checks what the compiled modules import), with
        # the mypy settings; sipside's own __init__ is left out (it would find this build).
        ignore = shutil.ignore_patterns("*.so", "__pycache__")
        shutil.copytree(REPO / "component", scratch / "component", ignore=ignore)
        shutil.copytree(REPO / "sipside", scratch / "sipside", ignore=ignore)
        (scratch / "sipside" / "__init__.py").write_text("")
        shutil.copy2(REPO / "pyproject.toml", scratch / "pyproject.toml")
        names = [path.relative_to(REPO).as_posix() for path in sipside.compiled_sources()]
        result = subprocess.run(
            [sys.executable, "-m", "mypyc", *names],
            cwd=scratch,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            print(result.stdout[-4000:], result.stderr[-4000:], sep="\n", file=sys.stderr)
            print(
                "build-native: mypyc failed; the pure-Python modules stay in use", file=sys.stderr
            )
            return 1
        staged = Path(tempfile.mkdtemp(prefix="native-", dir=target.parent))
        for lib in scratch.glob("*.so"):  # the compiled modules' shared runtime
            shutil.copy2(lib, staged / lib.name)
        for name in names:
            stem = name.removesuffix(".py")
            for lib in scratch.glob(stem + ".*.so"):
                (staged / lib.relative_to(scratch)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(lib, staged / lib.relative_to(scratch))
        if sipside.source_stamp() != stamp:
            print("build-native: sipside changed while compiling; run again", file=sys.stderr)
            shutil.rmtree(staged)
            return 1
        (staged / "STAMP").write_text(stamp + "\n")
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staged.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    print(f"build-native: compiled {len(names)} modules into {target.relative_to(REPO)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="build even if up to date")
    return build(parser.parse_args().force)


if __name__ == "__main__":
    sys.exit(main())
