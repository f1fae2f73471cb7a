"""The gateway process: settings, CLI, routing core, XMPP adapter, store."""
