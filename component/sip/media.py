"""What each SIP client turned down (DESIGN 4.3): CPIM and isComposing, remembered a while.

A client that answers 415 to ``message/cpim`` (with an ``Accept`` that lacks it) gets its
messages as ``text/plain`` from then on, and one that answers 415 to
``application/im-iscomposing+xml`` gets no typing notifications, each for ``cache_time``
seconds: long enough not to pay a 415 per message, short enough that a client that was
upgraded or re-registered with another device is tried again. Bounded: the oldest entries go
first when ``max_entries`` is reached.
"""

from __future__ import annotations

from collections import OrderedDict

from sipside.errors import PeerError
from sipside.xmlsafe import parse_media_type

MAX_ENTRIES = 50_000


def accepts(accept: str | None, media: str) -> bool:
    """Whether an ``Accept`` header value (RFC 3261 20.1) admits ``media`` (type/subtype).

    No header at all says nothing either way, so it admits everything.
    """
    if accept is None:
        return True
    kind = media.split("/", 1)[0]
    for item in accept.split(","):
        if not item.strip():
            continue
        try:
            essence = parse_media_type(item.strip()).essence
        except PeerError:  # a peer's malformed Accept item admits nothing
            continue
        if essence in (media, "*/*", f"{kind}/*"):
            return True
    return False


class MediaRefusals:
    """(recipient AOR, media type) pairs a recipient refused, each until its expiry time."""

    def __init__(self, cache_time: float, max_entries: int = MAX_ENTRIES) -> None:
        self.cache_time = cache_time
        self.max_entries = max_entries
        self._until: OrderedDict[tuple[str, str], float] = OrderedDict()

    def refuses(self, aor: str, media: str, now: float) -> bool:
        """True while ``aor`` is known not to take ``media``."""
        key = (aor, media)
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            del self._until[key]
            return False
        return True

    def remember(self, aor: str, media: str, now: float) -> None:
        """``aor`` answered 415 to ``media``: send it none for ``cache_time``."""
        key = (aor, media)
        self._until.pop(key, None)
        self._until[key] = now + self.cache_time
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def __len__(self) -> int:
        return len(self._until)
