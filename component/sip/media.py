"""What each SIP client takes beyond plain text (DESIGN 4.3): CPIM and isComposing.

Many SIP clients take any MESSAGE body and show it as it is, so sending CPIM or isComposing to
a client that does not understand them puts raw headers or XML on its screen. The gateway
asks first: an OPTIONS to the recipient (RFC 3261 11), whose ``Accept`` lists what it takes,
and sends CPIM or isComposing only to a client that lists them. A 415 (with an ``Accept``
that lacks the type) says the same after the fact. Either answer is remembered for
``cache_time`` seconds: long enough not to ask per message, short enough that a client that
was upgraded or re-registered from another device is asked again. Bounded: the oldest entries
go first when ``max_entries`` is reached.
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


class MediaSupport:
    """(recipient AOR, media type) -> whether the recipient takes it, each until its expiry."""

    def __init__(self, cache_time: float, max_entries: int = MAX_ENTRIES) -> None:
        self.cache_time = cache_time
        self.max_entries = max_entries
        self._known: OrderedDict[tuple[str, str], tuple[float, bool]] = OrderedDict()

    def takes(self, aor: str, media: str, now: float) -> bool | None:
        """True or False while known; None when it is not (never asked, or forgotten)."""
        key = (aor, media)
        known = self._known.get(key)
        if known is None:
            return None
        if known[0] <= now:
            del self._known[key]
            return None
        return known[1]

    def remember(self, aor: str, media: str, takes: bool, now: float) -> None:
        """What ``aor`` said of ``media``, for ``cache_time``."""
        key = (aor, media)
        self._known.pop(key, None)
        self._known[key] = (now + self.cache_time, takes)
        while len(self._known) > self.max_entries:
            self._known.popitem(last=False)

    def __len__(self) -> int:
        return len(self._known)
