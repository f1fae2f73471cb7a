"""The gateway process: settings, CLI, routing core, XMPP adapter, store."""

__version__ = "0.1.0"
