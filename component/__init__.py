"""The gateway process: settings, CLI, routing core, XMPP adapter, store."""

# First: where the SIP stack runs compiled, so do this package's hot modules, and the finder
# that loads them must be in place before any of them is imported (sipside/__init__.py).
import sipside as _sipside  # noqa: F401

__version__ = "0.1.0"
