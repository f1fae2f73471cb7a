"""Message composition indication, ``application/im-iscomposing+xml`` (RFC 3994).

A SIP client that types sends ``<state>active</state>`` with a ``refresh`` interval and repeats
it before the interval runs out; ``idle`` (or silence for 120 s, RFC 3994 3.3) means it stopped.
The gateway pairs these with XEP-0085 chat states. This module is the body format only;
timers live with whoever owns the conversation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from sipside.errors import bad_body
from sipside.xmlsafe import (
    DEFAULT_LIMITS,
    XmlLimits,
    parse_document,
    qnames,
    text_escape,
)

__all__ = [
    "ACTIVE_TIMEOUT",
    "IDLE_TIMEOUT",
    "ISCOMPOSING_CONTENT_TYPE",
    "ISCOMPOSING_NS",
    "ComposingState",
    "IsComposing",
    "decode",
    "encode",
]

ISCOMPOSING_CONTENT_TYPE = "application/im-iscomposing+xml"
ISCOMPOSING_NS = "urn:ietf:params:xml:ns:im-iscomposing"
_ACCEPTED = frozenset({ISCOMPOSING_CONTENT_TYPE})

# RFC 3994 3.2, 3.3: a receiver drops "active" after refresh (default 120 s) without news, and
# a composer goes idle after 15 s without typing.
ACTIVE_TIMEOUT = 120.0
IDLE_TIMEOUT = 15.0


class ComposingState(enum.Enum):
    """RFC 3994 3: the two states of the composer."""

    ACTIVE = "active"
    IDLE = "idle"


@dataclass(frozen=True, slots=True)
class IsComposing:
    """An isComposing document (RFC 3994 4): state, optional refresh seconds, content type
    being composed and the time of the last activity."""

    state: ComposingState
    refresh: int | None = None
    content_type: str | None = None
    last_active: datetime | None = None

    def expires_at(self, now: float) -> float | None:
        """When an ``active`` indication lapses if no refresh arrives (RFC 3994 3.3)."""
        if self.state is not ComposingState.ACTIVE:
            return None
        return now + (self.refresh if self.refresh is not None else ACTIVE_TIMEOUT)


def _format_time(value: datetime) -> str:
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def encode(doc: IsComposing) -> bytes:
    """Serialise ``doc`` as an ``application/im-iscomposing+xml`` body."""
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>\n',
        f'<isComposing xmlns="{ISCOMPOSING_NS}">\n',
        f"  <state>{doc.state.value}</state>\n",
    ]
    if doc.last_active is not None:
        out.append(f"  <lastactive>{_format_time(doc.last_active)}</lastactive>\n")
    if doc.content_type is not None:
        out.append(f"  <contenttype>{text_escape(doc.content_type)}</contenttype>\n")
    if doc.refresh is not None:
        if doc.refresh <= 0:
            raise ValueError("isComposing refresh must be positive (RFC 3994 4)")
        out.append(f"  <refresh>{doc.refresh}</refresh>\n")
    out.append("</isComposing>\n")
    return "".join(out).encode("utf-8")


_ROOT, _STATE, _LASTACTIVE, _CONTENTTYPE, _REFRESH = qnames(
    ISCOMPOSING_NS, "isComposing", "state", "lastactive", "contenttype", "refresh"
)


def decode(
    body: bytes, content_type: str | None, limits: XmlLimits = DEFAULT_LIMITS
) -> IsComposing:
    """Parse an isComposing body; PeerError(415) for another type, 400/413 for a bad body."""
    root = parse_document(body, content_type, _ACCEPTED, _ROOT, "isComposing", limits)
    state: ComposingState | None = None
    refresh: int | None = None
    composing_type: str | None = None
    last_active: datetime | None = None
    for child in root:
        text = (child.text or "").strip()
        if child.tag == _STATE:
            try:
                state = ComposingState(text)
            except ValueError:
                raise bad_body("isComposing", f"state {text[:20]!r}") from None
        elif child.tag == _REFRESH:
            # RFC 3994 4: a positive integer; anything else is treated as absent (default).
            if 0 < len(text) <= 5 and text.isascii() and text.isdigit() and int(text) > 0:
                refresh = int(text)
        elif child.tag == _CONTENTTYPE:
            composing_type = text or None
        elif child.tag == _LASTACTIVE:
            try:
                last_active = datetime.fromisoformat(text)
            except ValueError:
                last_active = None
    if state is None:
        raise bad_body("isComposing", "no state")
    return IsComposing(state, refresh, composing_type, last_active)
