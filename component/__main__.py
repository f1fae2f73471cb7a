"""``python -m component``: the same command line as ``sipxmpp``."""

from component.cli import main

raise SystemExit(main())
